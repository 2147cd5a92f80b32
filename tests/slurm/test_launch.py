"""`python slurm/launch.py` (submitit). On a real Slurm: the tiny pipeline as dependent jobs, the teacher data as a
job array, producing the same shards and the same exported weights, bit for bit, as `sbatch slurm/pixart_hyena_x.sh`.
Without Slurm: the local executor runs the steps one after another on this machine, a 2-rank job as 2 processes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from submitit.slurm.slurm import SlurmJobEnvironment

from data.shard_writer import finished_shards
from tests.conftest import REPO
from tests.slurm.conftest import GENERATE_ARGS, PROMPTS, SETS, TINY_RECIPE, Cluster, TinyModels

LAUNCH = REPO / "slurm" / "launch.py"


def launch_command(models: TinyModels, out: Path, data: Path, executor: str, steps: list[str], extra: list[str] = ()
                   ) -> list[str]:
    """The launcher as a user would run it, with the tiny settings the sbatch tests use."""
    command = [sys.executable, str(LAUNCH), str(TINY_RECIPE), *(x for s in SETS for x in ("--set", s)),
               "--out", str(out), "--data", str(data), "--pipeline", str(models.pipeline), "--teacher",
               str(models.teacher), "--prompts", *map(str, PROMPTS), "--generate-args", GENERATE_ARGS,
               "--speed-args", models.speed_args(out), "--executor", executor, "--gpus-per-node", "0",
               "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30", "--steps", *steps, *extra]
    return command + (["--geneval-args", models.geneval_args()] if models.geneval_args() else [])


def launch(models: TinyModels, out: Path, data: Path, executor: str, steps: list[str], extra: list[str] = ()) -> str:
    """Run the launcher; returns what it printed (the table of steps and jobs)."""
    done = subprocess.run(launch_command(models, out, data, executor, steps, extra), cwd=REPO, env=with_repo(),
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def with_repo(env: dict[str, str] | None = None) -> dict[str, str]:
    """`python slurm/launch.py` imports the repository's packages: these, not another checkout's installed ones."""
    env = dict(os.environ if env is None else env)
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}


def table(printed: str) -> dict[str, str]:
    """step → job ids, from the launcher's Markdown table."""
    return {line.split("|")[1].strip(): line.split("|")[2].strip() for line in printed.splitlines()
            if line.startswith("| ") and not line.startswith("| step")}


def shard_bytes(folder: Path) -> dict[int, bytes]:
    return {index: path.read_bytes() for index, path in finished_shards(folder).items()}


@pytest.mark.slurm
@pytest.mark.slow
def test_dependent_jobs_survive_preemption_and_match_the_sbatch_pipeline(cluster, tiny_models, sbatch_run, tmp_path):
    """Stage 2 gets submitit's preemption signal half way: `Command.checkpoint` requeues it, and it resumes from its
    last checkpoint. Shards and export are byte-equal to those of `sbatch slurm/pixart_hyena_x.sh`."""
    out, data = tmp_path / "run", tmp_path / "data"
    steps = ["prompts", "generate", "stage1", "stage2", "speed"] + ["geneval"] * bool(tiny_models.geneval_args())
    command = launch_command(tiny_models, out, data, "slurm", steps, ["--generate-tasks", "2", "--wait"])
    with subprocess.Popen(command, cwd=REPO, env=with_repo(cluster.env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stage2 = preempt_stage2(cluster, out, process)
            stdout, stderr = process.communicate(timeout=1800)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    rows = table(stdout)
    assert rows["stage2"] == stage2 and cluster.job(stage2)["Restarts"] == "1"
    log = (out / "submitit" / stage2 / f"{stage2}_0_log.err").read_text()
    resumed = [int(step) for step in re.findall(r"stage2: resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and 25 <= resumed[0] < 150, log[-3000:]
    array = rows["generate"].split(", ")
    assert len(array) == 3 * 2 and len({job.split("_")[0] for job in array}) == 1  # one array: 3 splits × 2 ranks
    for split in ("stage1", "stage2", "val"):
        assert shard_bytes(data / split) == shard_bytes(sbatch_run.data / split), split
    assert (out / "export" / "model.safetensors").read_bytes() == \
        (sbatch_run.out / "export" / "model.safetensors").read_bytes()
    assert (out / "speed" / "speed.json").is_file()
    if tiny_models.geneval_args():
        assert (out / "geneval" / "scores.json").is_file()

    def time_of(job: str, key: str) -> datetime:
        return datetime.fromisoformat(cluster.job(job)[key])

    # afterok: stage 1 started only once every generation task had ended
    assert time_of(rows["stage1"], "StartTime") >= max(time_of(job, "EndTime") for job in array)


def preempt_stage2(cluster: Cluster, out: Path, process: subprocess.Popen) -> str:
    """Once stage 2's first checkpoint exists, send its job what Slurm sends before a time limit (submitit's
    signal), let it requeue and start it again at once; returns its job id."""
    first, deadline = out / "stage2" / "checkpoints" / "step00000025" / "COMPLETE", time.time() + 1200
    while not first.is_file():
        assert process.poll() is None and time.time() < deadline, "the launcher ended before stage 2 checkpointed"
        time.sleep(0.05)
    job = cluster.run("squeue", "-h", "--name", "stage2", "--states", "RUNNING", "-o", "%i").stdout.split()[0]
    cluster.run("scancel", f"--signal={SlurmJobEnvironment.USR_SIG}", job)
    cluster.start_requeued(job)
    return job


@pytest.mark.slow
def test_local_executor_runs_the_steps_on_this_machine(tiny_models, tmp_path):
    """No Slurm: the same command lines, with 2 local processes as the training ranks; a second launch finds
    every step finished."""
    from models.operators.hyena import HyenaX
    from models.pixart import PixArtSigma

    out, data = tmp_path / "run", tmp_path / "data"
    steps = ["prompts", "generate", "stage1", "stage2"]
    printed = launch(tiny_models, out, data, "local", steps, ["--generate-tasks", "1"])
    assert "| stage2 |" in printed and "| done |" in printed
    for split, count in zip(("stage1", "stage2", "val"), PROMPTS):
        assert len(finished_shards(data / split)) == count // 2
    last = sorted((out / "stage2" / "checkpoints").glob("step*"))[-1]
    assert sorted(p.name for p in last.glob("extra_rank*.pt")) == ["extra_rank0.pt", "extra_rank1.pt"]
    model = PixArtSigma.from_pretrained(out / "export")
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.attn, HyenaX)] == [1, 3]
    again = launch(tiny_models, out, data, "local", steps, ["--generate-tasks", "1"])
    assert again.count("finished before") == 4 and "| done |" not in again
