"""Checkpoints of one process (LocalEngine, no process group): only this run's are seen, kept and resumed from;
every file is read without unpickling; a resumed engine takes the recipe's current optimizer settings; nothing
non-finite is ever saved, so the last checkpoint is a good one."""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from models.weights import CheckpointError
from recipes import loop
from recipes.checkpoints import CheckpointManager, ResumeError
from recipes.config import OptimSection
from recipes.engine import LocalEngine
from recipes.precision import Precision
from recipes.reporting import RunLog
from recipes.schedules import lr_factor


class Crafted:
    """Unpickling this creates `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, legacy: bool = False) -> None:
    """Overwrite a checkpoint file with a pickle that runs code when loaded."""
    payload = {"module": Crafted(marker)}
    if legacy:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)


def engine(lr: float = 1e-2, steps: int = 100, warmup: int = 0, **optim) -> LocalEngine:
    torch.manual_seed(0)
    return LocalEngine(nn.Linear(4, 1), OptimSection(lr=lr, warmup_steps=warmup, **optim), steps, 1, 0,
                       Precision("fp32"))


def train_steps(e: LocalEngine, n: int) -> None:
    for _ in range(n):
        e.backward(e(torch.ones(2, 4)).square().mean())
        e.step()


def test_only_this_runs_checkpoints_are_seen_kept_and_resumed(tmp_path):
    old = CheckpointManager(tmp_path, keep=2, rank=0, run_id="old")
    for step in (10, 20, 30):
        old.save(engine(), step, {"step": step})
    assert [p.name for p in old.complete()] == ["step00000020", "step00000030"]
    new = CheckpointManager(tmp_path, keep=2, rank=0, run_id="new")
    assert new.latest() is None and new.resolve("auto") is None  # the old run's checkpoints are not this run's
    for step in (1, 2, 3):
        new.save(engine(), step, {"step": step})
    assert [p.name for p in new.complete()] == ["step00000002", "step00000003"]
    assert [p.name for p in old.complete()] == ["step00000020", "step00000030"]  # not counted, not deleted
    with pytest.raises(ResumeError, match=r"step00000030 was written by run 'old', not by this run \(new\)"):
        new.resolve(str(tmp_path / "step00000030"))


def test_resuming_an_older_checkpoint_abandons_the_newer_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep=5, rank=0, run_id="r")
    for step in (1, 2, 3):
        manager.save(engine(), step, {"step": step})
    assert manager.resolve(str(tmp_path / "step00000001")) == tmp_path / "step00000001"
    assert [p.name for p in manager.complete()] == ["step00000001"]


def test_a_resumed_engine_takes_the_recipes_current_optimizer_settings(tmp_path):
    manager = CheckpointManager(tmp_path, keep=1, rank=0, run_id="r")
    first = engine(lr=1e-2, warmup=10)
    train_steps(first, 4)
    saved = manager.save(first, 4, {"step": 4})
    resumed = engine(lr=5e-4, warmup=10, weight_decay=0.1, betas=(0.8, 0.99))
    manager.load(resumed, saved)
    factor = lr_factor(OptimSection(lr=5e-4, warmup_steps=10), 100)
    assert resumed.get_lr() == [pytest.approx(5e-4 * factor(4))]  # the new lr, at the restored step
    group = resumed.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["initial_lr"]) == (0.1, (0.8, 0.99), 5e-4)
    assert resumed.lr_scheduler.base_lrs == [5e-4] and resumed.lr_scheduler.last_epoch == 4
    moments = [resumed.optimizer.state_dict()["state"][0][k] for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a, first.optimizer.state_dict()["state"][0][k]) for a, k in
               zip(moments, ("exp_avg", "exp_avg_sq")))  # the optimizer's moments are the checkpoint's
    train_steps(resumed, 1)
    assert resumed.get_lr() == [pytest.approx(5e-4 * factor(5))]


@pytest.mark.parametrize("name", ["local_rank0.pt", "extra_rank0.pt"])
@pytest.mark.parametrize("legacy", [False, True])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_unread(tmp_path, name, legacy):
    manager = CheckpointManager(tmp_path / "ckpt", keep=1, rank=0, run_id="r")
    saved = manager.save(engine(), 1, {"step": 1})
    marker = tmp_path / "MARKER"
    craft(saved / name, marker, legacy)
    with pytest.raises(CheckpointError, match=rf"{saved / name}: refused: it holds Python objects beyond tensors"):
        manager.load(engine(), saved)
    assert not marker.exists()


class Ones:
    """A resumable batch source of constant batches (x = 1) with sample keys."""

    def __init__(self):
        self.done = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.done += 1
            yield {"x": torch.ones(2, 1), "keys": [f"s{self.done}a", f"s{self.done}b"]}

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


def exploding_stage(steps: int, after_step=lambda step: {}) -> loop.Stage:
    """−w·x + 0·exp(w·x) minimised with Adam at lr 4: w climbs 4 a step with gradients, moments and weights all
    finite, until exp(w·x) overflows and the loss of the *next* step is NaN. A checkpoint of the weights before
    that step looks fine unless something evaluates them."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    e = LocalEngine(model, OptimSection(lr=4.0, grad_clip=0.0), steps, 1, 0, Precision("fp32"))

    def micro_step(batch, generator):
        out = e(batch["x"])
        loss = (-out + 0 * torch.exp(out)).mean()
        return loss, {"train/loss": loss.item()}

    return loop.Stage(name="toy", engine=e, source=Ones(), total_steps=steps, log_every=1, checkpoint_every=1,
                      micro_step=micro_step, after_step=after_step)


def run(stage: loop.Stage, folder: Path, resume: str = "auto") -> CheckpointManager:
    checkpoints = CheckpointManager(folder / "checkpoints", keep=50, rank=0, run_id="r")
    loop.run(stage=stage, checkpoints=checkpoints, runlog=RunLog(folder, enabled=False), seed=0, accumulation=1,
             rank=0, resume=resume)
    return checkpoints


def test_weights_that_blow_up_before_the_loss_does_are_never_checkpointed(tmp_path):
    with pytest.raises(loop.NonFiniteWeightsError, match=r"toy: after step (\d+) the loss of the updated weights "
                                                         r"on samples \['s\1a', 's\1b'\]: not finite; checkpoint "
                                                         r"not written. Last good checkpoint: .*step\d+") as err:
        run(exploding_stage(100), tmp_path)
    checkpoints = CheckpointManager(tmp_path / "checkpoints", keep=50, rank=0, run_id="r")
    last = checkpoints.latest()
    assert last is not None and str(last) in str(err.value)
    bad_step = int(re.search(r"after step (\d+)", str(err.value))[1])
    assert bad_step > 2 and last.name == f"step{bad_step - 1:08d}"
    stage = exploding_stage(100)  # the last good checkpoint is truly good: its weights give a finite loss
    checkpoints.load(stage.engine, last)
    loss, _ = stage.micro_step(next(iter(Ones())), torch.Generator())
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in stage.engine.module.parameters())


def test_a_non_finite_validation_metric_stops_the_run(tmp_path):
    stage = exploding_stage(10, after_step=lambda step: {"val/rel_err": float("nan")} if step == 2 else {})
    with pytest.raises(loop.NonFiniteMetricError, match=r"toy: non-finite val/rel_err at step 2; last good "
                                                        r"checkpoint: .*step00000001"):
        run(stage, tmp_path)


def test_fewer_steps_than_the_checkpoint_reached_is_an_error(tmp_path):
    run(exploding_stage(2), tmp_path)
    with pytest.raises(ResumeError, match=r"step00000002 is at step 2, past the stage's 1 steps"):
        run(exploding_stage(1), tmp_path)


def test_deepspeeds_files_are_read_weights_only_with_its_few_records(tmp_path, monkeypatch):
    """What DeepSpeed stores beside tensors (loss scaler, ZeRO stage, fragment addresses) loads; a crafted pickle
    in any of its files (model states, ZeRO optimizer partitions) is refused unread."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from recipes.deepspeed_loading import WeightsOnlyCheckpointEngine

    engine = WeightsOnlyCheckpointEngine()
    records = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                        "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(4)}}}}}
    torch.save(records, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    loaded = engine.load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu")
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["optimizer_state_dict"]["param_slice_mappings"][0]["w"].numel == 4
    marker = tmp_path / "MARKER"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        craft(tmp_path / name, marker)
        with pytest.raises(CheckpointError, match=rf"{name}: refused"):
            engine.load(str(tmp_path / name), map_location=lambda storage, loc: storage)
    assert not marker.exists()
