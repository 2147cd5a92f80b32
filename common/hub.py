"""Hugging Face Hub repo ids as paths: a model already in the local Hub cache loads like a local folder, offline.

Every loader that takes a local file or folder passes it through `local_path`, so `weights/pixart_sigma_2k` and
`PixArt-alpha/PixArt-Sigma-XL-2-2K-MS` (once downloaded) work alike, and so does a file inside a repo,
`PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS.pth`. Nothing is downloaded: the network is never touched.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

# org/name, an optional @revision (branch, tag or commit), then an optional path inside the repo
_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?:@(?P<revision>[\w.-]+))?"
                       r"(?:/(?P<inner>[^/].*))?$")


@dataclass(frozen=True)
class RepoRef:
    """A model repo on the Hub, a revision of it, and a path inside it ('' for the repo root)."""

    repo_id: str
    revision: str | None = None
    inner: str = ""

    @classmethod
    def parse(cls, spec: str) -> RepoRef | None:
        """`org/name[@revision][/path/in/repo]`, or None when `spec` cannot be a repo id (absolute, ./, ~)."""
        match = _REPO_REF.match(spec.replace(os.sep, "/"))
        if match is None or ".." in match["repo"]:
            return None
        return cls(match["repo"], match["revision"], (match["inner"] or "").rstrip("/"))

    def download_command(self) -> str:
        """The `hf` command (huggingface_hub's CLI) that puts this into the cache."""
        revision = f" --revision {self.revision}" if self.revision else ""
        inner = f' --include "{self.inner}*"' if self.inner else ""
        return f"hf download {self.repo_id}{inner}{revision}"


def hub_cache_dir() -> Path:
    """The cache the Hub client reads: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def local_path(spec: str | os.PathLike, what: str = "path") -> Path:
    """`spec` when it exists on disk; otherwise a Hub repo id (with an optional path inside the repo) resolved to
    its snapshot in the local cache, offline. The error names the id, the cache and the download command."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    ref = RepoRef.parse(str(spec))
    if ref is None:
        raise FileNotFoundError(f"{what} {spec}: no such file or folder")
    cache = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache,
                                          local_files_only=True))
    except LocalEntryNotFoundError:
        revision = f" (revision {ref.revision})" if ref.revision else ""
        raise FileNotFoundError(
            f"{what} {spec}: no such local file or folder, and Hub repo {ref.repo_id}{revision} is not in the "
            f"Hugging Face cache at {cache} (set by HF_HUB_CACHE or HF_HOME). Nothing is downloaded at run time: "
            f"if it is a Hub repo, download it once with `{ref.download_command()}` under the same HF_HOME, or pass "
            "a local path.") from None
    target = snapshot / ref.inner if ref.inner else snapshot
    if not target.exists():
        raise FileNotFoundError(f"{what} {spec}: Hub repo {ref.repo_id} is in the cache ({snapshot}) but holds no "
                                f"{ref.inner!r} there; download it with `{ref.download_command()}`")
    return target
