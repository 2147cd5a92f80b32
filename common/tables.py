"""Markdown tables, the format of every report this project prints or writes."""
from __future__ import annotations

from typing import Any


def markdown_table(headers: list[str], rows: list[list[Any]], align: str | None = None,
                   digits: int = 4) -> str:
    """A GitHub-flavoured table; floats printed with `digits` significant digits. `align` is one character per
    column: `l`, `r` or `c` (default: left)."""

    def cell(v: Any) -> str:
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)

    marks = {"l": "---", "r": "---:", "c": ":---:"}
    rule = [marks[a] for a in (align or "l" * len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
