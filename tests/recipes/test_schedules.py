"""Learning-rate schedules: multistep milestones in epochs or steps, each student's own ReduceLROnPlateau (equal to
torch's on one group), their product, and a state that resumes."""
from __future__ import annotations

import json

import pytest
import torch

from recipes.config import OptimSection, PlateauSection, load_recipe
from recipes.schedules import GroupSchedule, dataset_samples, lr_factor, milestone_steps, steps_per_epoch
from tests.conftest import REPO
from tests.data.conftest import write_synthetic


def optimizer(groups: int) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)], lr=1.0)


def test_the_dit_recipe_runs_the_official_stage_1_schedule():
    """8,000 samples, 8 a step, every rank reading all of them (split mode): 1,000 steps an epoch; 200 epochs; the
    lr halves from epochs 51, 101, 151 as the official MultiStepLR.step(epoch) does."""
    recipe = load_recipe(REPO / "recipes" / "dit_xl2" / "mha_hyena_y_50.yaml")
    cfg = recipe.stage1
    per_epoch = steps_per_epoch(8000, cfg.batch_size, 1, recipe.deepspeed.gradient_accumulation)
    assert (cfg.mode, per_epoch, cfg.steps / per_epoch) == ("split", 1000, 200)
    milestones = milestone_steps(cfg.optim, per_epoch)
    assert milestones == [51_000, 101_000, 151_000]
    factor = lr_factor(cfg.optim, cfg.steps, milestones)
    assert [factor(s) for s in (0, 50_999, 51_000, 101_000, 199_999)] == [1.0, 1.0, 0.5, 0.25, 0.125]
    assert cfg.optim.lr == 5e-4 and cfg.optim.grad_clip == 10 and cfg.eval_every == 10 * per_epoch


def test_epochs_are_counted_from_the_shard_indexes(tmp_path):
    write_synthetic(tmp_path / "shards", 10, 3, kind="class")
    recipe = load_recipe(REPO / "recipes" / "tiny_dit_hyena_y.yaml",
                         ["data.source=shards", f"data.train={tmp_path / 'shards'}", "stage1.select_on=train"])
    assert dataset_samples(recipe, None) == 10
    (tmp_path / "shards" / "shard-r000-000000.json").unlink()
    with pytest.raises(FileNotFoundError, match="give the milestones in steps"):
        dataset_samples(recipe, None)


def test_each_groups_plateau_matches_torchs_reduce_lr_on_plateau():
    metrics = [1.0, 0.9, 0.9, 0.9, 0.95, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    plateau = PlateauSection(factor=0.5, patience=1, threshold=1e-4)
    ours = GroupSchedule(optimizer(2), lambda step: 1.0, plateau, min_lr=0.1)
    reference_optimizer = optimizer(1)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(reference_optimizer, factor=0.5, patience=1,
                                                           threshold=1e-4, min_lr=0.1)
    for i, metric in enumerate(metrics):
        ours.plateau_step([metric, 0.9 ** i])  # group 1 keeps improving
        reference.step(metric)
        assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"])
        assert ours.optimizer.param_groups[1]["lr"] == 1.0
    assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # three halvings, then the floor


def test_plateau_and_step_schedules_multiply_and_resume():
    optim = OptimSection(lr=1.0, schedule="multistep", milestones=[2], gamma=0.1)
    plateau = PlateauSection(factor=0.5, patience=0)
    schedule = GroupSchedule(optimizer(2), lr_factor(optim, 10, [2]), plateau)
    schedule.optimizer.step()
    schedule.step()
    schedule.plateau_step([1.0, 1.0])
    schedule.plateau_step([1.0, 0.5])  # group 0 stalls: its lr × 0.5 at once
    assert schedule.get_last_lr() == [0.5, 1.0]
    schedule.optimizer.step()
    schedule.step()  # step 2: the milestone
    assert schedule.get_last_lr() == pytest.approx([0.05, 0.1])
    state = json.loads(json.dumps(schedule.state_dict()))  # plain values only
    resumed = GroupSchedule(optimizer(2), lr_factor(optim, 10, [2]), plateau)
    resumed.load_state_dict(state)
    resumed.plateau_step([1.0, 0.5])
    schedule.plateau_step([1.0, 0.5])
    assert resumed.get_last_lr() == schedule.get_last_lr() == pytest.approx([0.025, 0.05])
