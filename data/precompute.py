"""VAE latents (and T5 features) as shards, for data you already have, so training never runs the VAE or T5.

    python -m data.precompute images --images imagenet/train --vae weights/sd-vae-ft-ema \\
        --out data/imagenet_256 --resolution 256 --flip                      # class folders → DiT recipes
    python -m data.precompute pairs --pairs captions.jsonl --vae weights/pixart_sigma_base \\
        --text-encoder weights/pixart_sigma_base --out data/pairs_1024 --resolution 1024   # → PixArt recipes

`images`: a folder of class folders (ImageNet style: every subfolder is a class, label = index of the folder name
in sorted order, written to classes.json; a flat folder of images is refused, since its shards would have no
labels). `pairs`: a folder of images each with a same-named .txt caption, or a .jsonl of {"image": path relative
to the file, "caption": text}. Images are center-cropped to a square (as DiT's ADM pipeline does); `--flip` also
stores the mirrored image's latent, which the reader can pick at random. Item i's VAE posterior sample uses seed
`--seed + i`. Shards, restarts and ranks work as in data.generate. Unreadable images are skipped, counted and
logged.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from common.files import check_or_record, json_sha256, save_json
from common.lifeline import end_with_launcher
from common.runtime import Rank, parse_dtype, pick_device, setup_logging
from data.image_prep import IMAGE_SUFFIXES, is_image, load_square
from data.prompts import read_jsonl
from data.sample_format import LATENT, LATENT_FLIP, TEXT, shard_sample, valid_tokens
from data.shard_writer import DATASET_INFO, ShardPlan, chunks, write_shards
from data.skips import SkipCounter
from models.pretrained import model_sha256
from models.text_encoder import T5TextEncoder
from models.vae import LatentVAE

log = logging.getLogger("precompute")
CLASSES_FILE = "classes.json"


def list_images(root: Path) -> tuple[list[dict], list[str]]:
    """Items {path, label, class_name} in a fixed order, and the class names: every subfolder of `root` is a
    class, and its label is its position in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    top = sorted(p.name for p in root.iterdir() if is_image(p))
    if top:
        raise ValueError(f"{root} holds images directly ({', '.join(top[:3])}{', …' if len(top) > 3 else ''}); "
                         "`images` needs one subfolder of images per class (their shards carry the labels). Move "
                         "the images into class subfolders, or use `pairs` for images with captions")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root}: no class folders; `images` needs one subfolder of images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}) per class")
    items = [{"path": str(p.relative_to(root)), "label": label, "class_name": folder.name}
             for label, folder in enumerate(folders) for p in sorted(folder.iterdir()) if is_image(p)]
    empty = sorted({f.name for f in folders} - {item["class_name"] for item in items})
    if empty:
        raise ValueError(f"{root}: class folders without images: {empty}; every subfolder is a class, so an empty "
                         "one would shift the labels of the classes after it. Add its images or remove it")
    return items, [f.name for f in folders]


def list_pairs(source: Path, skips: SkipCounter) -> tuple[Path, list[dict]]:
    """(image root, items {path, caption}) from a .jsonl file or a folder of images with .txt captions."""
    if source.suffix == ".jsonl":
        items = []
        for n, record in read_jsonl(source):
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("image", "caption")):
                raise ValueError(f"{source}:{n}: each line needs string 'image' and 'caption' fields")
            items.append({"path": record["image"], "caption": record["caption"]})
        return source.parent, items
    if not source.is_dir():
        raise FileNotFoundError(f"pairs not found: {source} (give a folder or a .jsonl file)")
    items = []
    for image in sorted(p for p in source.iterdir() if is_image(p)):
        caption = image.with_suffix(".txt")
        if caption.is_file():
            items.append({"path": image.name, "caption": caption.read_text(encoding="utf-8").strip()})
        else:
            skips.skip("no_caption", f"{image} has no {caption.name}")
    return source, items


def precomputed_samples(root: Path, items: list[dict], indices: range, vae: LatentVAE, t5: T5TextEncoder | None,
                        skips: SkipCounter, *, resolution: int, latent: str, seed: int, flip: bool,
                        batch_size: int) -> Iterator[dict]:
    """Shard samples for `indices`; batches start at the shard's first index, so a rewrite repeats them exactly.
    `latent` is `sample` (a posterior sample, seed `seed + index`) or `mean`. Metadata keeps the item's fields
    (source path, caption or label and class name)."""
    for batch in chunks(indices, batch_size):
        images, kept = [], []
        for i in batch:
            try:
                images.append(load_square(root / items[i]["path"], resolution))
                kept.append(i)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                skips.skip("unreadable_image", f"{root / items[i]['path']}: {err}")
        if not kept:
            continue
        pixels = torch.stack(images)
        sample = latent == "sample"
        generators = [torch.Generator().manual_seed(seed + i) for i in kept] if sample else None  # one per image
        latents = vae.encode(pixels, sample=sample, generator=generators).cpu()
        flipped = vae.encode(pixels.flip(-1), sample=sample, generator=generators).cpu() if flip else None
        if t5 is not None:
            features, mask = t5.encode([items[i]["caption"] for i in kept])
        for j, i in enumerate(kept):
            item = items[i]
            tensors = {LATENT: latents[j]}
            metadata = {**item, "index": i, "resolution": resolution, "latent": latent, "seed": seed + i}
            if flipped is not None:
                tensors[LATENT_FLIP] = flipped[j]
            if t5 is not None:
                tensors[TEXT] = valid_tokens(features[j], mask[j])
                metadata["t5_length"] = len(tensors[TEXT])
            yield shard_sample(i, tensors, metadata, caption=item.get("caption"), label=item.get("label"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vae", type=Path, required=True, help="VAE folder (or a pipeline folder with vae/)")
    common.add_argument("--out", type=Path, required=True, help="shard folder")
    common.add_argument("--resolution", type=int, required=True, help="square side in pixels")
    common.add_argument("--latent", choices=["sample", "mean"], default="sample",
                        help="store a posterior sample (seed + index) or the posterior mean")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--shard-size", type=int, default=1000)
    common.add_argument("--batch-size", type=int, default=32)
    common.add_argument("--device", default="auto")
    common.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    images = sub.add_parser("images", parents=[common], help="class folders → labelled latents (a flat folder "
                            "has no labels: use pairs for captioned images)")
    images.add_argument("--images", type=Path, required=True, help="a folder with one subfolder of images per class")
    images.add_argument("--flip", action="store_true", help="also store the horizontally flipped image's latent")
    pairs = sub.add_parser("pairs", parents=[common], help="image-caption pairs → latents + T5 features "
                           "(no --flip: mirroring breaks captions that say left or right)")
    pairs.add_argument("--pairs", type=Path, required=True, help="folder of images + .txt captions, or .jsonl")
    pairs.add_argument("--text-encoder", type=Path, required=True, help="T5 folder (or a pipeline folder)")
    pairs.add_argument("--max-length", type=int, default=300, help="T5 tokens (PixArt-Sigma: 300)")
    pairs.set_defaults(flip=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    end_with_launcher()  # a worker of a killed torchrun must not go on writing
    args = parse_args(argv)
    rank = Rank.from_env()
    setup_logging(rank.rank)
    skips = SkipCounter(log)
    if args.source == "images":
        root, (items, classes) = args.images, list_images(args.images)
    else:
        (root, items), classes = list_pairs(args.pairs, skips), None
        if not items:
            raise ValueError(f"no image-caption pairs in {args.pairs}")
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    vae = LatentVAE(args.vae, device=device, dtype=dtype)
    settings = {"source": args.source, "items": len(items), "items_sha256": json_sha256(items),
                "resolution": args.resolution, "latent": args.latent, "seed": args.seed, "flip": args.flip,
                "vae_sha256": model_sha256(args.vae, "vae"), "vae_scaling_factor": vae.scaling_factor,
                "dtype": args.dtype, "shard_size": args.shard_size}
    t5 = None
    if args.source == "pairs":
        t5 = T5TextEncoder(args.text_encoder, args.max_length, device, dtype)
        settings.update(text_encoder_sha256=model_sha256(args.text_encoder, "text_encoder", "tokenizer"),
                        max_length=args.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    check_or_record(args.out / DATASET_INFO, settings, "shards")
    if classes is not None:
        save_json({"classes": classes}, args.out / CLASSES_FILE)
    written = write_shards(args.out, ShardPlan(len(items), args.shard_size), rank, lambda indices: (
        precomputed_samples(root, items, indices, vae, t5, skips, resolution=args.resolution, latent=args.latent,
                            seed=args.seed, flip=args.flip, batch_size=args.batch_size)))
    log.info("rank %d wrote %d shards to %s (%d items skipped: %s)", rank.rank, len(written), args.out,
             skips.total, dict(skips.counts))
    return written


if __name__ == "__main__":
    main()
