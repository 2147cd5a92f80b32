"""Model cards of export folders: Hub front matter, the graft, the recipe, and evaluation numbers taken from the
reports our own eval commands wrote for these weights (and refused for other weights)."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from common.config import ConfigError
from common.files import save_text
from eval import speed
from eval.fid.cli import main as fid_main
from eval.fid.inception import build_fid_inception
from eval.geneval import cli as geneval
from eval.geneval.prompts import read_object_names
from models.dit import DiT
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.tiny import build_vae
from recipes.builders import build_teacher
from recipes.config import dump_recipe, load_recipe
from recipes.model_card import FAMILIES, CardOptions, base_model, main, write_model_card
from tests.conftest import REPO, SHARED, add_to_hub_cache
from tests.eval.geneval.tiny_models import write_tiny_clip, write_tiny_mask2former


def export(folder, recipe_file: str):
    """What stage 2's export writes (weights, graft, recipe, card) for the recipe's teacher, grafted as it says."""
    recipe = load_recipe(REPO / "recipes" / recipe_file)
    teacher = build_teacher(recipe)
    teacher.save_diffusers(folder.parent / "teacher")
    GraftSpec.from_dict(recipe.graft).apply(teacher)
    teacher.save_pretrained(folder)
    save_text(dump_recipe(recipe), folder / "recipe.yaml")
    write_model_card(folder, new_weights=True)
    return folder


@pytest.fixture
def pixart_export(tmp_path):
    return export(tmp_path / "export", "tiny_pixart_hyena_x.yaml")


def card(folder):
    return ModelCard.load(folder / "README.md")


def test_an_export_carries_a_hub_card(pixart_export):
    readme = card(pixart_export)
    assert readme.data.library_name == "diffusers" and readme.data.pipeline_tag == "text-to-image"
    assert readme.data.tags == ["grafting", "diffusion-transformer", "pixart-sigma", "hyena_x"]
    assert readme.data.base_model is None and readme.data.license is None  # a random tiny teacher has no base
    text = readme.text
    assert "| self-attention | `hyena_x` | 1, 3 | 2 / 4 (50%) |" in text
    assert "Recipe `tiny_pixart_hyena_x`" in text and "| steps | 200 | 40 |" in text
    assert "LoRA rank 8 (α 8)" in text and "synthetic stream (no real data)" in text
    assert "Not evaluated yet" in text and "GenEval:" not in text
    model = PixArtSigma.from_pretrained(pixart_export)
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in text
    assert 'GraftedPixArtTransformer2DModel.from_pretrained("' + str(pixart_export) + '"' in text
    assert "hf download" not in text and f"here the export folder `{pixart_export}`" in text  # no Hub id yet


def test_hub_id_and_speed_report(pixart_export, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "FULL_PRESET", "tiny")  # a "full"-model run on a tiny model, as tests/eval do
    report = speed.main(["--model", "full", "--device", "cpu", "--ckpt", str(tmp_path / "teacher"),
                         "--grafted-ckpt", str(pixart_export), "--repeats", "2", "--warmup", "0",
                         "--sampling-repeats", "1", "--steps", "2", "--no-train-memory",
                         "--out", str(tmp_path / "speed")])
    main([str(pixart_export), "--hub-id", "me/tiny-graft", "--speed", str(tmp_path / "speed"),
          "--code-url", "https://example.org/grafting"])
    text = card(pixart_export).text
    grafted = report["rows"][1]
    forward, sampling = (report["speedups"]["eager"][grafted["name"]][what] for what in ("forward", "sampling"))
    assert (f"| {grafted['name']} | eager | {statistics.median(grafted['eager']['forward']['wall']) * 1e3:.1f} | "
            f"{forward['median']:.2f}× ({forward['low']:.2f}–{forward['high']:.2f}) | "
            f"{grafted['eager']['sampling']['wall'][0]:.2f} | {sampling['median']:.2f}× ({sampling['low']:.2f}–"
            f"{sampling['high']:.2f}) |") in text
    assert f"FLOP-bound speed-up {grafted['flop_bound']:.2f}×" in text
    assert "# tiny-graft" in text and '.from_pretrained("me/tiny-graft"' in text and "hf download me/tiny-graft" in text
    assert "[the grafting repository](https://example.org/grafting)" in text
    stored = pixart_export / "card" / "speed.json"
    assert stored.read_bytes() == (tmp_path / "speed" / "speed.json").read_bytes()

    report["withheld"], report["missing_kernels"] = True, {"eager: grafted": ["blocks.1.attn"]}  # crafted
    (tmp_path / "withheld.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="withheld, kernels were missing"):
        write_model_card(pixart_export, speed=tmp_path / "withheld.json")
    main([str(pixart_export)])  # a later run keeps the names and the stored report
    assert "# tiny-graft" in card(pixart_export).text and "FLOP-bound" in card(pixart_export).text
    write_model_card(pixart_export, new_weights=True)  # a new export: the reports measured the old weights
    assert "# tiny-graft" in card(pixart_export).text and "Not evaluated yet" in card(pixart_export).text


def test_speed_reports_of_other_models_are_refused(pixart_export, tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "PROXY_OVERRIDES", dict(hidden_size=64, num_heads=4, depth=4, sample_size=8,
                                                       caption_channels=32))
    speed.main(["--device", "cpu", "--repeats", "1", "--warmup", "0", "--sampling-repeats", "0",
                "--no-compile", "--no-train-memory", "--ratios", "0.5", "--out", str(tmp_path / "proxy")])
    with pytest.raises(ConfigError, match="'proxy' measurement"):
        write_model_card(pixart_export, speed=tmp_path / "proxy")
    report = json.loads((tmp_path / "proxy" / "speed.json").read_text())
    report["setup"]["model"] = "full"  # crafted: a full-model report of another graft
    report["rows"][1]["graft"]["grafts"][0]["name"] = "hyena_y"
    (tmp_path / "other.json").write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="measured grafts"):
        write_model_card(pixart_export, speed=tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="no speed.json"):
        write_model_card(pixart_export, speed=tmp_path)
    assert not (pixart_export / "card" / "speed.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "geneval").is_dir(), reason="../shared/geneval metadata is missing")
def test_geneval_report_of_the_export(pixart_export, tiny_pipeline, tmp_path):
    names = read_object_names(SHARED / "geneval" / "object_names.txt")
    detector = write_tiny_mask2former(tmp_path / "m2f", names, confident_class=names.index("fire hydrant"))
    out = tmp_path / "geneval"
    geneval.main(["--ckpt", str(pixart_export), "--pipeline", str(tiny_pipeline), "--out", str(out),
                  "--limit", "1", "--samples-per-prompt", "2", "--steps", "2", "--batch-size", "4",
                  "--metadata", str(SHARED / "geneval" / "evaluation_metadata.jsonl"),
                  "--object-names", str(SHARED / "geneval" / "object_names.txt"), "--detector-path", str(detector),
                  "--clip", str(write_tiny_clip(tmp_path / "clip")), "--detector-resize", "64", "128"])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["run"]["generation"]["grafted"]
    write_model_card(pixart_export, CardOptions(hub_id="me/tiny-graft"), geneval=out)
    readme = card(pixart_export)
    (result,) = readme.data.eval_results
    assert result.metric_type == "geneval" and result.metric_value == round(scores["overall"], 5)
    assert f"**GenEval: {scores['overall']:.4f}** over 12 images (64×64, 2 steps, CFG 4.5" in readme.text
    for tag, t in scores["tags"].items():
        assert f"| {tag} | {t['images']} | {t['score']:.4f} |" in readme.text


@pytest.mark.slow
def test_fid_report_is_tied_to_the_weights(tmp_path):
    folder = export(tmp_path / "export", "tiny_dit_hyena_y.yaml")
    build_vae().save_pretrained(tmp_path / "vae")
    fid_main(["sample", "--ckpt", str(folder), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "fid"),
              "--num-samples", "10", "--steps", "2", "--device", "cpu"])
    torch.save(build_fid_inception().state_dict(), tmp_path / "inception.pth")
    stats = dict(mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / "ref.npz", **stats)  # reference statistics only (ADM's batches carry them too)
    results = fid_main(["score", "--samples", str(tmp_path / "fid" / "samples.npz"), "--ref",
                        str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "inception.pth"), "--device", "cpu"])
    write_model_card(folder, fid=tmp_path / "fid" / "fid_results.json")
    readme = card(folder)
    assert readme.data.pipeline_tag == "unconditional-image-generation" and "dit" in readme.data.tags
    assert readme.data.eval_results[0].metric_value == round(results["metrics"]["fid"], 4)
    assert f"| {results['metrics']['fid']:.3f} |" in readme.text
    assert "**FID** of 10 samples (2 DDPM steps" in readme.text

    model = DiT.from_pretrained(folder)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(1.0)
    model.save_pretrained(folder)  # other weights in the same folder: the report no longer describes them
    with pytest.raises(ConfigError, match="its samples come from"):
        write_model_card(folder, fid=tmp_path / "fid" / "fid_results.json")


def test_base_model_comes_from_the_teacher_or_the_architecture(tmp_path, monkeypatch):
    pixart, dit = FAMILIES["PixArtSigma"], FAMILIES["DiT"]
    recipe = load_recipe(REPO / "recipes" / "pixart_sigma_2k_hyena_x_50.yaml")
    config = PixArtSigma.make_config("PixArt-Sigma-XL-2-2K-MS", model_max_length=16)
    # weights/pixart_sigma_2k is neither here nor a cached Hub repo: the architecture names the released model
    assert base_model(pixart, config, recipe)[0] == "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    add_to_hub_cache(tmp_path, "me/my-pixart-teacher", tmp_path / "teacher")
    recipe.model.pretrained = "me/my-pixart-teacher"
    assert base_model(pixart, config, recipe) == ("me/my-pixart-teacher", "the recipe's teacher")
    recipe.model.pretrained = "/data/hub/models--me--cached-teacher/snapshots/abc/transformer"
    assert base_model(pixart, config, recipe)[0] == "me/cached-teacher"
    dit_config = DiT.make_config("DiT-XL-2-512x512", timestep_freq_shift=1.0, mlp_norm_eps=1e-5)
    assert base_model(dit, dit_config, None)[0] == "facebook/DiT-XL-2-512"
    assert base_model(pixart, PixArtSigma.make_config("tiny"), None)[0] is None


def test_given_names_fill_the_front_matter(pixart_export):
    write_model_card(pixart_export, CardOptions(base_model="me/base", license="apache-2.0"))
    readme = card(pixart_export)
    assert (readme.data.base_model, readme.data.license) == ("me/base", "apache-2.0")
    assert readme.data.base_model_relation == "finetune"
    with pytest.raises(ConfigError, match="not an export folder"):
        write_model_card(pixart_export / "card")


def test_a_depth_halved_export_says_what_was_paired(tmp_path):
    """Parallel pairs (blocks 0-1 and 2-3 of 4): the card names the depth change and the pairs' stage-1 target."""
    text = card(export(tmp_path / "export", "tiny_pixart_parallel.yaml")).text
    assert "with 4 of its 4 blocks run as 2 parallel pairs (`parallel_pair`)" in text
    assert "each parallel pair from the residual update of the two blocks it replaces" in text
    assert "| blocks, as parallel pairs | `parallel_pair` | 0, 1, …, 3 | 4 / 4 (100%) |" in text
    assert "- Depth: 4 → 2 sequential blocks (2 parallel pairs" in text
    assert "regress each parallel pair's output from the teacher's input (blocks, as parallel pairs: L1)" in text
