"""Periodic, atomic, keep-last-k checkpoints that every rank writes into, and `--resume auto`.

Layout: `<root>/step00001000/` holds DeepSpeed's files (the trained parameters, never the frozen ones; optimizer
partitions; scheduler), one
`extra_rank<r>.pt` per rank (data position and the stage's own state, tensors only), and `COMPLETE`, written
last. A checkpoint is assembled under `<root>/.staging/` and renamed into place only when every rank has
finished, so a killed job never leaves a checkpoint that looks complete but is not.

`COMPLETE` names the run that wrote the checkpoint (recipes/run_identity.py): keep-last-k and `--resume auto`
see only this run's checkpoints, and `--resume PATH` accepts only one of them. Every file is read back with
`weights_only=True` (recipes/deepspeed_loading.py), and the recipe's optimizer settings are put back after the
load (recipes/optimizer_settings.py).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from common.files import save_json
from models.weights import load_torch, save_torch
from recipes.distributed import barrier
from recipes.engine import Engine
from recipes.optimizer_settings import OptimizerSettings

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step(\d{8})$")


class ResumeError(RuntimeError):
    """A checkpoint cannot be used to resume this run: the message says which and why."""


def read_stamp(path: Path) -> dict[str, Any] | None:
    """What a checkpoint's `COMPLETE` marker says (step, run id); None if it is missing or not ours."""
    try:
        stamp = json.loads((path / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


class CheckpointManager:
    """Saves and finds the checkpoints run `run_id` wrote for one stage under `root`."""

    def __init__(self, root: Path, keep: int, rank: int, run_id: str):
        self.root, self.keep, self.rank, self.run_id = Path(root), max(1, keep), rank, run_id
        self.staging = self.root / ".staging"
        if rank == 0 and self.staging.exists():
            shutil.rmtree(self.staging)  # leftovers of a killed save
        foreign = [p.name for p in self._step_dirs() if (read_stamp(p) or {}).get("run_id") != run_id]
        if foreign and rank == 0:
            log.warning("%s: ignoring %d checkpoints that are not this run's (%s)", self.root, len(foreign),
                        ", ".join(foreign[:5]))
        barrier()

    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)

    def complete(self) -> list[Path]:
        """This run's complete checkpoints, oldest first."""
        return [p for p in self._step_dirs() if (read_stamp(p) or {}).get("run_id") == self.run_id]

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
            save_json({"step": step, "run_id": self.run_id}, self.staging / tag / COMPLETE)
            if final.exists():
                shutil.rmtree(final)
            (self.staging / tag).rename(final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old)
            log.info("checkpoint %s", final)
        barrier()
        return final

    def load(self, engine: Engine, path: Path) -> dict[str, Any]:
        """Restore the engine from `path`, with the recipe's current optimizer settings, and return this rank's
        extra state."""
        self.check(path)
        settings = OptimizerSettings.of(engine)
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True, load_module_strict=False)  # frozen ones not saved
        settings.apply(engine)
        extra = path / f"extra_rank{self.rank}.pt"
        if not extra.is_file():
            raise ResumeError(f"{extra} missing: was {path} written with another world size? "
                                  "Resume with the same number of ranks.")
        return load_torch(extra)

    def check(self, path: Path) -> None:
        """`path` is a complete checkpoint of this run and this stage, or an error says what it is instead."""
        if not (path / COMPLETE).is_file():
            raise ResumeError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        stamp = read_stamp(path) or {}
        if stamp.get("run_id") != self.run_id:
            raise ResumeError(f"{path} was written by run {stamp.get('run_id')!r}, not by this run "
                                  f"({self.run_id}); a run resumes only from its own checkpoints")
        if path.parent.resolve() != self.root.resolve():
            raise ResumeError(f"{path} is not one of this stage's checkpoints ({self.root})")

    def resolve(self, resume: str | None) -> Path | None:
        """`--resume`: None / 'none' (fresh), 'auto' (newest complete, if any), or a checkpoint path. Resuming from
        an older checkpoint abandons the newer ones: they are deleted, so a later `--resume auto` cannot go back
        to them."""
        if resume in (None, "none"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        self.check(path)
        newer = [p for p in self.complete() if p.name > path.name]
        if newer and self.rank == 0:
            log.warning("resuming from %s abandons the newer checkpoints %s: deleting them", path,
                        [p.name for p in newer])
            for p in newer:
                shutil.rmtree(p)
        barrier()
        return path
