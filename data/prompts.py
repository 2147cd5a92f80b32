"""Prompt files: plain text (one prompt a line) or JSON lines (a `prompt` field, other fields kept)."""
from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: str | Path) -> list[dict]:
    """Records with at least `prompt`, in file order; blank lines and `#` comments in text files are skipped."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{n}: each JSON line needs a string 'prompt' field")
            records.append(record)
        elif not line.lstrip().startswith("#"):
            records.append({"prompt": line.strip()})
    if not records:
        raise ValueError(f"{path}: no prompts found")
    return records
