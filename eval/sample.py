"""Sample images from PixArt-Sigma (prompts → PNGs + grid) or DiT (class labels → PNGs + grid).

    python -m eval.sample pixart --pipeline PIXART_SIGMA_FOLDER --prompt "a red apple" --out runs/samples
    python -m eval.sample pixart --tiny --out runs/demo          # tiny random models, CPU, seconds
    python -m eval.sample dit --ckpt DiT-XL-2-256x256.pt --vae SD_VAE_FOLDER --classes 207 360 --out runs/dit
    python -m eval.sample dit --graft 50p_hyena_y.yaml --ckpt model.pt --vae SD_VAE_FOLDER --cfg 4.0 --out runs/g

`--graft` takes our graft spec or one of the paper's sampling YAMLs (its dit_model_name and image_size then set
the architecture); `--arch key=value ...` overrides the architecture (and the operators' width follows it).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.files import save_text
from common.runtime import parse_dtype, pick_device, setup_logging
from data.prompts import read_prompts
from eval.dit_args import DIT_SAMPLE_CLASSES, add_dit_checkpoint_args, dit_from_args
from models import compile as compiling
from models.sampling import TextToImage, image_grid, sample_dit, save_png, seeded_noise, to_uint8
from models.tiny import words_of, write_tiny_pipeline
from models.vae import LatentVAE

log = logging.getLogger("sample")
GRID_MAX = 64  # images shown in grid.png
DEMO_PROMPTS = ["a red circle above a blue square", "two yellow triangles", "a photo of a cat next to a tree",
                "a green apple on the left of a cup"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="output folder")
    common.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    common.add_argument("--batch-size", type=int, default=4)
    common.add_argument("--device", default="auto")
    common.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    compiling.add_argument(common)

    px = sub.add_parser("pixart", parents=[common], help="text-to-image with PixArt-Sigma")
    px.add_argument("--pipeline", type=Path, help="diffusers-style folder with text_encoder/ tokenizer/ vae/ "
                    "(and transformer/ unless --transformer is given)")
    px.add_argument("--transformer", type=Path, help="transformer folder or original .pth (default: pipeline's)")
    px.add_argument("--preset", help="architecture preset for an original .pth (e.g. PixArt-Sigma-XL-2-2K-MS)")
    px.add_argument("--tiny", action="store_true", help="build and use a tiny random pipeline (CPU demo)")
    px.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    px.add_argument("--prompts", type=Path, help="prompt file: .txt (one a line) or .jsonl ('prompt' field)")
    px.add_argument("--height", type=int, default=None, help="pixels (default: the model's trained size)")
    px.add_argument("--width", type=int, default=None)
    px.add_argument("--steps", type=int, default=20)
    px.add_argument("--cfg", type=float, default=4.5)
    px.add_argument("--negative-prompt", default="")

    dit = sub.add_parser("dit", parents=[common], help="class-conditional ImageNet sampling with DiT")
    add_dit_checkpoint_args(dit)
    dit.add_argument("--vae", type=Path, required=True, help="sd-vae-ft-ema / ft-mse folder")
    dit.add_argument("--classes", type=int, nargs="+", default=list(DIT_SAMPLE_CLASSES),
                     help="ImageNet class ids (default: the DiT paper's sample classes)")
    dit.add_argument("--steps", type=int, default=250)
    dit.add_argument("--cfg", type=float, default=4.0, help="4.0 for visuals, 1.5 for FID")
    dit.add_argument("--guide-all-channels", action="store_true",
                     help="guide all latent channels (diffusers) instead of the first 3 (original DiT)")
    return parser.parse_args(argv)


def run_pixart(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, writer: SampleWriter) -> None:
    prompts = [{"prompt": p} for p in args.prompt]
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if args.tiny:
        prompts = prompts or [{"prompt": p} for p in DEMO_PROMPTS]
        args.pipeline = write_tiny_pipeline(args.out / "tiny-pipeline", words=words_of([r["prompt"] for r in prompts]))
        log.info("wrote a tiny random PixArt-Sigma pipeline to %s", args.pipeline)
    if args.pipeline is None or not prompts:
        raise SystemExit("pixart: give --pipeline (or --tiny) and at least one --prompt or --prompts file")
    pipe = TextToImage.from_paths(args.pipeline, args.transformer, args.preset, device=str(device), dtype=dtype,
                                  compile=args.compile)
    side = pipe.transformer.config.sample_size * pipe.vae.downsample
    height, width = args.height or side, args.width or side
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="batches"):
        batch = prompts[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        _, images = pipe([r["prompt"] for r in batch], seeds, height, width, args.steps, args.cfg,
                         args.negative_prompt)
        writer.add(to_uint8(images), [{**r, "seed": s} for r, s in zip(batch, seeds)])


def run_dit(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, writer: SampleWriter) -> None:
    model = dit_from_args(args, dtype).to(device)
    if args.compile:
        compiling.for_inference(model)
    vae = LatentVAE(args.vae, device=device, dtype=dtype)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    for start in tqdm(range(0, len(args.classes), args.batch_size), desc="batches"):
        labels = args.classes[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(labels))]
        noise = seeded_noise(seeds, shape, device=device)
        latents = sample_dit(model, noise, torch.tensor(labels, device=device), args.steps, args.cfg,
                             None if args.guide_all_channels else 3, seeds=seeds)
        meta = [{"class": c, "seed": s} for c, s in zip(labels, seeds)]
        writer.add(to_uint8(vae.decode(latents)), meta)


class SampleWriter:
    """PNG per sample, `samples.jsonl` with each sample's settings, and `grid.png` of the first images."""

    def __init__(self, out: Path):
        self.out, self.records, self.grid = out, [], []

    def add(self, images: torch.Tensor, meta: list[dict]) -> None:
        for image, record in zip(images, meta):
            name = f"images/{len(self.records):05d}.png"
            save_png(image, self.out / name)
            self.records.append({**record, "file": name})
            if len(self.grid) < GRID_MAX:
                self.grid.append(image)

    def close(self) -> None:
        save_png(image_grid(torch.stack(self.grid)), self.out / "grid.png")
        save_text("".join(json.dumps(r) + "\n" for r in self.records), self.out / "samples.jsonl")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    started = time.perf_counter()
    writer = SampleWriter(args.out)
    (run_pixart if args.model == "pixart" else run_dit)(args, device, dtype, writer)
    writer.close()
    log.info("%d images in %.1f s → %s (grid.png, samples.jsonl)", len(writer.records),
             time.perf_counter() - started, args.out)


if __name__ == "__main__":
    main()
