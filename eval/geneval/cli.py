"""GenEval for PixArt-Sigma, plain or grafted: generate the 553 prompts × 4 images, detect, score, report.

    python eval/geneval.py --ckpt EXPORT_OR_TRANSFORMER --pipeline PIXART_SIGMA_FOLDER --out runs/geneval \\
        --detector-path weights/mask2former-swin-small-coco-instance --clip weights/clip-vit-l-14-openai
    python eval/geneval.py --world shapes --out runs/geneval-shapes        # the shipped shapes teacher, exact detector
    python eval/geneval.py --world shapes --ckpt runs/demo/graft/export --metadata my_prompts.jsonl --out ...
    python eval/geneval.py --stage score --images IMAGE_FOLDER --out runs/geneval-other ...   # any image folder
    python eval/geneval.py --from-detections runs/geneval/detections.json --out runs/rescored  # no models

Writes to --out: images/ (official layout + generation.json), detections.json, results.jsonl (official schema),
scores.json, summary.md and grid.png. Rules, weights and known differences from the official harness:
docs/geneval.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from common.files import file_sha256
from common.hub import local_path
from common.lifeline import end_with_launcher
from common.runtime import Rank, parse_dtype, pick_device, setup_logging
from eval.geneval.colours import ClipColorClassifier
from eval.geneval.detections import (
    ColorClassifier,
    Detector,
    ImageDetections,
    detect_images,
    load_detections,
    save_detections,
    storage_threshold,
)
from eval.geneval.detectors import Mask2FormerDetector, MMDetDetector
from eval.geneval.generation import SETTINGS_FILE, GenerationSettings, generate, missing_images
from eval.geneval.layout import list_images
from eval.geneval.prompts import (
    METADATA,
    OBJECT_NAMES,
    TAGS,
    check_records,
    official_file,
    read_metadata,
    read_object_names,
    select_prompts,
)
from eval.geneval.report import write_grid, write_results, write_scores, write_summary
from eval.geneval.rules import ScoringOptions
from eval.geneval.scoring import Summary, prompt_agnostic_baseline, score_image, summarize
from eval.geneval.worlds import WORLDS, get_world
from eval.rank_wait import wait_for
from models import compile as compiling
from models.pretrained import is_grafted
from models.sampling import TextToImage

log = logging.getLogger("geneval")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python eval/geneval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--stage", choices=["all", "generate", "score"], default="all",
                        help="generate and score (default), only generate, or only score an existing image folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--world", choices=["coco", *sorted(WORLDS)], default="coco",
                        help="coco: the official harness (Mask2Former/mmdet + CLIP); shapes: the shapes world, scored "
                        "by its exact detector and colour classifier, with its held-out prompts and shipped teacher "
                        "as defaults")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--ckpt", type=Path, help="the transformer: our export folder (plain or grafted), a diffusers "
                     "transformer folder, or an original .pth (with --preset); default with --world: the pipeline's")
    gen.add_argument("--pipeline", type=Path, help="diffusers-style PixArt-Sigma folder with text_encoder/, "
                     "tokenizer/ and vae/ (and scheduler/); default with --world: the world's shipped teacher")
    gen.add_argument("--preset", help="architecture preset for an original .pth")
    gen.add_argument("--seed", type=int, default=42, help="sample j of every prompt uses seed + j (reference: 42)")
    gen.add_argument("--samples-per-prompt", type=int, default=4)
    gen.add_argument("--batch-size", type=int, default=8, help="keep it fixed when resuming (batches are regenerated "
                     "whole, so a resumed run reproduces an uninterrupted one)")
    gen.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (PixArt-Sigma's default)")
    gen.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (PixArt-Sigma's default)")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's trained size)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="generation dtype")
    compiling.add_argument(gen)

    sel = parser.add_argument_group("prompts")
    sel.add_argument("--metadata", type=Path, help="any prompt file in GenEval's schema (default: the official "
                     "evaluation_metadata.jsonl, fetched and sha256-pinned; with --world, the world's held-out "
                     "prompts). Scores on another file are not comparable with published GenEval numbers")
    sel.add_argument("--object-names", type=Path, help="object_names.txt (default: fetched, sha256-pinned)")
    sel.add_argument("--cache-dir", type=Path, help="where fetched GenEval files are kept (~/.cache/grafting/geneval)")
    sel.add_argument("--tags", nargs="+", choices=TAGS, metavar="TAG", help=f"only these tags ({', '.join(TAGS)})")
    sel.add_argument("--limit", type=int, help="only the first N prompts of each tag (smoke runs)")

    score = parser.add_argument_group("scoring")
    score.add_argument("--images", type=Path, help="image folder in GenEval's layout (default: OUT/images)")
    score.add_argument("--detector", choices=["mask2former", "mmdet"], default="mask2former")
    score.add_argument("--detector-path", type=Path, help="mask2former: local transformers folder of "
                       "facebook/mask2former-swin-small-coco-instance; mmdet: the .pth checkpoint")
    score.add_argument("--mmdet-config", type=Path, help="mmdet 2.x config of the checkpoint (mmdet backend)")
    score.add_argument("--detector-resize", type=int, nargs=2, default=[800, 1333], metavar=("SHORT", "LONG"),
                       help="mask2former backend input size, as mmdet's test pipeline (default 800 1333)")
    score.add_argument("--clip", type=Path, help="open_clip folder of timm/vit_large_patch14_clip_224.openai, or a "
                       "ViT-L-14 state-dict file")
    score.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE",
                       help="the official scoring options: threshold, counting_threshold, max_objects, max_overlap, "
                       "position_threshold, bgcolor, crop (and colors)")
    score.add_argument("--from-detections", type=Path, help="re-score a detections.json (all its images; --tags and "
                       "--limit do not apply); runs no model")
    score.add_argument("--prompt-agnostic-baseline", action=argparse.BooleanOptionalAction, default=True,
                       help="also score every image against every prompt of its tag (default: on)")
    score.add_argument("--rank-wait", type=float, default=6 * 3600,
                       help="seconds rank 0 waits for the other ranks' images before scoring")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    end_with_launcher()  # a worker of a killed torchrun must not go on writing
    args = parse_args(argv)
    rank = Rank.from_env()
    setup_logging(rank.rank)
    options = ScoringOptions.from_pairs(args.options)
    command = shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.from_detections:
        detections, run = load_detections(args.from_detections, options)
        report(detections, options, {**run, "rescored": {"command": command, "from": str(args.from_detections),
                                                         "scoring_options": options.to_dict()}},
               args.out, args.prompt_agnostic_baseline)
        return
    apply_world_defaults(args)
    check_model_args(args)
    images_dir = args.images or args.out / "images"
    if args.stage != "score":
        run_generation(args, images_dir, rank)
        if args.stage == "generate":
            return
    if rank.rank != 0:
        log.info("rank %d done; rank 0 scores", rank.rank)
        return
    run = {"command": command, "world": args.world, "images": str(images_dir),
           "generation": _recorded_generation(images_dir)}
    detections, run = run_detection(args, images_dir, options, run)
    report(detections, options, run, args.out, args.prompt_agnostic_baseline)


def apply_world_defaults(args: argparse.Namespace) -> None:
    """A synthetic world samples its shipped teacher unless told otherwise."""
    if args.world == "coco":
        return
    world = get_world(args.world)
    args.pipeline = args.pipeline or world.teacher
    args.ckpt = args.ckpt or args.pipeline


def check_model_args(args: argparse.Namespace) -> None:
    """Fail before hours of generation, not after, when a model path for a later stage is missing."""
    if args.stage != "score" and (args.ckpt is None or args.pipeline is None):
        raise SystemExit("generation needs --ckpt and --pipeline (or use --stage score on an existing image folder)")
    if args.stage != "generate" and args.world == "coco":
        if args.detector_path is None or args.clip is None:
            raise SystemExit("scoring needs --detector-path and --clip (see docs/geneval.md for the weights)")
        if args.detector == "mmdet" and args.mmdet_config is None:
            raise SystemExit("the mmdet backend needs --mmdet-config (mmdet 2.x configs/mask2former/"
                             "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py)")


def class_names(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The detector's classes, and what to record about where they came from."""
    if args.world != "coco":
        return list(get_world(args.world).class_names), {}
    names_file = official_file(OBJECT_NAMES, args.object_names, args.cache_dir)
    return read_object_names(names_file), {"object_names_sha256": file_sha256(names_file)}


def load_prompts(args: argparse.Namespace) -> list[dict]:
    """The prompt records to generate: `--metadata` (any file in GenEval's schema), else the world's default
    set (COCO: the official file, fetched and sha256-pinned), checked against the detector's classes."""
    if args.metadata is None:
        if args.world == "coco":
            return read_metadata(official_file(METADATA, None, args.cache_dir))
        world = get_world(args.world)
        return world.splits(world.default_split)
    if args.world == "coco" and file_sha256(args.metadata) != METADATA[2]:
        log.warning("%s is not GenEval's official prompt file: its scores are not comparable with published "
                    "GenEval numbers", args.metadata)
    records = read_metadata(args.metadata)
    check_records(records, class_names(args)[0], str(args.metadata))
    return records


def run_generation(args: argparse.Namespace, images_dir: Path, rank: Rank) -> None:
    """This rank's images; rank 0 then waits until every rank's images exist."""
    prompts = select_prompts(list(enumerate(load_prompts(args))), args.tags, args.limit)
    ckpt = local_path(args.ckpt, "--ckpt")
    settings = GenerationSettings(
        ckpt=str(ckpt.resolve()), pipeline=str(local_path(args.pipeline, "--pipeline").resolve()),
        preset=args.preset, grafted=is_grafted(ckpt), seed=args.seed, samples_per_prompt=args.samples_per_prompt,
        steps=args.steps, cfg_scale=args.cfg, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, dtype=args.dtype)

    def load_pipe() -> TextToImage:
        return TextToImage.from_paths(args.pipeline, args.ckpt, args.preset, device=str(pick_device(args.device)),
                                      dtype=parse_dtype(args.dtype), compile=args.compile)

    written = generate(load_pipe, prompts, images_dir, settings, args.batch_size, rank)
    log.info("rank %d wrote %d images to %s", rank.rank, written, images_dir)
    if rank.world_size > 1 and rank.rank == 0 and args.stage == "all":
        wait_for(lambda: missing_images(prompts, images_dir, args.samples_per_prompt), args.rank_wait, "images",
                 "Score later with --stage score")


def _recorded_generation(images_dir: Path) -> dict | None:
    path = images_dir / SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_detection(args: argparse.Namespace, images_dir: Path, options: ScoringOptions,
                  run: dict) -> tuple[list[ImageDetections], dict]:
    """Detect and colour the selected prompts' images; saves detections.json. Returns them and the run record."""
    images = list_images(images_dir)
    folder_prompts = list({img.index: img.metadata for img in images}.items())
    selected = {index for index, _ in select_prompts(folder_prompts, args.tags, args.limit)}
    images = [img for img in images if img.index in selected]
    log.info("scoring %d images of %d prompts in %s", len(images), len(selected), images_dir)
    names, names_record = class_names(args)
    if args.world == "coco":
        device = pick_device(args.device)
        detector = build_detector(args, names, device, storage_threshold(options))
        classifier: ColorClassifier = ClipColorClassifier.from_path(args.clip, device)
    else:
        world = get_world(args.world)
        detector, classifier = world.detector(), world.classifier()
    detections = detect_images(images, detector, classifier, options)
    run = {**run, **names_record, "scoring_options": options.to_dict(), "detector": detector.info,
           "color_classifier": classifier.info}
    save_detections(args.out / "detections.json", detections, options, run)
    return detections, run


def build_detector(args: argparse.Namespace, class_names: list[str], device: torch.device,
                   min_score: float) -> Detector:
    if args.detector == "mmdet":
        return MMDetDetector(args.mmdet_config, args.detector_path, class_names, device)
    shortest, longest = args.detector_resize
    return Mask2FormerDetector.from_path(args.detector_path, class_names, device, shortest, longest, min_score)


def report(detections: Sequence[ImageDetections], options: ScoringOptions, run: dict, out: Path,
           baseline: bool = True) -> Summary:
    """Score stored detections and write results.jsonl, scores.json, summary.md and grid.png."""
    rows = [score_image(d, options) for d in detections]
    summary = summarize(rows, prompt_agnostic_baseline(detections, options) if baseline else None)
    write_results(rows, out / "results.jsonl")
    write_scores(summary, run, out / "scores.json")
    write_summary(summary, run, out / "summary.md")
    write_grid(rows, out / "grid.png")
    log.info("GenEval overall %.5f over %d tags (%s) → %s", summary.overall, len(summary.tags),
             ", ".join(f"{tag} {t.score:.3f}" for tag, t in summary.tags.items()), out)
    return summary


if __name__ == "__main__":
    main()
