"""Every model loader takes a Hub repo id already in the local cache wherever it takes a local path, offline."""
from __future__ import annotations

import pytest
import torch

from models.diffusers_transformers import GraftedPixArtTransformer2DModel
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.pretrained import model_sha256
from models.sampling import TextToImage
from models.text_encoder import T5TextEncoder
from models.vae import LatentVAE
from tests.conftest import add_to_hub_cache

BASE = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_pipeline):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_to_hub_cache(cache, BASE, tiny_pipeline)
    return cache


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pipeline_components_load_from_a_cached_repo_id(cache, tiny_pipeline):
    assert same_weights(PixArtSigma.from_pretrained(BASE), PixArtSigma.from_pretrained(tiny_pipeline))
    assert model_sha256(BASE, "transformer") == model_sha256(tiny_pipeline, "transformer")
    prompts = ["a red circle"]
    cached_t5, local_t5 = T5TextEncoder(BASE, max_length=16), T5TextEncoder(tiny_pipeline, max_length=16)
    assert torch.equal(cached_t5.encode(prompts)[0], local_t5.encode(prompts)[0])
    assert same_weights(LatentVAE(BASE).vae, LatentVAE(tiny_pipeline).vae)
    latents, _ = TextToImage.from_paths(BASE)(prompts, [0], 64, 64, steps=2, progress=False)
    expected, _ = TextToImage.from_paths(tiny_pipeline)(prompts, [0], 64, 64, steps=2, progress=False)
    assert torch.equal(latents, expected)


def test_files_and_grafted_exports_inside_cached_repos(cache, tiny_pipeline, tmp_path):
    model = PixArtSigma.from_pretrained(tiny_pipeline)
    model.save_original(tmp_path / "tiny.pth")
    add_to_hub_cache(cache, "org/originals", tmp_path / "tiny.pth")
    assert same_weights(PixArtSigma.from_pretrained("org/originals/tiny.pth"), model)

    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_x", "config": {},
                                     "layers": {"indexes": [1]}}]}).apply(model)
    model.save_pretrained(tmp_path / "export")
    add_to_hub_cache(cache, "me/pixart-graft", tmp_path / "export")
    transformer = GraftedPixArtTransformer2DModel.from_pretrained("me/pixart-graft")
    assert transformer.model.graft.to_dict() == model.graft.to_dict() and same_weights(transformer, model)


def test_an_uncached_repo_id_says_how_to_get_it(cache):
    loaders = (PixArtSigma.from_pretrained, T5TextEncoder, LatentVAE, GraftedPixArtTransformer2DModel.from_pretrained)
    for load in loaders:
        with pytest.raises(FileNotFoundError) as err:
            load("PixArt-alpha/PixArt-Sigma-XL-2-2K-MS")
        message = str(err.value)
        assert "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS" in message and str(cache) in message
        assert "hf download PixArt-alpha/PixArt-Sigma-XL-2-2K-MS" in message
