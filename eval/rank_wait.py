"""Rank 0 waiting for the files the other ranks write, before it combines them (no process group needed)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
POLL_SECONDS = 10


def wait_for(missing: Callable[[], list[Path]], timeout: float, what: str, hint: str) -> None:
    """Poll until `missing()` is empty: the other ranks write their files atomically, so existing means done.
    On timeout, raise with `hint` (what to run later instead)."""
    deadline = time.monotonic() + timeout
    while paths := missing():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(paths)} {what} still missing after {timeout:.0f} s (e.g. {paths[0]}): are the "
                               f"other ranks still running? {hint}")
        log.info("waiting for %d %s from other ranks", len(paths), what)
        time.sleep(POLL_SECONDS)
