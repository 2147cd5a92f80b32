"""Synthetic image-text pairs from the teacher: prompts → PixArt-Sigma samples → WebDataset shards.

    python -m data.generate --pipeline weights/pixart_sigma_base --transformer weights/pixart_sigma_2k \\
        --prompts prompts.txt --out data/synthetic_2k --height 2048 --width 2048 --dtype bf16
    python -m data.generate --tiny --prompts prompts.txt --out runs/tiny_shards      # tiny random teacher, CPU

Each sample stores the image, the caption, the exact latent the sampler produced, the T5 features of the
prompt's valid tokens and JSON metadata (docs/data.md). Sample i uses seed `--seed + i`, so it is the same on any
rank, in any batch and after any restart. Under torchrun or Slurm every rank writes its own shards; a restarted
job skips finished shards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from data.prompts import read_prompts
from data.sample_format import IMAGE_FORMATS, LATENT, TEXT, encode_image, shard_sample, valid_tokens
from data.shard_writer import ShardPlan, check_dataset_info, chunks, write_shards
from models.pretrained import component_folder
from models.runtime import Rank, parse_dtype, pick_device, setup_logging
from models.sampling import TextToImage, to_uint8
from models.tiny import words_of, write_tiny_pipeline

log = logging.getLogger("generate")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pth", ".pt"}
HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines the samples; stored in dataset.json and checked again on every restart."""

    teacher_sha256: str
    prompts_sha256: str
    num_prompts: int
    height: int
    width: int
    steps: int
    cfg: float
    seed: int
    negative_prompt: str
    dtype: str
    image_format: str
    shard_size: int


def teacher_files(path: Path) -> list[Path]:
    """The files that define the teacher transformer: an original checkpoint, or a folder's config and weights."""
    if path.is_file():
        return [path]
    folder = component_folder(path, "transformer")
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    if not files:
        raise FileNotFoundError(f"{folder}: no transformer config or weight files to fingerprint")
    return files


def fingerprint(files: list[Path]) -> str:
    """sha256 over the files' names and contents, read in chunks (a multi-GB checkpoint is never held in memory)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def teacher_samples(pipe: TextToImage, prompts: list[dict], indices: range, settings: GenerationSettings,
                    batch_size: int) -> Iterator[dict]:
    """Shard samples for `indices`, generated in batches that start at the shard's first index (so a rewritten
    shard repeats exactly the same computation)."""
    s = settings
    for batch in chunks(indices, batch_size):
        texts = [prompts[i]["prompt"] for i in batch]
        seeds = [s.seed + i for i in batch]
        features, mask = pipe.text_encoder.encode(texts)
        latents, images = pipe(texts, seeds, s.height, s.width, s.steps, s.cfg, s.negative_prompt, progress=False)
        pixels = to_uint8(images)
        for j, i in enumerate(batch):
            text = valid_tokens(features[j], mask[j])
            metadata = {**prompts[i], "index": i, "seed": seeds[j], "steps": s.steps, "cfg": s.cfg,
                        "height": s.height, "width": s.width, "negative_prompt": s.negative_prompt,
                        "t5_length": len(text), "teacher_sha256": s.teacher_sha256, "dtype": s.dtype}
            yield shard_sample(i, {LATENT: latents[j], TEXT: text}, metadata, caption=texts[j],
                               image=encode_image(pixels[j], s.image_format), image_format=s.image_format)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, help="diffusers-style PixArt-Sigma folder (text_encoder/ "
                        "tokenizer/ vae/, and transformer/ unless --transformer is given)")
    parser.add_argument("--transformer", type=Path, help="teacher transformer folder or original .pth")
    parser.add_argument("--preset", help="architecture preset for an original .pth (e.g. PixArt-Sigma-XL-2-2K-MS)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random teacher (demos and tests)")
    parser.add_argument("--prompts", type=Path, required=True, help=".txt (one a line) or .jsonl ('prompt' field)")
    parser.add_argument("--out", type=Path, required=True, help="shard folder")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's trained size)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (PixArt's default)")
    parser.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (PixArt's default)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--image-format", default="png", choices=sorted(IMAGE_FORMATS))
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (~1 GB at 2048² with PNG)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="teacher dtype")
    args = parser.parse_args(argv)
    if not args.tiny and args.pipeline is None:
        parser.error("give --pipeline (or --tiny)")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    rank = Rank.from_env()
    setup_logging(rank.rank)
    prompts = read_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tiny_folder:
        if args.tiny:
            args.pipeline = write_tiny_pipeline(tiny_folder, words=words_of([r["prompt"] for r in prompts]))
        return generate(args, prompts, rank)


def generate(args: argparse.Namespace, prompts: list[dict], rank: Rank) -> list[Path]:
    """Load the teacher, check the output folder's settings, write this rank's unfinished shards."""
    device = pick_device(args.device)
    pipe = TextToImage.from_paths(args.pipeline, args.transformer, args.preset, device=str(device),
                                  dtype=parse_dtype(args.dtype))
    side = pipe.transformer.config.sample_size * pipe.vae.downsample
    height, width = args.height or side, args.width or side
    pipe.latent_shape(height, width)  # fails early on sizes the model cannot take
    settings = GenerationSettings(
        teacher_sha256=fingerprint(teacher_files(args.transformer or args.pipeline)),
        prompts_sha256=hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest(),
        num_prompts=len(prompts), height=height, width=width, steps=args.steps, cfg=args.cfg, seed=args.seed,
        negative_prompt=args.negative_prompt, dtype=args.dtype, image_format=args.image_format,
        shard_size=args.shard_size)
    args.out.mkdir(parents=True, exist_ok=True)
    check_dataset_info(args.out, asdict(settings))
    started = time.perf_counter()
    written = write_shards(args.out, ShardPlan(len(prompts), args.shard_size), rank,
                           lambda indices: teacher_samples(pipe, prompts, indices, settings, args.batch_size),
                           unit="img")
    log.info("rank %d wrote %d shards to %s in %.1f s (%dx%d, %d steps, CFG %g, teacher %s…)", rank.rank,
             len(written), args.out, time.perf_counter() - started, width, height, args.steps, args.cfg,
             settings.teacher_sha256[:12])
    return written


if __name__ == "__main__":
    main()
