"""`make demo`'s command end to end on a tiny random stand-in of the shapes teacher: every step runs, the report
holds the per-tag table, the stage-1 layer table, the fidelity and the speed, and a rerun skips finished steps."""
from __future__ import annotations

import json

import pytest
import yaml

from data.reader import ReaderConfig, ShardLoader
from recipes.demo import main

pytestmark = pytest.mark.slow


def test_demo_on_a_tiny_teacher(shapes_pipeline, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["--out", str(tmp_path / "demo"), "--teacher", str(shapes_pipeline), "--pairs", "32", "--val-pairs", "8",
            "--gen-steps", "2",
            "--eval-steps", "2", "--no-proxy", "--set", "stage1.steps=4", "--set", "stage1.eval_every=2",
            "--set", "stage1.eval_batches=1", "--set", "stage2.steps=4", "--set", "data.reader.batch_size=4"]
    report = main(args)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    for needle in ("| color_attr | 240 |", "| blocks.1.attn | hyena_x |", "detections match", "forward latency",
                   "fidelity/side_by_side.png", "graft/stage2/loss_curves.png"):
        assert needle in text, needle
    demo = tmp_path / "demo"
    graft = json.loads((demo / "geneval_graft" / "scores.json").read_text())
    assert graft["images"] == 324 and graft["run"]["generation"]["grafted"] is True
    assert json.loads((demo / "fidelity" / "fidelity.json").read_text())["images"] == 324
    steps = set(json.loads((demo / "timings.json").read_text()))
    assert steps == {"prompts train", "generate train", "prompts val", "generate val", "null caption", "train",
                     "GenEval teacher", "GenEval graft", "fidelity", "speed"}
    recipe = yaml.safe_load((demo / "graft" / "recipe.yaml").read_text())
    assert recipe["data"]["val"] == str(demo / "data" / "val") and recipe["stage1"]["select_on"] == "held_out"
    loader = ShardLoader(ReaderConfig(shards=[str(demo / "data" / "val")], batch_size=1, epochs=1, num_workers=0,
                                      latent_channels=12))
    assert sum(len(batch["keys"]) for batch in loader) == 8  # pairs the graft never trained on

    ablation = main(["--out", str(tmp_path / "fresh"), "--shared", str(demo), *args[2:], "--students", "fresh"])
    assert set(json.loads((tmp_path / "fresh" / "timings.json").read_text())) == {"train", "GenEval graft",
                                                                                  "fidelity", "speed"}
    assert "stage 1 did not run" in ablation.read_text()
    assert not (tmp_path / "fresh" / "data").exists()
