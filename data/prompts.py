"""Prompt files: plain text (one prompt a line) or JSON lines (a `prompt` field, other fields kept)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line of a JSON-lines file; a bad line is an error that
    names it as `file:line`."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return records


def read_prompts(path: str | Path) -> list[dict]:
    """Records with at least `prompt`, in file order; blank lines and `#` comments in text files are skipped."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = []
        for n, record in read_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each JSON line needs a string 'prompt' field")
            records.append(record)
    else:
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        records = [{"prompt": line} for line in lines if line and not line.startswith("#")]
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records
