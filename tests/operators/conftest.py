"""Shared fixtures: the paper's operator YAMLs (published files, found by `tests.conftest.shared_file`)."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import shared_file

#: Operator name in our registry → the paper's YAML for it.
PAPER_YAMLS = {
    "mha": "sequence_mixers/mha_timm.yaml",
    "swa": "sequence_mixers/swa.yaml",
    "hyena_se": "sequence_mixers/hyena_se.yaml",
    "hyena_x": "sequence_mixers/hyena_x.yaml",
    "hyena_y": "sequence_mixers/hyena_y.yaml",
    "mamba2": "sequence_mixers/mamba2.yaml",
    "mlp": "channel_mixers/mlp_ratio_3.yaml",
    "mlp_hyena_x": "channel_mixers/mlp_hyena_x.yaml",
}


@pytest.fixture
def paper_config():
    """Return a loader: operator name → the paper's YAML config as a dict (skips when it is unavailable)."""

    def load(name: str) -> dict:
        return yaml.safe_load(shared_file(f"grafting-configs/{PAPER_YAMLS[name]}").read_text())

    return load
