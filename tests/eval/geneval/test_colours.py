"""Colour crops as upstream builds them, the zero-shot classifier's maths on a fake CLIP, and the open_clip loader
on a tiny random model written in the real folder format."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.geneval.colours import TEMPLATES, ClipColorClassifier, object_crop
from eval.geneval.rules import COLORS
from tests.conftest import add_to_hub_cache
from tests.eval.geneval.tiny_models import TINY_CLIP, write_tiny_clip

GREY = (153, 153, 153)  # "#999"


def red_square() -> tuple[Image.Image, np.ndarray]:
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:16, 8:16] = (255, 0, 0)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    return Image.fromarray(pixels), mask


def test_crop_fills_outside_the_mask_with_grey_then_crops_to_the_box():
    image, mask = red_square()
    crop = np.asarray(object_crop(image, (4, 4, 20, 20), mask))
    assert crop.shape == (16, 16, 3)
    assert (crop[4:12, 4:12] == (255, 0, 0)).all() and (crop[:4] == GREY).all() and (crop[12:] == GREY).all()


def test_crop_options_and_rounding():
    image, mask = red_square()
    assert object_crop(image, (4.4, 4.6, 20.5, 19.5), mask).size == (16, 15)  # Pillow rounds: 4, 5, 20, 20
    assert (np.asarray(object_crop(image, (0, 0, 8, 8), None)) == 255).all()  # no mask: the image itself
    assert (np.asarray(object_crop(image, (0, 0, 8, 8), mask, bgcolor="original")) == 255).all()
    full = np.asarray(object_crop(image, (4, 4, 20, 20), mask, crop=False))
    assert full.shape == (32, 32, 3) and (full[0, 0] == GREY).all()
    with pytest.raises(ValueError, match="mask shape"):
        object_crop(image, (0, 0, 8, 8), mask[:16])


class FakeClip(torch.nn.Module):
    """Text: a fixed random vector per distinct text; image: whatever vector the test assigns to a crop's id."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.texts: list[str] = []
        self.text_vectors = torch.randn(64, dim)
        self.image_vectors = torch.zeros(0, dim)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        ids = []
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
            ids.append(self.texts.index(text))
        return torch.tensor(ids)[:, None]

    def encode_text(self, tokens):
        return self.text_vectors[tokens[:, 0]] * (1 + tokens[:, :1])  # unnormalised on purpose

    def encode_image(self, x):
        return self.image_vectors[x[:, 0, 0, 0].long()]


def crop_id(crop: Image.Image) -> torch.Tensor:
    return torch.full((3, 1, 1), float(crop.getpixel((0, 0))[0] // 20))


def test_text_classifier_normalises_averages_renormalises_and_is_cached():
    fake = FakeClip()
    clf = ClipColorClassifier(fake, crop_id, fake.tokenize)
    weights = clf.text_classifier(COLORS, "tv remote")
    assert weights.shape == (16, 10)
    assert fake.texts[:3] == ["a photo of a red tv remote", "a photo of a red-colored tv remote",
                              "a photo of a red object"] and len(fake.texts) == 30
    ids = torch.arange(30)[:, None]
    per_text = F.normalize(fake.encode_text(ids), dim=-1).view(10, 3, -1).mean(1)
    assert torch.allclose(weights, F.normalize(per_text, dim=-1).T, atol=1e-6)
    assert clf.text_classifier(COLORS, "tv remote") is weights and len(fake.texts) == 30


def test_classify_takes_the_argmax_colour_over_batches():
    fake = FakeClip()
    clf = ClipColorClassifier(fake, crop_id, fake.tokenize)
    weights = clf.text_classifier(COLORS, "car")
    fake.image_vectors = weights.T * 3.0  # crop id i looks exactly like colour i
    truth = [i % 10 for i in range(20)]  # more than one CLIP batch of 16
    crops = [Image.new("RGB", (4, 4), (20 * i, 0, 0)) for i in truth]
    assert clf.classify(crops, COLORS, "car") == [COLORS[i] for i in truth]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_open_clip_folder_loads_with_quick_gelu_and_its_weights(tiny_clip):
    from open_clip.transformer import QuickGELU
    from safetensors.torch import load_file

    clf = ClipColorClassifier.from_path(tiny_clip)
    assert isinstance(clf.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    saved = load_file(str(tiny_clip / "open_clip_model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in clf.model.state_dict().items())
    assert clf.info["quick_gelu"] and clf.info["templates"] == list(TEMPLATES)


def test_a_cached_hub_repo_id_loads_like_its_folder(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    add_to_hub_cache(tmp_path, "timm/vit_large_patch14_clip_224.openai", tiny_clip)
    cached = ClipColorClassifier.from_path("timm/vit_large_patch14_clip_224.openai")
    local = ClipColorClassifier.from_path(tiny_clip)
    assert all(torch.equal(a, b) for a, b in zip(cached.model.state_dict().values(), local.model.state_dict().values()))


def test_open_clip_predictions_are_colours_deterministic_and_batch_invariant(tiny_clip):
    clf = ClipColorClassifier.from_path(tiny_clip)
    rng = np.random.default_rng(0)
    crops = [Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)) for i in range(5)]
    colors = clf.classify(crops, COLORS, "fire hydrant")
    assert len(colors) == 5 and set(colors) <= set(COLORS)
    assert clf.classify(crops, COLORS, "fire hydrant") == colors
    assert [clf.classify([c], COLORS, "fire hydrant")[0] for c in crops] == colors


def test_a_state_dict_file_loads_for_a_named_architecture(tiny_clip, tmp_path):
    import json

    import open_clip

    config = tmp_path / "tiny-geneval-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    clf = ClipColorClassifier.from_path(tiny_clip / "open_clip_model.safetensors", arch="tiny-geneval-clip")
    assert clf.info["arch"] == "tiny-geneval-clip"
    weights_only = tmp_path / "hub-download"  # the HF repo may hold the open_clip weights without a config
    weights_only.mkdir()
    (weights_only / "open_clip_model.safetensors").symlink_to(tiny_clip / "open_clip_model.safetensors")
    clf = ClipColorClassifier.from_path(weights_only, arch="tiny-geneval-clip")
    assert clf.info["path"].endswith("open_clip_model.safetensors")
    assert isinstance(clf.text_classifier(["red", "blue"], "cup"), torch.Tensor)


def test_bad_clip_paths_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP folder or weights file .*: no such file or folder"):
        ClipColorClassifier.from_path(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        ClipColorClassifier.from_path(tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        ClipColorClassifier.from_path(tmp_path)
    scripted = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ValueError, match="TorchScript"):
        ClipColorClassifier.from_path(scripted)
