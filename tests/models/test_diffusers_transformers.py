"""Grafted transformers inside diffusers' own pipelines: same latents as our samplers, same as diffusers' own
transformers when ungrafted, and pipelines that save and load again with the graft."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiTPipeline, PixArtSigmaPipeline

from common.config import ConfigError
from models.diffusers_transformers import GraftedDiTTransformer2DModel, GraftedPixArtTransformer2DModel
from models.dit import DiT
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.sampling import TextToImage, sample_dit, seeded_noise
from models.tiny import words_of, write_tiny_dit_pipeline, write_tiny_pipeline
from tests.conftest import max_rel_err

PROMPTS = ["a red circle above a blue square", "two cats"]
SEEDS = [3, 4]
PIXART_CALL = dict(num_inference_steps=6, guidance_scale=4.5, height=64, width=96, output_type="latent",
                   use_resolution_binning=False, clean_caption=False, max_sequence_length=16)
CLASSES, DIT_STEPS, DIT_CFG = [3, 999], 8, 4.0


def graft(model, name: str) -> None:
    """Graft half the self-attention layers and move every weight off its initial value (trained-like)."""
    spec = {"grafts": [{"type": "mha", "name": name, "config": {}, "layers": {"ratio": 0.5}}]}
    GraftSpec.from_dict(spec).apply(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def pixart_folders(tmp_path_factory):
    """A tiny PixArt-Sigma pipeline and a grafted export of its transformer (Hyena-X in block 1 of 2)."""
    root = tmp_path_factory.mktemp("pixart")
    base = write_tiny_pipeline(root / "base", words=words_of(PROMPTS))
    model = PixArtSigma.from_pretrained(base, model_max_length=16)
    graft(model, "hyena_x")
    model.save_pretrained(root / "export")
    return base, root / "export"


def pixart_pipe(base, transformer=None) -> PixArtSigmaPipeline:
    pipe = PixArtSigmaPipeline.from_pretrained(base, **({"transformer": transformer} if transformer else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pixart_pipeline_with_grafted_transformer_equals_our_sampler(pixart_folders, tmp_path):
    base, export = pixart_folders
    transformer = GraftedPixArtTransformer2DModel.from_pretrained(export)
    assert transformer.model.graft is not None and transformer.config.sample_size == 8
    latents = pixart_pipe(base, transformer)(PROMPTS, generator=generators(), **PIXART_CALL).images
    ours, _ = TextToImage.from_paths(base, export)(PROMPTS, seeds=SEEDS, height=64, width=96, steps=6,
                                                   cfg_scale=4.5, progress=False)
    assert latents.shape == (2, 4, 8, 12)
    assert max_rel_err(latents, ours) <= 1e-5

    # the pipeline saves a folder that loads again, graft included, in diffusers and in our loaders
    pixart_pipe(base, transformer).save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["models.diffusers_transformers", "GraftedPixArtTransformer2DModel"]
    reloaded = pixart_pipe(tmp_path / "saved")
    assert isinstance(reloaded.transformer, GraftedPixArtTransformer2DModel)
    assert reloaded.transformer.model.graft.to_dict() == transformer.model.graft.to_dict()
    again = reloaded(PROMPTS, generator=generators(), **PIXART_CALL).images
    assert torch.equal(again, latents)
    ours_reads_it = PixArtSigma.from_pretrained(tmp_path / "saved")
    assert ours_reads_it.graft.to_dict() == transformer.model.graft.to_dict()
    for key, value in transformer.model.state_dict().items():
        assert torch.equal(ours_reads_it.state_dict()[key], value), key


def test_pixart_ungrafted_transformer_gives_what_diffusers_own_gives(pixart_folders):
    base, _ = pixart_folders
    expected = pixart_pipe(base)(PROMPTS, generator=generators(), **PIXART_CALL).images
    transformer = GraftedPixArtTransformer2DModel.from_pretrained(base, subfolder="transformer")
    assert transformer.model.graft is None
    latents = pixart_pipe(base, transformer)(PROMPTS, generator=generators(), **PIXART_CALL).images
    assert max_rel_err(latents, expected) <= 1e-5


def test_wrapper_shares_the_models_tensors_and_layout(pixart_folders):
    _, export = pixart_folders
    model = PixArtSigma.from_pretrained(export)
    wrapper = GraftedPixArtTransformer2DModel.from_model(model)
    assert list(wrapper.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(wrapper.parameters(), model.parameters()))
    assert not wrapper.training and wrapper.dtype == torch.float32
    bf16 = GraftedPixArtTransformer2DModel.from_pretrained(export, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.graft is not None
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    mask = torch.ones(1, 16, dtype=torch.long)
    (sample,) = wrapper(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)
    assert torch.equal(sample, model(x, t, y, mask))
    with pytest.raises(ValueError, match="attention_mask"):
        wrapper(x, encoder_hidden_states=y, timestep=t, attention_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        wrapper(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs={"resolution": torch.ones(1, 2)})


def test_wrapper_config_must_agree_with_its_architecture(pixart_folders):
    _, export = pixart_folders
    config = dict(GraftedPixArtTransformer2DModel.from_pretrained(export).config)
    with pytest.raises(ConfigError, match="sample_size"):
        GraftedPixArtTransformer2DModel(**{**config, "sample_size": 16})
    with pytest.raises(ConfigError, match="depht"):
        GraftedPixArtTransformer2DModel(architecture={"depht": 2})


@pytest.fixture(scope="module")
def dit_folders(tmp_path_factory):
    """A tiny DiT pipeline (1000 classes, DDIM) and a grafted export with diffusers numerics (Hyena-Y)."""
    root = tmp_path_factory.mktemp("dit")
    base = write_tiny_dit_pipeline(root / "base")
    model = DiT.from_pretrained(base, numerics="diffusers")
    graft(model, "hyena_y")
    model.save_pretrained(root / "export")
    return base, root / "export"


def dit_latents(pipe: DiTPipeline, class_labels=CLASSES) -> torch.Tensor:
    """DiTPipeline has no latent output: the latents it hands the VAE, scaled back."""
    pipe.set_progress_bar_config(disable=True)
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k)
    pipe(class_labels, guidance_scale=DIT_CFG, generator=generators([5, 6]), num_inference_steps=DIT_STEPS,
         output_type="pt")
    return seen[0] * pipe.vae.config.scaling_factor


def test_dit_ungrafted_transformer_gives_what_diffusers_own_gives(dit_folders):
    base, _ = dit_folders
    expected = dit_latents(DiTPipeline.from_pretrained(base))
    same = GraftedDiTTransformer2DModel.from_pretrained(base, subfolder="transformer", numerics="diffusers")
    assert max_rel_err(dit_latents(DiTPipeline.from_pretrained(base, transformer=same)), expected) <= 1e-5
    # the original numerics (the default) are what DiT was trained with, and visibly not diffusers'
    original = GraftedDiTTransformer2DModel.from_pretrained(base)
    assert max_rel_err(dit_latents(DiTPipeline.from_pretrained(base, transformer=original)), expected) > 1e-3


def test_dit_pipeline_with_grafted_transformer_equals_our_sampler(dit_folders, tmp_path):
    base, export = dit_folders
    transformer = GraftedDiTTransformer2DModel.from_pretrained(export)
    pipe = DiTPipeline.from_pretrained(base, transformer=transformer)
    latents = dit_latents(pipe)
    ours = sample_dit(transformer.model, seeded_noise([5, 6], (4, 8, 8)), torch.tensor(CLASSES), steps=DIT_STEPS,
                      cfg_scale=DIT_CFG, guidance_channels=None, progress=False, scheduler=pipe.scheduler)
    assert max_rel_err(latents, ours) <= 1e-5

    pipe.save_pretrained(tmp_path / "saved")
    reloaded = DiTPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.transformer, GraftedDiTTransformer2DModel)
    assert reloaded.transformer.model.graft.to_dict() == transformer.model.graft.to_dict()
    assert reloaded.transformer.model.config == transformer.model.config  # numerics included
    assert torch.equal(dit_latents(reloaded), latents)
    assert DiT.from_pretrained(tmp_path / "saved").graft is not None


def test_dit_parallel_pairs_run_in_the_pipeline_and_save_and_load_again(dit_folders, tmp_path):
    """A depth-halved DiT (blocks 0 and 1 as one parallel pair, merge moved off its sum) is a drop-in too: the
    pipeline gives our sampler's latents, and its saved folder reloads the pairs in diffusers and in our loader."""
    base, _ = dit_folders
    model = DiT.from_pretrained(base, numerics="diffusers")
    GraftSpec.from_dict({"grafts": [{"type": "blocks", "name": "parallel_pair", "layers": {"ratio": 1.0}}]}
                        ).apply(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            block.merge.weight.add_(0.05 * torch.randn(block.merge.weight.shape, generator=generator))
    model.save_pretrained(tmp_path / "export")
    transformer = GraftedDiTTransformer2DModel.from_pretrained(tmp_path / "export")
    assert len(transformer.model.blocks) == model.config.depth // 2
    pipe = DiTPipeline.from_pretrained(base, transformer=transformer)
    latents = dit_latents(pipe)
    ours = sample_dit(model, seeded_noise([5, 6], (4, 8, 8)), torch.tensor(CLASSES), steps=DIT_STEPS,
                      cfg_scale=DIT_CFG, guidance_channels=None, progress=False, scheduler=pipe.scheduler)
    assert max_rel_err(latents, ours) <= 1e-5
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = DiTPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.transformer.model.graft.to_dict() == model.graft.to_dict()
    assert torch.equal(dit_latents(reloaded), latents)
    assert len(DiT.from_pretrained(tmp_path / "saved").blocks) == model.config.depth // 2
