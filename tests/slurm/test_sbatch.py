"""`sbatch slurm/pixart_hyena_x.sh` on a real Slurm: the tiny recipe end to end on 2 ranks started by srun, a
resubmission that skips every finished step, and a stage 2 requeued twice (by the script's own time-limit handler,
then by `scontrol requeue`), which resumes from its checkpoints and exports the same weights, bit for bit, as the
uninterrupted run."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from data.reader import ReaderConfig, ShardLoader
from data.shard_writer import finished_shards
from recipes.reporting import read_metrics
from recipes.run_identity import RUN_FILE
from tests.slurm.conftest import PROMPTS, Cluster, Run, finish, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEP_NAMES = ["prompts", "generate-stage1", "generate-stage2", "generate-val", "null-caption", "stage1", "stage2",
              "geneval", "speed"]


def test_every_step_ran_once_under_srun_on_two_ranks(sbatch_run, tiny_models):
    log = sbatch_run.log_text()
    assert "2 ranks on 1 node(s)" in log
    wanted = [s for s in STEP_NAMES if s != "geneval" or tiny_models.geneval_args()]
    assert re.findall(r"^== ([\w-]+): done in", log, re.M) == wanted
    assert "recipe tiny_pixart_hyena_x → " in log and "(2 ranks)" in log  # the engine saw both ranks
    assert "pipeline finished" in log


def test_teacher_shards_cover_each_split_once_with_seeds_by_prompt_line(sbatch_run):
    data = sbatch_run.data
    prompts = (data / "prompts.txt").read_text().splitlines()
    assert len(prompts) == sum(PROMPTS) == len(set(prompts))
    first = 0
    for split, count in zip(("stage1", "stage2", "val"), PROMPTS):
        shards = finished_shards(data / split)
        assert {p.name[:10] for p in shards.values()} == {"shard-r000", "shard-r001"}  # rank-split under srun
        loader = ShardLoader(ReaderConfig(shards=[str(data / split)], batch_size=1, epochs=1, num_workers=0))
        assert sorted(k for batch in loader for k in batch["keys"]) == [f"{i:09d}" for i in range(count)]
        captions = (data / f"prompts_{split}.txt").read_text().splitlines()
        assert captions == prompts[first:first + count]
        first += count
    dataset = json.loads((data / "stage2" / "dataset.json").read_text())
    assert dataset["seed"] == PROMPTS[0] and dataset["num_prompts"] == PROMPTS[1]  # seed = line in prompts.txt


def test_both_stages_trained_on_two_ranks_and_the_export_loads(sbatch_run):
    from models.operators.hyena import HyenaX
    from models.pixart import PixArtSigma

    out = sbatch_run.out
    stage1 = [row["train/loss"] for row in read_metrics(out / "stage1" / "metrics.jsonl") if "train/loss" in row]
    assert stage1[-1] < stage1[0]
    assert (out / "stage1" / "DONE").is_file() and len(list((out / "stage1" / "best").glob("*.safetensors"))) == 2
    last = sorted((out / "stage2" / "checkpoints").glob("step*"))[-1]
    assert last.name == "step00000150" and (last / "COMPLETE").is_file()
    assert sorted(p.name for p in last.glob("extra_rank*.pt")) == ["extra_rank0.pt", "extra_rank1.pt"]
    recipe = (out / "recipe.yaml").read_text()
    assert f"train: {sbatch_run.data / 'stage2'}" in recipe and "null_caption.safetensors" in recipe
    model = PixArtSigma.from_pretrained(out / "export")
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.attn, HyenaX)] == [1, 3]
    x = model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32), torch.ones(1, 16))
    assert torch.isfinite(x).all()


def test_geneval_and_speed_reports(sbatch_run, tiny_models):
    speed = json.loads((sbatch_run.out / "speed" / "speed.json").read_text())
    assert [r["name"] for r in speed["rows"]] == ["baseline", "export"]  # the --grafted-ckpt folder's name
    assert speed["rows"][1]["graft"]["grafts"][0]["name"] == "hyena_x"
    if not tiny_models.geneval_args():
        pytest.skip("GenEval's prompt files are not beside the repository (../shared/geneval)")
    scores = json.loads((sbatch_run.out / "geneval" / "scores.json").read_text())
    assert list(scores["tags"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    generation = json.loads((sbatch_run.out / "geneval" / "images" / "generation.json").read_text())
    assert generation["world_size"] == 2 and generation["grafted"]
    assert len(list((sbatch_run.out / "geneval" / "images").rglob("*.png"))) == 6 * 2


def test_submitting_again_skips_every_finished_step(cluster, tiny_models, sbatch_run, tmp_path):
    export = (sbatch_run.out / "export" / "model.safetensors").stat().st_mtime_ns
    again = submit(cluster, tiny_models, tmp_path, sbatch_run.out, sbatch_run.data)
    finish(cluster, again)
    log = again.log_text()
    assert "done in" not in log
    assert len(re.findall(r"finished in an earlier run, skipped", log)) == len(re.findall(r"^== [\w-]+: done in",
                                                                                            sbatch_run.log_text(),
                                                                                            re.M))
    assert (sbatch_run.out / "export" / "model.safetensors").stat().st_mtime_ns == export


def test_time_limit_signal_and_scontrol_requeue_in_stage2_resume_to_the_same_weights(cluster, tiny_models,
                                                                                      sbatch_run, tmp_path):
    """Stage 2 alone, from the uninterrupted run's stage 1 and data. At its first checkpoint the job gets what
    `--signal=B:USR1@300` sends before the time limit (the script requeues itself); at a later one, `scontrol
    requeue`. The periodic checkpoints are the resume state: Slurm's SIGTERM ends the ranks without a save. The
    run folder is the uninterrupted run's, moved: its stage 1 and its run record (which names the run)."""
    out = tmp_path / "run"
    shutil.copytree(sbatch_run.out / "stage1", out / "stage1")
    shutil.copy2(sbatch_run.out / RUN_FILE, out / RUN_FILE)
    run = submit(cluster, tiny_models, tmp_path, out, sbatch_run.data, steps="stage2")
    interrupt(cluster, run, out / "stage2" / "checkpoints" / "step00000025", "scancel", "--batch", "--signal=USR1")
    interrupt(cluster, run, out / "stage2" / "checkpoints" / "step00000100", "scontrol", "requeue")
    info = finish(cluster, run)
    assert info["Restarts"] == "2"
    log = run.log_text()
    assert "run 3:" in log and log.count("time limit near, requeueing") == 1
    resumed = [int(step) for step in re.findall(r"stage2: resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 2 and 25 <= resumed[0] < 100 <= resumed[1] < 150, log[-3000:]
    for name in ("export/model.safetensors", "export/config.json", "export/graft.yaml"):
        assert (out / name).read_bytes() == (sbatch_run.out / name).read_bytes(), name


def interrupt(cluster: Cluster, run: Run, checkpoint: Path, *command: str) -> None:
    """Once `checkpoint` is complete, run `command JOB_ID`, which must requeue the job; then start it again."""
    deadline = time.time() + 600
    while not (checkpoint / "COMPLETE").is_file():
        assert cluster.job(run.job_id)["JobState"] in ("PENDING", "RUNNING"), run.log_text()[-3000:]
        assert time.time() < deadline, f"no {checkpoint} after 10 minutes"
        time.sleep(0.05)
    cluster.run(*command, run.job_id)
    cluster.start_requeued(run.job_id)
