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
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import check_or_record, json_sha256
from common.lifeline import end_with_launcher
from common.runtime import Rank, parse_dtype, pick_device, setup_logging
from data.prompts import read_prompts
from data.sample_format import IMAGE_FORMATS, LATENT, TEXT, encode_image, shard_sample, valid_tokens
from data.shard_writer import DATASET_INFO, ShardPlan, chunks, write_shards
from models import compile as compiling
from models.pretrained import model_sha256
from models.sampling import TextToImage, to_uint8
from models.tiny import words_of, write_tiny_pipeline

log = logging.getLogger("generate")


@dataclass(frozen=True)
class TeacherDataSettings:
    """Everything that determines the samples; stored in dataset.json and checked again on every restart."""

    teacher_sha256: str
    text_encoder_sha256: str  # T5 encoder and tokenizer files
    vae_sha256: str
    preset: str | None
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


def teacher_samples(pipe: TextToImage, prompts: list[dict], indices: range, settings: TeacherDataSettings,
                    batch_size: int) -> Iterator[dict]:
    """Shard samples for `indices`, generated in batches that start at the shard's first index (so a rewritten
    shard repeats exactly the same computation)."""
    for batch in chunks(indices, batch_size):
        texts = [prompts[i]["prompt"] for i in batch]
        seeds = [settings.seed + i for i in batch]
        features, mask = pipe.text_encoder.encode(texts)
        latents, images = pipe(texts, seeds, settings.height, settings.width, settings.steps, settings.cfg,
                               settings.negative_prompt, progress=False)
        pixels = to_uint8(images)
        for j, i in enumerate(batch):
            text = valid_tokens(features[j], mask[j])
            metadata = {**prompts[i], "index": i, "seed": seeds[j], "steps": settings.steps, "cfg": settings.cfg,
                        "height": settings.height, "width": settings.width,
                        "negative_prompt": settings.negative_prompt, "t5_length": len(text),
                        "teacher_sha256": settings.teacher_sha256, "dtype": settings.dtype}
            yield shard_sample(i, {LATENT: latents[j], TEXT: text}, metadata, caption=texts[j],
                               image=encode_image(pixels[j], settings.image_format),
                               image_format=settings.image_format)


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
    compiling.add_argument(parser)
    args = parser.parse_args(argv)
    if not args.tiny and args.pipeline is None:
        parser.error("give --pipeline (or --tiny)")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    end_with_launcher()  # a worker of a killed torchrun must not go on writing
    args = parse_args(argv)
    rank = Rank.from_env()
    setup_logging(rank.rank)
    prompts = read_prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tiny_folder:
        pipeline = (write_tiny_pipeline(tiny_folder, words=words_of([r["prompt"] for r in prompts])) if args.tiny
                    else args.pipeline)
        return generate(prompts, args.out, rank, pipeline, transformer=args.transformer, preset=args.preset,
                        height=args.height, width=args.width, steps=args.steps, cfg=args.cfg,
                        negative_prompt=args.negative_prompt, seed=args.seed, image_format=args.image_format,
                        shard_size=args.shard_size, batch_size=args.batch_size, device=args.device,
                        dtype=args.dtype, compile=args.compile)


def generate(prompts: list[dict], out: Path, rank: Rank, pipeline: Path, *, transformer: Path | None = None,
             preset: str | None = None, height: int | None = None, width: int | None = None, steps: int = 20,
             cfg: float = 4.5, negative_prompt: str = "", seed: int = 0, image_format: str = "png",
             shard_size: int = 100, batch_size: int = 4, device: str = "auto", dtype: str = "fp32",
             compile: bool = False) -> list[Path]:
    """Load the teacher, check the output folder's settings, write this rank's unfinished shards. `height` and
    `width` default to the transformer's trained size; `compile` runs it under torch.compile."""
    pipe = TextToImage.from_paths(pipeline, transformer, preset, device=str(pick_device(device)),
                                  dtype=parse_dtype(dtype), compile=compile)
    side = pipe.transformer.config.sample_size * pipe.vae.downsample
    height, width = height or side, width or side
    pipe.latent_shape(height, width)  # fails early on sizes the model cannot take
    settings = TeacherDataSettings(
        teacher_sha256=model_sha256(transformer or pipeline, "transformer"),
        text_encoder_sha256=model_sha256(pipeline, "text_encoder", "tokenizer"),
        vae_sha256=model_sha256(pipeline, "vae"), preset=preset, prompts_sha256=json_sha256(prompts),
        num_prompts=len(prompts), height=height, width=width, steps=steps, cfg=cfg, seed=seed,
        negative_prompt=negative_prompt, dtype=dtype, image_format=image_format, shard_size=shard_size)
    out.mkdir(parents=True, exist_ok=True)
    check_or_record(out / DATASET_INFO, asdict(settings), "shards")
    started = time.perf_counter()
    written = write_shards(out, ShardPlan(len(prompts), shard_size), rank,
                           lambda indices: teacher_samples(pipe, prompts, indices, settings, batch_size),
                           unit="img")
    log.info("rank %d wrote %d shards to %s in %.1f s (%dx%d, %d steps, CFG %g, teacher %s…)", rank.rank,
             len(written), out, time.perf_counter() - started, width, height, steps, cfg,
             settings.teacher_sha256[:12])
    return written


if __name__ == "__main__":
    main()
