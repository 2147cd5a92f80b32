"""Shared fixtures: tiny diffusers reference models, built from configs and saved in the official formats, and the
published files some tests check against (the paper's operator YAMLs, GenEval's prompt set)."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from common.files import download, file_sha256
from eval.geneval.prompts import METADATA, OBJECT_NAMES, default_cache_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # a folder beside the repo that may hold the published files (CI has one)
CACHE = default_cache_dir().parent  # where the GenEval harness caches its files: one download serves both
PAPER_CONFIGS = "https://raw.githubusercontent.com/keshik6/grafting/6ace8b53e9c8e7037725c98d68f4ba3c638dcd54/"

#: The paper's configs (keshik6/grafting `configs/`, Apache 2.0) as `sha256sum` lists them.
PAPER_CONFIGS_SHA256 = """
69087ed6df6965a48d26afba9b814c4a48d70c35c363f9823917e5801d2b7995  channel_mixers/mlp_hyena_x.yaml
6648182d1d42e7bad735b234eb8c97369df62ab7a3b3b22f19c3a598be9b0d78  channel_mixers/mlp_ratio_3.yaml
f87ded905ee4f187e1fe8e9888b43c0e9f933c642bc785c05d10c9b608630d47  channel_mixers/mlp_ratio_4.yaml
5a4e70de084e9076765ead21cec86b741cc47163ab0494a09fc9f1353f06f687  channel_mixers/mlp_ratio_6.yaml
131796354ecaa9507157bae890eb98388d62d8473061326d419b81a963e3fe8d  sampling/mha_swaps/50p_hyena_y.yaml
f269401bd4e24f115b8e321bffa038b15c1049d6c1d89270c5286b5fe7d90870  sampling/mha_swaps/50p_mamba2.yaml
40e9a89a52216db3aa12012dec76828648ca3b17284a459879023591ff4082c9  sampling/mha_swaps/50p_swa.yaml
bd85c9ec8ebb662d7aa76134e69cce01763153fc5a313497d8d5247282e2a044  sampling/mlp_swaps/50p_mlp_ratio_3.yaml
f49caf5530f2fc68d9357cebe0a69c4cc84174a57e0d4de88ac5231bc6d7449e  sampling/mlp_swaps/50p_mlp_ratio_hyena_x.yaml
24729b20c37f8871148b467a9dc8e383442f6fe58e77673bf2e82532a039240b  sequence_mixers/hyena_se.yaml
01fa091dddc62cebc8d69a0a87cd7b38559071c113bd917fdac8169d425ea17a  sequence_mixers/hyena_x.yaml
569ea9669fec09e0cb009c1ce1cbf2647ee57cbf17d7341e1d5b503203696bfc  sequence_mixers/hyena_y.yaml
a8479ba3bbf15b87010cac70d973bfdc956f2de7e0015feccfd589b6633735c2  sequence_mixers/mamba2.yaml
4c6b5a861125111c4cd3f8faefcefc87104ad5c1e5094bda44abe3172147240c  sequence_mixers/mha_timm.yaml
fd6ab198fdf2fd2bd9bec7fd5f98941da912d03ab222bb8e96e175c7ae398cd2  sequence_mixers/swa.yaml
"""

#: Published files tests may read, by their path in the shared folder: (URL, sha256).
PUBLISHED = {
    f"geneval/{METADATA[0]}": METADATA[1:],
    f"geneval/{OBJECT_NAMES[0]}": OBJECT_NAMES[1:],
    **{f"grafting-configs/{name}": (f"{PAPER_CONFIGS}configs/{name}", sha)
       for sha, name in map(str.split, PAPER_CONFIGS_SHA256.strip().splitlines())},
}


def shared_file(relative: str) -> Path:
    """A published file by its path in the shared folder: the copy beside the repo when there is one, else a
    cached download; either way checked against its pinned sha256. Without both (a fresh clone offline), the
    calling test is skipped with the reason."""
    found = _locate(relative)
    if isinstance(found, str):
        pytest.skip(found)
    return found


@functools.cache
def _locate(relative: str) -> Path | str:
    """The verified path of a published file, or why there is none (remembered: one download attempt per run)."""
    if relative not in PUBLISHED:
        raise KeyError(f"{relative} is not a pinned published file; known: {sorted(PUBLISHED)}")
    url, sha = PUBLISHED[relative]
    path = SHARED / relative
    if not path.is_file():
        path = CACHE / relative
        if not path.is_file():
            try:
                download(url, path, timeout=20)
            except OSError as err:
                return f"{relative}: not beside the repo (looked in {SHARED}) and not downloadable from {url} ({err})"
    if file_sha256(path) != sha:
        raise AssertionError(f"{path} is not the published {relative} (its sha256 should be {sha}): restore or "
                             "delete it")
    return path


def shared_files(prefix: str) -> list[str]:
    """The pinned published files under a folder of the shared layout, e.g. `grafting-configs/sampling/`."""
    return sorted(name for name in PUBLISHED if name.startswith(prefix))


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


@pytest.fixture(scope="session")
def shapes_pipeline(tmp_path_factory) -> Path:
    """A tiny, random stand-in of the shapes teacher's pipeline (the teacher's own components, unpretrained T5 of
    width 32, a 2-block transformer)."""
    from models.pixart import PixArtSigma
    from recipes.shapes_teacher import write_components

    folder = write_components(tmp_path_factory.mktemp("shapes-pipeline"), text_dim=32, text_steps=0)
    config = PixArtSigma.make_config(None, hidden_size=32, depth=2, num_heads=2, in_channels=12, out_channels=12,
                                     sample_size=16, interpolation_scale=1.0, caption_channels=32,
                                     model_max_length=16)
    torch.manual_seed(0)
    PixArtSigma(config).save_pretrained(folder / "transformer")
    return folder
