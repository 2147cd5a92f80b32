"""Shared fixtures: the paper's operator YAMLs (read from ../shared beside the repo, never copied into it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "../shared/grafting-configs"

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
    """Return a loader: operator name → the paper's YAML config as a dict (skips if ../shared is absent)."""

    def load(name: str) -> dict:
        path = CONFIG_DIR / PAPER_YAMLS[name]
        if not path.exists():
            pytest.skip(f"paper configs not found at {CONFIG_DIR.resolve()} (expected ../shared beside the repo)")
        return yaml.safe_load(path.read_text())

    return load
