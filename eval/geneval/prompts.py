"""The official GenEval prompt set and class names: fetched once into a cache, pinned by sha256, then selected.

The repo does not ship GenEval's files; a pinned hash makes every run score the same 553 prompts as the paper.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from common.files import download, file_sha256
from data.prompts import read_jsonl
from eval.geneval.rules import RELATIONS

log = logging.getLogger(__name__)

OFFICIAL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/"
METADATA = ("evaluation_metadata.jsonl", OFFICIAL + "evaluation_metadata.jsonl",
            "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13")
OBJECT_NAMES = ("object_names.txt", OFFICIAL + "object_names.txt",
                "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

Prompt = tuple[int, dict]  # (index into evaluation_metadata.jsonl, its record)


def default_cache_dir() -> Path:
    """Where fetched GenEval files live: $XDG_CACHE_HOME/grafting/geneval (~/.cache by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grafting" / "geneval"


def verify_sha256(path: Path, expected: str) -> Path:
    """`path`, after checking it is the pinned official file."""
    got = file_sha256(path)
    if got != expected:
        raise ValueError(f"{path}: sha256 {got} does not match the official GenEval file ({expected}). Pass the "
                         "unmodified file from djghosh13/geneval/prompts/, or delete this copy so it is fetched again")
    return path


def official_file(spec: tuple[str, str, str], local: str | Path | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A verified local copy of an official file (`METADATA` or `OBJECT_NAMES`): `local` if given, else the cached
    copy, fetched from GitHub on first use."""
    name, url, sha = spec
    if local is not None:
        if not Path(local).is_file():
            raise FileNotFoundError(f"{local}: no such file (expected GenEval's {name})")
        return verify_sha256(Path(local), sha)
    target = Path(cache_dir or default_cache_dir()) / name
    if not target.is_file():
        log.info("fetching %s → %s", url, target)
        try:
            download(url, target)
        except OSError as err:
            raise RuntimeError(f"cannot fetch {url} ({err}). Download it by hand and pass its path "
                               f"(--metadata / --object-names), or copy it to {target}") from None
    return verify_sha256(target, sha)


def read_metadata(path: str | Path) -> list[dict]:
    """The prompt records of an evaluation_metadata.jsonl, in file order (index = line number from 0)."""
    return [record for _, record in read_jsonl(path)]


def check_records(records: Sequence[dict], class_names: Sequence[str], where: str) -> None:
    """Refuse prompt records the rules cannot score: a missing prompt or tag, an include or exclude without a
    known class and a positive count, a position that does not name an earlier include. Errors name the line."""
    known = set(class_names)
    for line, record in enumerate(records, start=1):
        at = f"{where}:{line}"
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or "tag" not in record:
            raise ValueError(f"{at}: a GenEval record needs 'tag', 'prompt' and 'include'")
        clauses = record.get("include")
        if not isinstance(clauses, list) or not clauses:
            raise ValueError(f"{at}: 'include' must be a non-empty list")
        for i, req in enumerate(clauses + list(record.get("exclude", []))):
            if not isinstance(req, dict) or req.get("class") not in known:
                raise ValueError(f"{at}: class {req.get('class') if isinstance(req, dict) else req!r} is not one "
                                 f"of the detector's classes ({', '.join(sorted(known)[:8])}, …)")
            if not isinstance(req.get("count"), int) or req["count"] < 1:
                raise ValueError(f"{at}: {req['class']!r} needs a positive integer 'count'")
            position = req.get("position")
            if position is not None and not (isinstance(position, list) and len(position) == 2
                                             and isinstance(position[1], int) and 0 <= position[1] < i):
                raise ValueError(f"{at}: position {position!r} must be [relation, index of an earlier include]")


def read_object_names(path: str | Path) -> list[str]:
    """Class names in the detector's class-index order (GenEval's spellings of the 80 COCO classes)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def select_prompts(prompts: Sequence[Prompt], tags: Sequence[str] | None = None,
                   limit: int | None = None) -> list[Prompt]:
    """Prompts of the given tags (all by default), the first `limit` of each tag, in index order."""
    known = {record["tag"] for _, record in prompts}
    unknown = sorted(set(tags or ()) - known)
    if unknown:
        raise ValueError(f"unknown tags {unknown}; this prompt set has {sorted(known)}")
    taken: dict[str, int] = {}
    chosen = []
    for index, record in sorted(prompts, key=lambda p: p[0]):
        tag = record["tag"]
        if (tags and tag not in tags) or (limit is not None and taken.get(tag, 0) >= limit):
            continue
        taken[tag] = taken.get(tag, 0) + 1
        chosen.append((index, record))
    return chosen


class MetadataError(ValueError):
    """A prompt record or detections file does not have GenEval's fields; the message names file, image, field."""


def check_metadata(record: object, where: str) -> dict:
    """A prompt record as GenEval's rules read it: a known `tag`, a `prompt`, and `include` / `exclude` lists of
    {class, count ≥ 1, optional color, optional position [relation, earlier include]}. `where` names the file and
    image in errors."""
    def fail(field: str, problem: str) -> MetadataError:
        return MetadataError(f"{where}: field {field}: {problem}")

    if not isinstance(record, dict):
        raise MetadataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("tag") not in TAGS:
        raise fail("tag", f"{record.get('tag')!r} is not one of GenEval's tags {list(TAGS)}")
    if not isinstance(record.get("prompt"), str):
        raise fail("prompt", f"expected a string, got {record.get('prompt')!r}")
    for part in ("include", "exclude"):
        items = record.get(part, [])
        if not isinstance(items, list):
            raise fail(part, f"expected a list, got {items!r}")
        for i, req in enumerate(items):
            name = f"{part}[{i}]"
            if not isinstance(req, dict):
                raise fail(name, f"expected an object, got {req!r}")
            if not isinstance(req.get("class"), str):
                raise fail(f"{name}.class", f"expected a class name, got {req.get('class')!r}")
            count = req.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise fail(f"{name}.count", f"expected an integer ≥ 1, got {count!r}")
            if "color" in req and not isinstance(req["color"], str):
                raise fail(f"{name}.color", f"expected a colour name, got {req['color']!r}")
            position = req.get("position")
            if position is not None and not (
                    part == "include" and isinstance(position, list) and len(position) == 2
                    and position[0] in RELATIONS and isinstance(position[1], int) and 0 <= position[1] < i):
                raise fail(f"{name}.position", f"expected [one of {list(RELATIONS)}, the index of an earlier "
                                               f"include], got {position!r}")
    return record


def tag_order(tags: Sequence[str]) -> list[str]:
    """GenEval's six tags in the paper's column order, then any other tag in order of first appearance."""
    seen = list(dict.fromkeys(tags))
    return [t for t in TAGS if t in seen] + [t for t in seen if t not in TAGS]
