"""The cluster the tests marked `slurm` submit to, and the tiny models and settings both launchers run with.

GRAFTING_SLURM=local (what `make test-slurm` sets) starts a one-node cluster on localhost for the session, after
installing Debian's slurm-wlm and munge when they are missing and this is root; GRAFTING_SLURM=running uses the
cluster Slurm's commands already reach (SLURM_CONF or /etc/slurm). Unset (plain `make test`), the tests marked
`slurm` skip: they take minutes and need daemons, and `make test-slurm` runs them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED
from tests.slurm.local_cluster import LocalSlurm, install

GENEVAL_FILES = SHARED / "geneval"
TINY_RECIPE = REPO / "recipes" / "tiny_pixart_hyena_x.yaml"
PROMPTS = (8, 8, 4)  # stage 1, stage 2, validation
# Tiny recipe overrides for both launchers. Stage 2 is long enough (≈10 s) to be requeued half way.
SETS = ["data.source=shards", "data.reader.num_workers=1", "data.caption_dropout=0.2", "stage1.steps=20",
        "stage1.eval_every=10", "stage1.checkpoint_every=10", "stage2.steps=150", "stage2.checkpoint_every=25",
        "stage2.log_every=25"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


@dataclass
class Cluster:
    env: dict[str, str]

    def run(self, *command: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Slurm command (in the repository; `env` instead of the cluster's own, e.g. for sbatch)."""
        result = subprocess.run(command, env=env or self.env, capture_output=True, text=True, timeout=120, cwd=REPO)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, …)."""
        fields = self.run("scontrol", "show", "job", "-o", job_id).stdout.split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, timeout: float = 1200) -> dict[str, str]:
        """The job's record once it has ended; cancels it and fails on a timeout."""
        deadline = time.time() + timeout
        while (info := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.time() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s")
            time.sleep(1)
        return info

    def start_requeued(self, job_id: str, timeout: float = 600) -> None:
        """Start a job that is being requeued at once, rather than after Slurm's requeue delay (about 2 minutes).

        The delay exists because slurmd refuses to relaunch a job too soon after revoking its last run's credential
        (slurm.conf `cred_expire`). A `StartTime=now` in the same second as the requeue is the likely cause of a
        run that failed at launch in CI (FAILED, exit 1, no output). So: wait until the old run has left the node,
        then until the clock is past the second it ended in."""
        deadline = time.time() + timeout
        while (state := self.job(job_id)["JobState"]) != "PENDING" or self.node_states() != {"idle"}:
            assert state not in FINAL_STATES and time.time() < deadline, f"job {job_id} {state}, {self.node_states()}"
            time.sleep(0.2)
        time.sleep(2.0)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def node_states(self) -> set[str]:
        return set(self.run("sinfo", "-h", "-o", "%T").stdout.split())


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    mode = os.environ.get("GRAFTING_SLURM")
    if not mode:
        pytest.skip("needs a Slurm cluster: `make test-slurm` starts one on localhost (GRAFTING_SLURM=local), "
                    "GRAFTING_SLURM=running uses yours")
    if mode == "running":
        yield Cluster(dict(os.environ))
        return
    if mode != "local":
        raise pytest.UsageError(f"GRAFTING_SLURM={mode!r}: use local or running")
    reason = install()
    if reason:
        pytest.skip(reason)
    local = LocalSlurm()
    local.start()
    try:
        yield Cluster(local.env)
    finally:
        local.stop()


@dataclass(frozen=True)
class TinyModels:
    """A tiny PixArt-Sigma pipeline (its transformer is the teacher) and GenEval's detector and CLIP, tiny."""

    pipeline: Path
    detector: Path | None
    clip: Path | None

    @property
    def teacher(self) -> Path:
        return self.pipeline / "transformer"

    def geneval_args(self) -> str | None:
        if self.detector is None:
            return None
        return (f"--metadata {GENEVAL_FILES / 'evaluation_metadata.jsonl'} --object-names "
                f"{GENEVAL_FILES / 'object_names.txt'} --detector-path {self.detector} --clip {self.clip} "
                "--detector-resize 64 128 --limit 1 --samples-per-prompt 2 --steps 2 --batch-size 4 --device cpu")

    def speed_args(self, out: Path) -> str:
        return (f"--model full --device cpu --ckpt {self.teacher} --grafted-ckpt {out / 'export'} --repeats 1 "
                "--warmup 0 --sampling-repeats 0 --no-train-memory")


GENERATE_ARGS = "--height 64 --width 64 --steps 2 --shard-size 2 --batch-size 2 --device cpu"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """The tokenizer knows every word of the generated prompts; the teacher has the tiny recipe's depth (4)."""
    from data.prompt_generator import generate_prompts
    from models.tiny import build_pixart, words_of, write_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    pipeline = write_tiny_pipeline(root / "pipeline",
                                   words=words_of([r["prompt"] for r in generate_prompts(sum(PROMPTS))]))
    build_pixart("tiny", depth=4).save_diffusers(pipeline / "transformer")
    if not GENEVAL_FILES.is_dir():
        return TinyModels(pipeline, None, None)
    from eval.geneval.prompts import read_object_names
    from tests.eval.geneval.tiny_models import write_tiny_clip, write_tiny_mask2former

    names = read_object_names(GENEVAL_FILES / "object_names.txt")
    detector = write_tiny_mask2former(root / "mask2former", names, confident_class=names.index("fire hydrant"))
    return TinyModels(pipeline, detector, write_tiny_clip(root / "clip"))


SCRIPT = REPO / "slurm" / "pixart_hyena_x.sh"
TWO_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]


@dataclass
class Run:
    job_id: str
    out: Path
    data: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def submit(cluster: Cluster, models: TinyModels, root: Path, out: Path, data: Path, steps: str | None = None
           ) -> Run:
    """sbatch slurm/pixart_hyena_x.sh for the tiny recipe on 2 ranks; the run folder comes from `--set output_dir`."""
    env = {**cluster.env, "PYTHON": sys.executable, "PIPELINE": str(models.pipeline), "TEACHER": str(models.teacher),
           "DATA": str(data), "PROMPTS": " ".join(map(str, PROMPTS)), "GENERATE_ARGS": GENERATE_ARGS,
           "SPEED_ARGS": models.speed_args(out)}
    if models.geneval_args():
        env["GENEVAL_ARGS"] = models.geneval_args()
    env["STEPS"] = steps or " ".join(s for s in ("prompts", "generate", "stage1", "stage2", "geneval", "speed")
                                     if s != "geneval" or models.geneval_args())
    sets = [x for item in [*SETS, f"output_dir={out}"] for x in ("--set", item)]
    root.mkdir(parents=True, exist_ok=True)
    done = cluster.run("sbatch", "--parsable", *TWO_RANKS, f"--output={root}/slurm-%j.out", str(SCRIPT),
                       str(TINY_RECIPE), *sets, env=env)
    job_id = done.stdout.strip().split(";")[0]
    return Run(job_id, out, data, root / f"slurm-{job_id}.out")


def finish(cluster: Cluster, run: Run) -> dict[str, str]:
    info = cluster.wait(run.job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{run.log_text()[-5000:]}"
    return info


@pytest.fixture(scope="session")
def sbatch_run(cluster, tiny_models, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("sbatch")
    run = submit(cluster, tiny_models, root, root / "run", root / "data")
    finish(cluster, run)
    return run
