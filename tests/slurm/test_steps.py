"""slurm/steps.sh without a cluster: what the sbatch scripts pass to both training steps."""
from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO


def check_train_args(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", 'source slurm/steps.sh && check_train_args "$@"', "bash", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["--start-over", "--resume", "--resume=none"])
def test_flags_that_would_restart_or_pin_the_run_at_every_requeue_are_refused(flag):
    done = check_train_args("--set", "stage2.steps=5", flag, "auto")
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"error: {flag} is not for the pipeline: every run of the job continues its run "
                                  "folder. To start over, delete the run folder (OUT) first")


def test_overrides_and_allowed_changes_go_through():
    done = check_train_args("--set", "stage2.optim.lr=1e-5", "--allow-change", "stage2.optim.lr")
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("script", ["pixart_hyena_x.sh", "dit_xl2.sh"])
def test_each_script_checks_its_arguments_before_its_first_step(script):
    text = (REPO / "slurm" / script).read_text()
    assert 0 < text.index('check_train_args "$@"') < text.index("\nif wanted ")
