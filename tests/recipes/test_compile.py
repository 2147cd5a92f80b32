"""`stage1.compile` / `stage2.compile`: the stages compile the right modules in the right way and train as they do
eagerly. One process (stage 1 in split mode, stage 2 on a plain local engine instead of DeepSpeed), and the
compiler's tracing without code generation, to stay quick."""
from __future__ import annotations

import pytest

from models import compile as compiling
from recipes import stage2
from recipes.config import load_recipe
from recipes.engine import LocalEngine
from recipes.precision import Precision
from recipes.reporting import read_metrics
from recipes.stage1 import run_stage1
from recipes.stage2 import run_stage2
from tests.conftest import REPO

pytestmark = pytest.mark.slow
TINY = REPO / "recipes" / "tiny_pixart_hyena_x.yaml"
RUN_ID = "test-run"  # what recipes.train gives each run (recipes.run_identity); checkpoints carry it


@pytest.fixture
def compiled_modules(monkeypatch):
    """Trace with AOTAutograd (no code generation); record what each stage compiles, and how."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    calls = []
    for kind in ("for_inference", "for_training"):
        original = getattr(compiling, kind)
        monkeypatch.setattr(compiling, kind, lambda module, *a, kind=kind, original=original: (
            calls.append((kind, type(module).__name__)), original(module, *a))[1])
    return calls


def recipe(out, compile: bool, *sets: str):
    return load_recipe(TINY, [f"output_dir={out}", f"stage1.compile={compile}", f"stage2.compile={compile}",
                              "stage1.mode=split", "stage1.steps=4", "stage1.log_every=1", "stage1.eval_every=4",
                              "stage1.eval_batches=1", "stage2.steps=3", "stage2.log_every=1", *sets])


def losses(metrics_file) -> list[float]:
    return [row["train/loss"] for row in read_metrics(metrics_file) if "train/loss" in row]


def test_stage1_compiles_the_teacher_for_inference_and_the_students_for_training(tmp_path, compiled_modules):
    eager = losses(run_stage1(recipe(tmp_path / "eager", False), 0, 1, None, RUN_ID).parent / "metrics.jsonl")
    assert compiled_modules == []
    compiled = losses(run_stage1(recipe(tmp_path / "compiled", True), 0, 1, None, RUN_ID).parent / "metrics.jsonl")
    assert compiled_modules == [("for_inference", "PixArtSigma"), ("for_training", "HyenaX"),
                                ("for_training", "HyenaX")]
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4)


def test_stage2_compiles_the_grafted_model_for_training(tmp_path, compiled_modules, monkeypatch):
    monkeypatch.setattr(stage2, "deepspeed_engine", lambda module, recipe, optim, steps, world_size, batch_size:
                        LocalEngine(module, optim, steps, recipe.deepspeed.gradient_accumulation, 0, Precision("fp32")))
    runs = {}
    for compile in (False, True):
        folder = run_stage2(recipe(tmp_path / str(compile), compile), 0, 1, None, students_dir=None, run_id=RUN_ID)
        runs[compile] = losses(folder.parent / "stage2" / "metrics.jsonl")
    assert compiled_modules == [("for_training", "PixArtSigma")]
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-4)
