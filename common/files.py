"""Files every part of a run writes: atomic writes, content hashes, and the settings record that keeps a resumed
job from mixing its output with output made another way."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common.config import ConfigError

HASH_BLOCK = 1 << 20  # a multi-GB checkpoint is hashed in blocks, never held in memory


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)` then rename onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide shards and exports from a shared cluster
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_text(text: str, path: str | os.PathLike) -> None:
    """Atomically write UTF-8 text."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write pretty JSON."""
    save_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def download(url: str, target: str | os.PathLike, timeout: float = 60) -> Path:
    """Fetch `url` (https or file) into `target` atomically: a failed download leaves no partial file. Raises
    OSError when it cannot be fetched."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        atomic_write(target, lambda tmp: _copy_stream(response, tmp))
    return Path(target)


def _copy_stream(stream, path: str) -> None:
    with open(path, "wb") as f:
        shutil.copyfileobj(stream, f)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding an object (a config, a report); bad JSON is a ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def file_sha256(*paths: str | os.PathLike) -> str:
    """sha256 over the files' contents (and, for several files, their names), read in blocks."""
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys), e.g. to name a set of settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def check_or_record(path: str | os.PathLike, settings: dict[str, Any], what: str,
                    ignore_unset: Iterable[str] = ()) -> None:
    """Record `settings` at `path` on the first run; on a rerun refuse any difference, naming each changed key.

    Keys in `ignore_unset` whose current value is None (not known yet) are not compared.
    """
    path = Path(path)
    current = json.loads(json.dumps(settings))  # compare as stored: tuples → lists
    if not path.is_file():
        save_json(current, path)
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    skip = {k for k in ignore_unset if current.get(k) is None}
    changed = sorted(k for k in (recorded.keys() | current.keys()) - skip if recorded.get(k) != current.get(k))
    if changed:
        changes = ", ".join(f"{k}: {recorded.get(k)!r} → {current.get(k)!r}" for k in changed)
        raise ValueError(f"{path.parent} already holds {what} made with other settings ({changes}); use a new "
                         f"output folder, or rerun with the settings recorded in {path}")
