"""FID for the ImageNet sibling: class-balanced DiT / grafted-DiT samples, scored like OpenAI's ADM evaluator.

    # 1. sample (resumable; shard over processes with torchrun / srun, each rank takes every W-th chunk)
    torchrun --nproc_per_node 8 -m eval.fid sample --ckpt DiT-XL-2-256x256.pt --vae weights/sd-vae-ft-ema \
        --num-samples 50000 --out runs/fid/dit-xl2
    python -m eval.fid sample --graft configs/sampling/mha_swaps/50p_hyena_y.yaml \
        --ckpt grafted_models/.../model.pt --vae weights/sd-vae-ft-ema --out runs/fid/hyena_y_50p
    # 2. score against ADM's reference batch with the FID Inception weights (local files)
    python -m eval.fid score --samples runs/fid/dit-xl2/samples.npz \
        --ref weights/VIRTUAL_imagenet256_labeled.npz --inception weights/pt_inception-2015-12-05-6726825d.pth

Defaults are the DiT paper's FID-50K protocol: 250 DDPM steps, CFG 1.5 on the first 3 latent channels, seeds
0…N−1. `samples.npz` (`arr_0` uint8 (N, H, W, 3), `arr_1` labels) is also what ADM's own evaluator reads.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.files import check_or_record, file_sha256, save_json, save_text
from common.hub import local_path
from common.lifeline import end_with_launcher
from common.runtime import Rank, parse_dtype, pick_device, setup_logging
from common.tables import markdown_table
from eval.dit_args import add_dit_checkpoint_args, arch_overrides, dit_from_args
from eval.fid.inception import InceptionFeatures, load_fid_inception
from eval.fid.metrics import frechet_distance, gaussian_stats, inception_score, precision_recall
from eval.fid.npz import IMAGES_KEY, iter_npz_batches, npz_array_shape
from eval.fid.sampling import (
    SAMPLES_FILE,
    SETTINGS_FILE,
    SamplingSettings,
    missing_chunks,
    pack_if_complete,
    sample_chunks,
)
from eval.rank_wait import wait_for
from models import compile as compiling
from models.pretrained import model_sha256
from models.vae import LatentVAE

log = logging.getLogger("fid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.fid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="draw class-balanced samples into chunks, then samples.npz")
    add_dit_checkpoint_args(sample)
    sample.add_argument("--vae", type=Path, required=True, help="sd-vae-ft-ema folder (DiT's FID decoder)")
    sample.add_argument("--out", type=Path, required=True, help="folder for chunks/, sampling.json, samples.npz")
    sample.add_argument("--num-samples", type=int, default=50_000, help="a multiple of the number of classes")
    sample.add_argument("--chunk-size", type=int, default=250, help="samples per resumable chunk file")
    sample.add_argument("--batch-size", type=int, default=125, help="samples per forward (doubled by CFG)")
    sample.add_argument("--steps", type=int, default=250)
    sample.add_argument("--cfg", type=float, default=1.5)
    sample.add_argument("--guide-all-channels", action="store_true",
                        help="guide all latent channels (diffusers) instead of the first 3 (original DiT)")
    sample.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    compiling.add_argument(sample)
    sample.add_argument("--rank-wait", type=float, default=6 * 3600,
                        help="seconds rank 0 waits for the other ranks' chunks before packing")

    score = sub.add_parser("score", help="FID, sFID, IS, precision and recall of samples.npz")
    score.add_argument("--samples", type=Path, required=True, help="ADM-format .npz (arr_0 uint8 N×H×W×3)")
    score.add_argument("--ref", type=Path, required=True,
                       help="ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz "
                       "(arr_0, mu, sigma, mu_s, sigma_s)")
    score.add_argument("--inception", type=Path, required=True, help="pt_inception-2015-12-05-6726825d.pth")
    score.add_argument("--out", type=Path, help="results JSON (default: fid_results.json beside the samples)")
    score.add_argument("--batch-size", type=int, default=100)
    score.add_argument("--device", default="auto")
    return parser.parse_args(argv)


def run_sample(args: argparse.Namespace) -> Path | None:
    """Draw this rank's chunks; rank 0 then waits for the other ranks' chunks and packs samples.npz."""
    rank = Rank.from_env()
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    arch = arch_overrides(args)
    model = dit_from_args(args, dtype).to(device)
    if args.compile:
        compiling.for_inference(model)
    vae = LatentVAE(args.vae, device=device, dtype=dtype)
    settings = SamplingSettings(
        checkpoint=str(local_path(args.ckpt).resolve()), checkpoint_sha256=model_sha256(args.ckpt, "transformer"),
        graft=str(args.graft.resolve()) if args.graft else None,
        graft_sha256=file_sha256(args.graft) if args.graft else None, preset=args.preset, arch=arch,
        vae_sha256=model_sha256(args.vae, "vae"),
        num_samples=args.num_samples, num_classes=model.config.num_classes,
        image_size=model.config.input_size * vae.downsample, steps=args.steps, cfg_scale=args.cfg,
        guidance_channels=None if args.guide_all_channels else 3, seed=args.seed, chunk_size=args.chunk_size,
        dtype=args.dtype)
    check_or_record(args.out / SETTINGS_FILE, asdict(settings), "FID samples")
    sample_chunks(model, vae, settings, args.out, args.batch_size, device, rank)
    if rank.rank != 0:
        log.info("rank %d: its chunks are done; rank 0 packs %s once every chunk exists", rank.rank,
                 args.out / SAMPLES_FILE)
        return None
    if rank.world_size > 1:
        wait_for(lambda: missing_chunks(args.out, settings), args.rank_wait, "chunks",
                 "Rerun this command (any world size) later to pack them: finished chunks are not drawn again")
    return pack_if_complete(args.out, settings)


def reference_statistics(ref: Path, features: dict[str, np.ndarray] | None, layer: str
                         ) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu, sigma, source) for `pool` (mu/sigma) or `spatial` (mu_s/sigma_s): stored ones when the file has them
    (ADM computed them with its TF graph), else fitted to the reference images' features."""
    mu_key, sigma_key = ("mu", "sigma") if layer == "pool" else ("mu_s", "sigma_s")
    with np.load(ref) as data:
        if mu_key in data.files and sigma_key in data.files:
            return data[mu_key], data[sigma_key], f"{ref.name}:{mu_key},{sigma_key}"
    if features is None:
        raise ValueError(f"{ref}: has neither {mu_key}/{sigma_key} nor images ({IMAGES_KEY}) to compute them from")
    return *gaussian_stats(features[layer]), f"{ref.name}:{IMAGES_KEY} features"


def run_score(args: argparse.Namespace) -> dict:
    """Inception features of samples (and reference images) → metrics JSON and a Markdown table."""
    device = pick_device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would perturb the Inception features
    inception = local_path(args.inception, "Inception weights")
    extractor = InceptionFeatures(load_fid_inception(inception), device)
    shape, _ = npz_array_shape(args.samples)
    fake = extractor.extract(iter_npz_batches(args.samples, args.batch_size), shape[0], desc="samples")
    with np.load(args.ref) as data:
        has_images = IMAGES_KEY in data.files
    real = None
    if has_images:
        ref_shape, _ = npz_array_shape(args.ref)
        real = extractor.extract(iter_npz_batches(args.ref, args.batch_size), ref_shape[0], desc="reference")
    else:
        log.warning("%s holds no reference images (%s): precision and recall are skipped", args.ref, IMAGES_KEY)

    mu, sigma, pool_source = reference_statistics(args.ref, real, "pool")
    mu_s, sigma_s, spatial_source = reference_statistics(args.ref, real, "spatial")
    metrics = {
        "fid": frechet_distance(*gaussian_stats(fake["pool"]), mu, sigma),
        "sfid": frechet_distance(*gaussian_stats(fake["spatial"]), mu_s, sigma_s),
        "inception_score": inception_score(fake["logits"]),
    }
    if real is not None:
        metrics["precision"], metrics["recall"] = precision_recall(real["pool"], fake["pool"], device=device)
    results = {
        "metrics": metrics,
        "samples": str(args.samples), "num_samples": int(shape[0]), "image_size": list(shape[1:3]),
        "reference": str(args.ref), "num_reference_images": None if real is None else len(real["pool"]),
        "reference_statistics": {"fid": pool_source, "sfid": spatial_source},
        "inception": str(args.inception), "inception_sha256": file_sha256(inception),
    }
    out = args.out or args.samples.with_name("fid_results.json")
    save_json(results, out)
    headers, row = metrics_row(metrics, int(shape[0]))
    table = markdown_table(headers, [row], align="r" * len(headers))
    save_text(table + "\n", out.with_suffix(".md"))
    print(table)
    log.info("wrote %s and %s", out, out.with_suffix(".md"))
    return results


def metrics_row(metrics: dict[str, float], num_samples: int) -> tuple[list[str], list[float | int]]:
    """Headers and the one row of the paper-style table (FID, sFID, IS, precision, recall)."""
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Precision", "recall": "Recall"}
    shown = [k for k in names if k in metrics]
    return ["samples"] + [names[k] for k in shown], [num_samples] + [float(metrics[k]) for k in shown]


def main(argv: list[str] | None = None) -> Path | None | dict:
    end_with_launcher()  # a worker of a killed torchrun must not go on writing
    args = parse_args(argv)
    setup_logging(Rank.from_env().rank)
    return run_sample(args) if args.command == "sample" else run_score(args)


if __name__ == "__main__":
    main()
