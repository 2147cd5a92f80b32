"""Periodic, atomic, keep-last-k checkpoints that every rank writes into, and `--resume auto`.

Layout: `<root>/step00001000/` holds DeepSpeed's files (the trained parameters, never the frozen ones; optimizer
partitions; scheduler), one
`extra_rank<r>.pt` per rank (data position and the stage's own state, tensors only), and `COMPLETE`, written
last. A checkpoint is assembled under `<root>/.staging/` and renamed into place only when every rank has
finished, so a killed job never leaves a checkpoint that looks complete but is not.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from models.weights import save_torch
from recipes.distributed import barrier
from recipes.engine import Engine

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step(\d{8})$")


class CheckpointManager:
    """Saves and finds checkpoints of one stage under `root`."""

    def __init__(self, root: Path, keep: int, rank: int):
        self.root, self.keep, self.rank = Path(root), max(1, keep), rank
        self.staging = self.root / ".staging"
        if rank == 0 and self.staging.exists():
            shutil.rmtree(self.staging)  # leftovers of a killed save
        barrier()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engine: Engine, step: int, extra: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own `extra` state."""
        tag = f"step{step:08d}"
        # only what trains: frozen weights come back from the teacher file when the stage is rebuilt
        engine.save_checkpoint(str(self.staging), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        save_torch(extra, self.staging / tag / f"extra_rank{self.rank}.pt")
        barrier()
        final = self.root / tag
        if self.rank == 0:
            for script in self.staging.glob("*.py"):  # DeepSpeed's zero_to_fp32.py: keep it with its checkpoint
                script.replace(self.staging / tag / script.name)
            (self.staging / tag / COMPLETE).write_text(f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            (self.staging / tag).rename(final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old)
            log.info("checkpoint %s", final)
        barrier()
        return final

    def load(self, engine: Engine, path: Path) -> dict[str, Any]:
        """Restore the engine from `path` and return this rank's extra state."""
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True, load_module_strict=False)  # frozen ones not saved
        extra = path / f"extra_rank{self.rank}.pt"
        if not extra.is_file():
            raise FileNotFoundError(f"{extra} missing: was {path} written with another world size? "
                                    "Resume with the same number of ranks.")
        return torch.load(extra, map_location="cpu", weights_only=True)

    def resolve(self, resume: str | None) -> Path | None:
        """`--resume`: None / 'none' (fresh), 'auto' (newest complete, if any), or a checkpoint path."""
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return self.latest()
        return Path(resume)
