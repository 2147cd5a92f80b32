"""Command lines start as files too (`python eval/speed.py`), not only as modules (which the other tests use):
running a file puts its folder first on sys.path, where our module names must not shadow anything."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("script", ["eval/sample.py", "eval/geneval.py", "eval/speed.py", "data/generate.py",
                                    "recipes/train.py", "recipes/model_card.py"])
def test_script_form_starts(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
