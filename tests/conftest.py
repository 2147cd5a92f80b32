"""Shared fixtures: tiny diffusers reference models, built from configs and saved in the official formats."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity measure used throughout the tests."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny PixArt-Sigma pipeline folder (transformer/, text_encoder/, tokenizer/, vae/)."""
    from models.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
