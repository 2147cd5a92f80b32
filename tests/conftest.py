"""Shared fixtures: tiny diffusers reference models, built from configs and saved in the official formats."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity measure used throughout the tests."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def add_to_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "0" * 40, ref: str = "main") -> Path:
    """Put `source` (a folder, or one file) into a Hugging Face cache in the client's layout: content-addressed
    blobs, a snapshot of symlinks named by commit, and refs/<ref> naming the commit. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for file in files:
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / (file.name if source.is_file() else file.relative_to(source))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A tiny PixArt-Sigma pipeline folder (transformer/, text_encoder/, tokenizer/, vae/)."""
    from models.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
