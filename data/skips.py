"""Counted skips: bad inputs are dropped with a warning and a per-reason count, never a crash and never silently."""
from __future__ import annotations

import logging
from collections import Counter

LOUD_SKIPS = 10  # a reason seen more often than this is logged only at powers of two


class SkipCounter:
    """Counts skipped items by reason and logs them (each of the first few, then at powers of two)."""

    def __init__(self, logger: logging.Logger):
        self.log = logger
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= LOUD_SKIPS or n & (n - 1) == 0:
            self.log.warning("skipped (%s #%d, %d in all): %s", reason, n, self.total, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def new_since_last_call(self) -> dict[str, int]:
        """Counts added since the previous call: what a DataLoader worker sends along with each batch."""
        new = self.counts - self._reported
        self._reported = Counter(self.counts)
        return dict(new)
