"""Frozen companions and sampling loops: against diffusers' pipeline and an independent DDPM reference."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from PIL import Image

from models.diffusion import NoiseSchedule, pixart_scheduler, respaced_timesteps
from models.dit import DiT
from models.sampling import STEP_SEED_OFFSET, TextToImage, image_grid, sample_dit, seeded_noise
from models.text_encoder import T5TextEncoder
from models.vae import SDXL_SCALING, LatentVAE
from tests.conftest import max_rel_err


def test_t5_encoder_pads_masks_and_matches_a_direct_call(tiny_pipeline):
    t5 = T5TextEncoder(tiny_pipeline, max_length=16)
    emb, mask = t5.encode(["a red circle", "two blue squares above a cat"])
    assert emb.shape == (2, 16, 32)
    assert mask.sum(1).tolist() == [4, 7]  # words + the end-of-sequence token
    ids = t5.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt")
    direct = t5.model(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert torch.equal(direct[0], emb[0])


def test_vae_scaling(tiny_pipeline):
    vae = LatentVAE(tiny_pipeline)
    assert vae.scaling_factor == SDXL_SCALING and vae.downsample == 8
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = vae.encode(images, sample=False)
    assert latents.shape == (2, 4, 8, 8)
    raw = vae.vae.encode(images).latent_dist.mode()
    assert torch.allclose(latents, raw * SDXL_SCALING)
    assert vae.decode(latents).shape == (2, 3, 64, 64)


def test_text_to_image_matches_diffusers_pipeline(tiny_pipeline):
    """Our DPM-Solver++ CFG loop, T5 and VAE equal PixArtSigmaPipeline on the same components and noise."""
    ours = TextToImage.from_paths(tiny_pipeline)
    prompts = ["a red circle above a blue square", "two cats"]
    latents, images = ours(prompts, seeds=[3, 4], height=64, width=96, steps=6, cfg_scale=4.5, progress=False)
    pipe = PixArtSigmaPipeline(tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model,
                               vae=ours.vae.vae, scheduler=pixart_scheduler(),
                               transformer=PixArtTransformer2DModel.from_pretrained(tiny_pipeline / "transformer"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompts, negative_prompt="", num_inference_steps=6, guidance_scale=4.5, height=64, width=96,
                    latents=seeded_noise([3, 4], (4, 8, 12)), output_type="latent", use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=16).images
    assert latents.shape == (2, 4, 8, 12)
    assert max_rel_err(latents, expected) <= 1e-4
    assert images.shape == (2, 3, 64, 96) and images.min() >= -1 and images.max() <= 1


def test_a_pipelines_scheduler_folder_sets_prediction_schedule_and_clipping(tiny_pipeline, tmp_path):
    """A v-prediction model on the cosine schedule with x0 clipping (the shapes teacher's sampler): our loop equals
    diffusers' PixArtSigmaPipeline built with the same scheduler folder."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, pipeline)
    schedule = NoiseSchedule(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", clip_sample=1.0)
    schedule.save(pipeline)
    ours = TextToImage.from_paths(pipeline)
    assert ours.schedule == schedule
    latents, _ = ours(["two red circles"], seeds=[3], height=64, width=64, steps=5, cfg_scale=3.0, progress=False)
    pipe = PixArtSigmaPipeline(tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model,
                               vae=ours.vae.vae, scheduler=DPMSolverMultistepScheduler.from_pretrained(
                                   pipeline / "scheduler"),
                               transformer=PixArtTransformer2DModel.from_pretrained(pipeline / "transformer"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["two red circles"], negative_prompt="", num_inference_steps=5, guidance_scale=3.0, height=64,
                    width=64, latents=seeded_noise([3], (4, 8, 8)), output_type="latent",
                    use_resolution_binning=False, clean_caption=False, max_sequence_length=16).images
    assert max_rel_err(latents, expected) <= 1e-4
    unclipped, _ = TextToImage(ours.transformer, ours.text_encoder, ours.vae, replace(schedule, clip_sample=None))(
        ["two red circles"], seeds=[3], height=64, width=64, steps=5, cfg_scale=3.0, progress=False)
    assert not torch.allclose(unclipped, latents)  # the clipping is active on this random model


def test_respaced_timesteps_follow_iddpm():
    steps = respaced_timesteps(250)
    assert len(steps) == 250 and steps[0] == 999 and steps[-1] == 0
    assert steps == sorted(steps, reverse=True)
    assert 502 in steps and 501 not in steps  # round(125 · 999 / 249) = round(501.506)
    assert respaced_timesteps(1000) == list(range(999, -1, -1))


def reference_ddpm(model, x, labels, steps, cfg, seeds):
    """IDDPM p_sample_loop on a respaced linear schedule with learned-range variance, written out by hand."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_bar = torch.cumprod(1 - betas, 0)
    used = sorted(respaced_timesteps(steps))
    abar = alphas_bar[used]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    new_betas = 1 - abar / abar_prev
    post_var = new_betas * (1 - abar_prev) / (1 - abar)
    generators = [torch.Generator().manual_seed(s + STEP_SEED_OFFSET) for s in seeds]
    x = torch.cat([x, x]).double()
    y = torch.cat([labels, torch.full_like(labels, model.config.num_classes)])
    for i in reversed(range(len(used))):
        t = torch.full((len(x),), float(used[i]))
        out = model.forward_with_cfg(x.float(), t, y, cfg).double()
        eps, v = out[:, :4], out[:, 4:]
        x0 = (x - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()
        mean = (abar_prev[i].sqrt() * new_betas[i] * x0 + (1 - new_betas[i]).sqrt() * (1 - abar_prev[i]) * x) \
            / (1 - abar[i])
        if i == 0:
            x = mean
            continue
        frac = (v + 1) / 2
        log_var = frac * new_betas[i].log() + (1 - frac) * post_var[i].clamp(min=1e-20).log()
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generators * 2]).double()
        x = mean + (0.5 * log_var).exp() * noise
    return x[: len(labels)]


def test_dit_sampler_matches_a_hand_written_iddpm_loop():
    model = DiT(DiT.make_config("tiny")).eval()
    noise = seeded_noise([0, 1], (4, 8, 8))
    labels = torch.tensor([2, 7])
    with torch.no_grad():
        ours = sample_dit(model, noise, labels, steps=10, cfg_scale=4.0, seeds=[5, 6], progress=False)
        expected = reference_ddpm(model, noise, labels, 10, 4.0, [5, 6])
        alone = sample_dit(model, noise[1:], labels[1:], steps=10, cfg_scale=4.0, seeds=[6], progress=False)
    assert max_rel_err(ours, expected) <= 1e-4
    assert max_rel_err(alone[0], ours[1]) <= 1e-5  # a sample does not depend on its batch


def test_seeded_noise_is_independent_of_batching():
    both = seeded_noise([11, 12], (4, 8, 8))
    assert torch.equal(both[1], seeded_noise([12], (4, 8, 8))[0])


def test_image_grid_layout():
    images = torch.stack([torch.full((2, 3, 3), i, dtype=torch.uint8) for i in range(5)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (6, 6, 3)
    assert grid[4, 0, 0] == 4 and grid[4, 3, 0] == 255  # short last row padded white


def test_sample_cli_writes_images_grid_and_records(tmp_path):
    """Per-sample seeds: the same prompt and seed give byte-identical PNGs whatever the batch size."""
    from eval.sample import main

    main(["pixart", "--tiny", "--out", str(tmp_path / "a"), "--batch-size", "3", "--steps", "4"])
    main(["pixart", "--tiny", "--out", str(tmp_path / "b"), "--batch-size", "1", "--steps", "4"])
    records = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    for record in records:
        a = (tmp_path / "a" / record["file"]).read_bytes()
        assert a == (tmp_path / "b" / record["file"]).read_bytes()
    assert Image.open(tmp_path / "a" / "grid.png").size == (128, 128)


def test_sample_cli_needs_a_model(tmp_path):
    from eval.sample import main

    with pytest.raises(SystemExit, match="--pipeline"):
        main(["pixart", "--prompt", "x", "--out", str(tmp_path)])
