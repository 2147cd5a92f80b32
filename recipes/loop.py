"""The training loop both stages share: micro-batches with gradient accumulation, per-step seeding, loss checks,
logging with rate and ETA, periodic checkpoints and exact resume."""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from recipes.batches import BatchSource
from recipes.checkpoints import CheckpointManager, ResumeError
from recipes.distributed import all_ranks_true
from recipes.engine import Engine
from recipes.finite_checks import nonfinite
from recipes.reporting import RunLog

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced NaN or inf; the run stops before writing anything from that step."""


class NonFiniteLossError(NonFiniteError):
    """A loss became NaN or inf."""


class NonFiniteWeightsError(NonFiniteError):
    """A checkpoint was due, but the weights (or the optimizer or EMA state) are not finite, or give a non-finite
    loss on the step's own last batch: it is not written, so the last checkpoint stays a good one."""


class NonFiniteMetricError(NonFiniteError):
    """A validation metric (e.g. stage 1's held-out relative error) is NaN or inf."""


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Every random draw of a micro-step derives from this, so a resumed run replays the same randomness."""
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % (2**63 - 1)


@dataclass(kw_only=True)
class Stage:
    """What a stage plugs into the loop."""

    name: str
    engine: Engine
    source: BatchSource
    total_steps: int
    log_every: int
    checkpoint_every: int
    # (batch, generator) → (loss to backpropagate, scalar metrics to log)
    micro_step: Callable[[dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    after_step: Callable[[int], dict[str, float]] = lambda step: {}  # EMA, evaluation, …; returns metrics
    state: Callable[[], dict] = lambda: {}  # the stage's own resumable state (tensors and plain values)
    load_state: Callable[[dict], None] = lambda state: None


def run(*, stage: Stage, checkpoints: CheckpointManager, runlog: RunLog, seed: int, accumulation: int, rank: int,
        resume: str | None) -> int:
    """Train `stage` to `total_steps` optimizer steps; returns the step reached."""
    start = 0
    path = checkpoints.resolve(resume)
    if path is not None:
        extra = checkpoints.load(stage.engine, path)
        start = int(extra["step"])
        if start > stage.total_steps:
            raise ResumeError(f"{stage.name}: {path} is at step {start}, past the stage's {stage.total_steps} steps; "
                              "set the steps back to at least it, or start over")
        stage.source.load_state_dict(extra["source"])
        stage.load_state(extra["stage"])
        log.info("%s: resumed from %s at step %d", stage.name, path, start)
    batches = iter(stage.source)
    sums: dict[str, float] = defaultdict(float)
    counted = 0
    bar = tqdm(total=stage.total_steps, initial=start, desc=stage.name, disable=rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    for step in range(start, stage.total_steps):
        for micro in range(accumulation):
            batch = next(batches)
            generator = torch.Generator().manual_seed(step_seed(seed, step, micro, rank))
            torch.manual_seed(step_seed(seed, step, micro, rank))  # dropout, label drop, …
            loss, metrics = stage.micro_step(batch, generator)
            if not all_ranks_true(bool(torch.isfinite(loss.detach()).all())):
                where = f"samples {batch['keys']}" if not torch.isfinite(loss.detach()).all() else \
                    "a batch on another rank"
                raise NonFiniteLossError(f"{stage.name}: non-finite loss at step {step + 1} (micro-batch {micro}) "
                                         f"from {where}; last good checkpoint: {checkpoints.latest()}")
            stage.engine.backward(loss)
            stage.engine.step()
            for name, value in metrics.items():
                sums[name] += value / accumulation
        counted += 1
        done = step + 1
        logged = stage.after_step(done)
        bad = sorted(name for name, value in logged.items() if not math.isfinite(value))
        if not all_ranks_true(not bad):
            raise NonFiniteMetricError(f"{stage.name}: non-finite {', '.join(bad) or 'metrics on another rank'} at "
                                       f"step {done}; last good checkpoint: {checkpoints.latest()}")
        if done % stage.log_every == 0 or done == stage.total_steps:
            means = {name: value / counted for name, value in sums.items()}
            means["lr"] = stage.engine.get_lr()[0]
            runlog.log(done, {**means, **logged})
            bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k.endswith("loss") or k == "lr"})
            sums.clear()
            counted = 0
        elif logged:
            runlog.log(done, logged)
        bar.update(1)
        if done % stage.checkpoint_every == 0 or done == stage.total_steps:
            state = stage.state()
            check_savable(stage, state, batch, step_seed(seed, done, 0, rank), done, checkpoints)
            checkpoints.save(stage.engine, done, {"step": done, "source": stage.source.state_dict(), "stage": state})
    bar.close()
    elapsed = time.perf_counter() - started
    log.info("%s: %d steps in %.1f s (%.2f steps/s)", stage.name, stage.total_steps - start, elapsed,
             (stage.total_steps - start) / max(elapsed, 1e-9))
    return stage.total_steps


def check_savable(stage: Stage, state: dict, batch: dict, seed: int, done: int, checkpoints: CheckpointManager
                  ) -> None:
    """Refuse to checkpoint weights that are not finite, or that give a non-finite loss on the step's last batch
    (weights of ~1e30 are finite, yet the next step's loss is NaN). Collective: every rank checks its share."""
    bad = nonfinite(stage.engine, state)
    if not bad:
        with torch.no_grad():
            loss, _ = stage.micro_step(batch, torch.Generator().manual_seed(seed))
        if not torch.isfinite(loss.detach()).all():
            bad = [f"the loss of the updated weights on samples {batch['keys']}"]
    if not all_ranks_true(not bad):
        raise NonFiniteWeightsError(f"{stage.name}: after step {done} {', '.join(bad) or 'another rank'}: not "
                                    f"finite; checkpoint not written. Last good checkpoint: {checkpoints.latest()}")
