"""What users see of a run: metrics in JSON lines and TensorBoard, loss-curve PNGs, Markdown tables."""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLog:
    """Scalars per step → `metrics.jsonl` (appended, so resumed runs continue it) and TensorBoard; rank 0 only."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled = Path(folder), enabled
        self.writer = None
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)
            repair_metrics(self.folder / "metrics.jsonl")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self, title: str) -> None:
        if not self.enabled:
            return
        self.writer.close()
        plot_curves(self.folder / "metrics.jsonl", self.folder / "loss_curves.png", title)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file; for steps logged twice (a resumed run) the last row wins. A line that is not a
    JSON row (the torn last line a full disk or a kill leaves) is skipped with a warning naming it."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            row = _row(line)
            if row is None:
                if line.strip():
                    log.warning("%s:%d: skipped a line that is not a metrics row: %.80r", path, number, line)
                continue
            rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return [rows[s] for s in sorted(rows)]


def repair_metrics(path: Path) -> None:
    """Cut a torn last line off a metrics file (a write the disk or a kill interrupted), so that rows appended
    next start on a line of their own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    if tail and _row(tail.decode("utf-8", errors="replace")) is not None:  # a whole row, only its newline lost
        with open(path, "ab") as f:
            f.write(b"\n")
    elif tail:
        log.warning("%s: cut a torn last line (%d bytes): %.80r", path, len(tail), tail)
        with open(path, "r+b") as f:
            f.truncate(keep)


def _row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def plot_curves(metrics: Path, png: Path, title: str) -> None:
    """One panel per metric group (`train/…`, `val/…`, `lr`), log-scaled losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for row in rows:
        for name, value in row.items():
            if name == "step" or not isinstance(value, (int, float)):
                continue
            group = name.split("/")[0]
            xs, ys = series[group].setdefault(name, ([], []))
            xs.append(row["step"])
            ys.append(value)
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 3.6), squeeze=False)
    for ax, (group, curves) in zip(axes[0], sorted(series.items())):
        for name, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, label=name.split("/", 1)[-1])
        if group != "lr" and all(v > 0 for _, ys in curves.values() for v in ys):
            ax.set_yscale("log")
        ax.set_title(group)
        ax.set_xlabel("step")
        if len(curves) <= 12:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    log.info("loss curves → %s", png)
