"""Feature precompute on tiny folders of PNGs with the tiny VAE and T5: labels, flips, captions, exact latents."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import precompute
from data.image_prep import center_crop, load_square
from data.reader import ReaderConfig, ShardLoader
from models.text_encoder import T5TextEncoder
from models.tiny import build_vae
from models.vae import LatentVAE

RES = 32


def write_png(path, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def read(folder, **config) -> tuple[dict[str, dict], ShardLoader]:
    loader = ShardLoader(ReaderConfig(shards=[str(folder)], batch_size=1, epochs=1, num_workers=0, **config))
    return {b["keys"][0]: b for b in loader}, loader


def test_center_crop_is_a_central_square():
    image = Image.fromarray(np.arange(200 * 90 * 3, dtype=np.uint8).reshape(90, 200, 3))
    assert center_crop(image, 32).size == (32, 32)
    assert center_crop(Image.new("RGB", (300, 700)), 64).size == (64, 64)


def test_class_folders_become_labelled_latent_shards(tmp_path, tiny_pipeline):
    images = tmp_path / "images"
    for c, name in enumerate(["zebra", "apple"]):  # labels follow sorted folder names: apple 0, zebra 1
        for k in range(3):
            write_png(images / name / f"{k}.png", 10 * c + k, (40 + 7 * k, 36))
    (images / "apple" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "latents"
    precompute.main(["images", "--images", str(images), "--vae", str(tiny_pipeline), "--out", str(out),
                     "--resolution", str(RES), "--flip", "--shard-size", "3", "--batch-size", "2", "--seed", "5"])
    assert json.loads((out / "classes.json").read_text()) == {"classes": ["apple", "zebra"]}
    items, _ = precompute.list_images(images)
    assert [i["path"] for i in items][:2] == ["apple/0.png", "apple/1.png"] and len(items) == 7

    samples, loader = read(out)
    assert loader.config.kind == "class" and len(samples) == 6  # broken.png skipped
    vae = LatentVAE(tiny_pipeline)
    for i, item in enumerate(items):
        if item["path"].endswith("broken.png"):
            assert f"{i:09d}" not in samples
            continue
        sample = samples[f"{i:09d}"]
        assert sample["label"].item() == item["label"]
        pixels = load_square(images / item["path"], RES)[None]
        generator = [torch.Generator().manual_seed(5 + i)]
        expected = vae.encode(pixels, sample=True, generator=generator)
        flipped = vae.encode(pixels.flip(-1), sample=True, generator=generator)
        assert torch.equal(sample["latent"], expected.bfloat16())
        assert not torch.equal(sample["latent"], flipped.bfloat16())
    flips, _ = read(out, flip=True, seed=1)
    assert any(not torch.equal(flips[k]["latent"], samples[k]["latent"]) for k in samples)

    assert len(json.loads((out / "dataset.json").read_text())["vae_sha256"]) == 64
    build_vae(seed=1).save_pretrained(tmp_path / "other_vae")  # same config and scaling, other weights
    with pytest.raises(ValueError, match=r"\(vae_sha256: [^,]*\);"):
        precompute.main(["images", "--images", str(images), "--vae", str(tmp_path / "other_vae"), "--out", str(out),
                         "--resolution", str(RES), "--flip", "--shard-size", "3", "--batch-size", "2", "--seed", "5"])


def test_images_need_class_folders_each_with_images(tmp_path):
    flat = tmp_path / "flat"
    write_png(flat / "0.png", 0, (32, 32))
    with pytest.raises(ValueError, match="class subfolders, or use `pairs`"):
        precompute.list_images(flat)
    (flat / "0.png").unlink()
    with pytest.raises(ValueError, match="no class folders"):
        precompute.list_images(flat)
    for name in ("cat", "dog"):
        write_png(flat / name / "0.png", 0, (32, 32))
    (flat / "bird").mkdir()  # sorts first: dropping it would shift every label
    with pytest.raises(ValueError, match=r"without images: \['bird'\]"):
        precompute.list_images(flat)
    write_png(flat / "bird" / "0.png", 0, (32, 32))
    items, classes = precompute.list_images(flat)
    assert classes == ["bird", "cat", "dog"] and [i["label"] for i in items] == [0, 1, 2]


@pytest.mark.parametrize("source", ["folder", "jsonl"])
def test_image_caption_pairs_become_latent_and_t5_shards(tmp_path, tiny_pipeline, source):
    pairs = tmp_path / "pairs"
    captions = ["a red cat", "two dogs on the left", "a blue car"]
    for k, caption in enumerate(captions):
        write_png(pairs / f"{k}.png", k, (48, 40))
        (pairs / f"{k}.txt").write_text(caption)
    write_png(pairs / "uncaptioned.png", 9, (40, 40))
    if source == "jsonl":
        lines = [json.dumps({"image": f"pairs/{k}.png", "caption": c}) for k, c in enumerate(captions)]
        (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    given = pairs if source == "folder" else tmp_path / "pairs.jsonl"
    out = tmp_path / "shards"
    precompute.main(["pairs", "--pairs", str(given), "--vae", str(tiny_pipeline), "--text-encoder",
                     str(tiny_pipeline), "--out", str(out), "--resolution", str(RES), "--latent", "mean",
                     "--shard-size", "2", "--batch-size", "2"])
    samples, loader = read(out)
    assert loader.config.kind == "text" and len(samples) == 3
    t5 = T5TextEncoder(tiny_pipeline)
    vae = LatentVAE(tiny_pipeline)
    features, mask = t5.encode(captions)
    for k in range(3):
        sample, n = samples[f"{k:09d}"], int(mask[k].sum())
        assert int(sample["text_mask"].sum()) == n
        assert torch.equal(sample["text"][0, :n], features[k, :n].bfloat16())
        expected = vae.encode(load_square(pairs / f"{k}.png", RES)[None], sample=False)
        assert torch.equal(sample["latent"], expected.bfloat16())

    recorded = json.loads((out / "dataset.json").read_text())
    assert recorded["max_length"] == 300 and len(recorded["text_encoder_sha256"]) == 64
    with pytest.raises(ValueError, match=r"\(max_length: 300 → 16\);"):
        precompute.main(["pairs", "--pairs", str(given), "--vae", str(tiny_pipeline), "--text-encoder",
                         str(tiny_pipeline), "--out", str(out), "--resolution", str(RES), "--latent", "mean",
                         "--shard-size", "2", "--batch-size", "2", "--max-length", "16"])
