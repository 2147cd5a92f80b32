"""The shapes teacher: the shipped folder loads, draws what it is asked, and is what its command builds (hashes,
components); the command's chain (components → shards → training without a graft, with GenEval and the best
checkpoint → teacher folder) on a tiny model."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from data.shapes import BACKGROUND, PALETTE, split_prompts
from models.codec import PixelCodec
from models.diffusion import NoiseSchedule
from models.pixart import PixArtSigma
from models.sampling import TextToImage, to_uint8
from models.teachers import SHAPES_TEACHER
from recipes.config import load_recipe
from recipes.distributed import free_port
from recipes.shapes_teacher import RECIPE, SCHEDULE, assemble, component_hashes, write_components
from tests.conftest import REPO
from tests.models.test_context_t5 import circle_feature_change

shipped = pytest.mark.skipif(not (SHAPES_TEACHER / "transformer" / "model.safetensors").is_file(),
                             reason="the shapes teacher has not been trained into models/shapes_teacher yet")


@shipped
def test_shipped_files_are_the_ones_its_readme_records():
    readme = (SHAPES_TEACHER / "README.md").read_text()
    recorded = dict(re.findall(r"\| `([^`]+)` \| `([0-9a-f]{64})` \|", readme))
    assert recorded == component_hashes(SHAPES_TEACHER)
    assert (SHAPES_TEACHER / "transformer" / "model.safetensors").stat().st_size <= 20 * 2**20


@shipped
def test_shipped_components_are_what_the_command_writes(tmp_path):
    """Tokenizer, codec and scheduler byte for byte; the T5 encoder's config, and its context-pretrained
    behaviour (its weights depend on the machine's float arithmetic, so they are checked by effect)."""
    write_components(tmp_path, text_steps=0)
    for name in ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "vae/config.json",
                 "scheduler/scheduler_config.json", "text_encoder/config.json"):
        assert (tmp_path / name).read_bytes() == (SHAPES_TEACHER / name).read_bytes(), name
    pipe = TextToImage.from_paths(SHAPES_TEACHER)
    assert pipe.schedule == SCHEDULE and isinstance(pipe.vae, PixelCodec)
    assert circle_feature_change(pipe.text_encoder.model, pipe.text_encoder.tokenizer) > 0.5
    info = json.loads((SHAPES_TEACHER / "text_encoder" / "pretraining.json").read_text())
    assert info["final_loss"] < info["first_loss"] / 20


@shipped
@pytest.mark.parametrize("color", ["red", "blue"])
def test_shipped_teacher_draws_in_the_colour_it_is_asked(color):
    """Colour is what the shipped teacher has learnt (its shapes and counts are not yet reliable, README): at
    least 80% of the ink of "a photo of a <colour> square" is nearest that palette colour, over 4 seeds."""
    pipe = TextToImage.from_paths(SHAPES_TEACHER)
    _, images = pipe([f"a photo of a {color} square"] * 4, seeds=[42, 43, 44, 45], height=32, width=32,
                     progress=False)
    pixels = to_uint8(images).reshape(-1, 3).long()
    ink = pixels[(pixels - torch.tensor(BACKGROUND)).abs().sum(1) > 60]
    names = list(PALETTE)
    nearest = torch.stack([(ink - torch.tensor(PALETTE[n])).abs().sum(1) for n in names]).argmin(0)
    assert len(ink) > 4 * 50  # something is drawn
    assert (nearest == names.index(color)).float().mean() >= 0.8


@pytest.mark.slow
def test_the_teacher_chain_on_a_tiny_model(tmp_path):
    """Components, shards, stage 2 from random weights with GenEval every 2 steps on 2 processes, then the
    assembled teacher folder: it loads, samples, and records its curve and hashes."""
    from data.shapes_data import write_scene_shards
    from recipes.null_caption import main as write_null_caption

    pipeline = write_components(tmp_path / "pipeline", text_dim=32, text_steps=0)
    write_null_caption(["--pipeline", str(pipeline), "--out", str(tmp_path / "null.safetensors"), "--max-length",
                        "16"])
    write_scene_shards(pipeline, tmp_path / "shards", 64)
    prompts = tmp_path / "val.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in split_prompts("val")[::12]))
    sets = [f"output_dir={tmp_path / 'train'}", f"data.train={tmp_path / 'shards'}",
            f"data.null_caption={tmp_path / 'null.safetensors'}", f"stage2.eval.pipeline={pipeline}",
            "model.arch.hidden_size=32", "model.arch.depth=2", "model.arch.num_heads=2",
            "model.arch.caption_channels=32", "data.reader.batch_size=4", "stage2.steps=4", "stage2.log_every=1",
            "stage2.checkpoint_every=2", "stage2.eval.every=2", "stage2.eval.steps=2", "stage2.eval.batch_size=8",
            f"stage2.eval.sets={{val: {prompts}, eval: {prompts}}}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "recipes.train", str(RECIPE)] + [a for s in sets for a in ("--set", s)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = tmp_path / "train" / "stage2"
    best = json.loads((stage2 / "best" / "geneval.json").read_text())
    assert best["step"] in (2, 4) and set(best["scores"]) == {"val", "eval"}
    curve = (stage2 / "geneval_curve.md").read_text()
    assert re.search(r"^\| 2 \|", curve, re.M) and re.search(r"^\| 4 \|", curve, re.M)
    assert sorted(p.name for p in (stage2 / "evals").iterdir()) == ["step00000002", "step00000004"]

    teacher = assemble(pipeline, load_recipe(RECIPE, sets), tmp_path / "teacher", "python -m recipes.shapes_teacher …")
    readme = (teacher / "README.md").read_text()
    assert "geneval_curve.png" in readme and component_hashes(teacher)["transformer/model.safetensors"] in readme
    model = PixArtSigma.from_pretrained(teacher)
    assert model.graft is None and model.config.hidden_size == 32
    pipe = TextToImage.from_paths(teacher)
    assert pipe.schedule == NoiseSchedule.from_pipeline(pipeline) == SCHEDULE
    _, images = pipe(["a photo of two circles"], seeds=[0], height=32, width=32, steps=2, progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
