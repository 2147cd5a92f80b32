"""Fidelity of a model to its teacher: the same prompts and seeds through both, compared image by image.

    python -m eval.fidelity --reference runs/demo/geneval/teacher --candidate runs/demo/geneval/graft \\
        --world shapes --out runs/demo/fidelity

Both folders are GenEval runs (or their `images/` folders) of the same prompt set with the same seeds. For every
pair of images with the same prompt index and sample number:
- **detections match** when the two images hold the same objects: the same multiset of (class, colour), and the
  same GenEval relations (left of, right of, above, below) between every pair of them. Objects are the world
  detector's, kept at the prompt tag's GenEval threshold (0.9 for counting, 0.3 otherwise), every one coloured;
- **PSNR** of the decoded 8-bit images.
This measures what a graft preserves even where the teacher itself is wrong.
"""
from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.files import save_json, save_text
from common.runtime import setup_logging
from common.tables import markdown_table
from eval.geneval.colours import object_crop
from eval.geneval.detections import ColorClassifier, Detector
from eval.geneval.layout import GeneratedImage, list_images
from eval.geneval.prompts import tag_order
from eval.geneval.rules import ScoringOptions, rank_detections, relative_position, select_detections
from eval.geneval.worlds import WORLDS, get_world
from models.sampling import image_grid, save_png

log = logging.getLogger("fidelity")
Scene = tuple[Counter, Counter]


def scene(image: Image.Image, tag: str, detector: Detector, classifier: ColorClassifier,
          options: ScoringOptions = ScoringOptions()) -> Scene:
    """What an image shows: the multiset of (class, colour) of its kept objects, and the multiset of
    (object, object, relations) over every ordered pair of them."""
    threshold = options.threshold_for(tag)
    ranked = rank_detections(detector.detect(image), threshold, options.max_objects)
    kept = select_detections(ranked, threshold, options.max_objects, options.max_overlap)
    objects = []
    for name, dets in kept.items():
        crops = [object_crop(image, d.box, d.mask, options.bgcolor, options.crop) for d in dets]
        colors = classifier.classify(crops, options.colors, name) if crops else []
        objects += [((name, color), d.box) for d, color in zip(dets, colors)]
    pairs = Counter((a, b, frozenset(relative_position(box_a, box_b, options.position_threshold)))
                    for i, (a, box_a) in enumerate(objects) for j, (b, box_b) in enumerate(objects) if i != j)
    return Counter(obj for obj, _ in objects), pairs


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of 8-bit images with mean squared error `mse` (∞ when identical)."""
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def pair_images(reference: Sequence[GeneratedImage], candidate: Sequence[GeneratedImage]
                ) -> list[tuple[GeneratedImage, GeneratedImage]]:
    """Images of the same prompt index and sample number; the prompt sets must be the same."""
    ours = {(img.index, img.path.name): img for img in candidate}
    theirs = {(img.index, img.path.name): img for img in reference}
    if ours.keys() != theirs.keys():
        only = sorted(ours.keys() ^ theirs.keys())[:3]
        raise ValueError(f"the two folders hold different images (e.g. {only}): generate both from the same prompt "
                         "file with the same samples per prompt")
    differ = [key for key in theirs if theirs[key].metadata != ours[key].metadata]
    if differ:
        raise ValueError(f"prompt {differ[0][0]} differs between the folders: they were made from other prompts")
    return [(theirs[key], ours[key]) for key in sorted(theirs)]


def fidelity(reference: Path, candidate: Path, detector: Detector, classifier: ColorClassifier) -> dict:
    """Per-tag and overall detection-match rate and PSNR of `candidate`'s images against `reference`'s."""
    pairs = pair_images(list_images(reference), list_images(candidate))
    per_tag: dict[str, dict[str, list]] = {}
    for ref, cand in pairs:
        with Image.open(ref.path) as a, Image.open(cand.path) as b:
            a, b = a.convert("RGB"), b.convert("RGB")
            tag = ref.metadata["tag"]
            match = scene(a, tag, detector, classifier) == scene(b, tag, detector, classifier)
            mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
        entry = per_tag.setdefault(tag, {"match": [], "mse": []})
        entry["match"].append(match)
        entry["mse"].append(mse)
    tags = {tag: summarize(per_tag[tag]) for tag in tag_order(list(per_tag))}
    everything = {"match": [m for e in per_tag.values() for m in e["match"]],
                  "mse": [m for e in per_tag.values() for m in e["mse"]]}
    return {"reference": str(reference), "candidate": str(candidate), **summarize(everything),
            "detection_match_mean_of_tags": sum(t["detection_match"] for t in tags.values()) / len(tags),
            "tags": tags}


def summarize(entry: dict[str, list]) -> dict:
    """Match rate, PSNR of the pooled MSE, median per-image PSNR, identical images."""
    mses = entry["mse"]
    return {"images": len(mses), "detection_match": sum(entry["match"]) / len(mses),
            "psnr_db": psnr(float(np.mean(mses))), "median_psnr_db": psnr(float(np.median(mses))),
            "identical": sum(m == 0 for m in mses)}


def markdown(result: dict) -> str:
    rows = [[tag, t["images"], f"{t['detection_match']:.3f}", f"{t['psnr_db']:.2f}", f"{t['median_psnr_db']:.2f}"]
            for tag, t in result["tags"].items()]
    rows.append(["**all images**", result["images"], f"**{result['detection_match']:.3f}**",
                 f"**{result['psnr_db']:.2f}**", f"{result['median_psnr_db']:.2f}"])
    return "\n".join([
        f"Candidate `{result['candidate']}` against reference `{result['reference']}`: same prompts, same seeds.", "",
        markdown_table(["tag", "images", "detections match", "PSNR dB", "median PSNR dB"], rows, align="lrrrr"), "",
        "Detections match: the same objects (class and colour, counted) and the same relations between them. "
        "PSNR: of the pooled mean squared error of the 8-bit images (∞ when identical)."])


def side_by_side(reference: Path, candidate: Path, out: Path, per_tag: int = 2, samples: int = 4,
                 scale: int = 4) -> Path:
    """A grid: for `per_tag` prompts of each tag, one row of the reference's samples then the candidate's (at most
    `samples` each), magnified `scale`× without smoothing."""
    pairs = pair_images(list_images(reference), list_images(candidate))
    chosen: dict[str, list[int]] = {}
    for ref, _ in pairs:
        indices = chosen.setdefault(ref.metadata["tag"], [])
        if ref.index not in indices and len(indices) < per_tag:
            indices.append(ref.index)
    rows = [[pair for pair in pairs if pair[0].index == index][:samples]
            for tag in tag_order(list(chosen)) for index in chosen[tag]]
    width = min(len(row) for row in rows)
    tiles = []
    for row in rows:
        for path in [r.path for r, _ in row[:width]] + [c.path for _, c in row[:width]]:
            with Image.open(path) as tile:
                tiles.append(torch.from_numpy(np.array(tile.convert("RGB"))))
    grid = image_grid(torch.stack(tiles), columns=2 * width)
    grid = grid.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    save_png(grid, out)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="the teacher's GenEval run (or images/)")
    parser.add_argument("--candidate", type=Path, required=True, help="the graft's GenEval run (or images/)")
    parser.add_argument("--world", choices=sorted(WORLDS), default="shapes", help="whose exact detector to use")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    world = get_world(args.world)
    reference, candidate = (p / "images" if (p / "images").is_dir() else p for p in (args.reference, args.candidate))
    result = fidelity(reference, candidate, world.detector(), world.classifier())
    save_json(result, args.out / "fidelity.json")
    save_text(markdown(result) + "\n", args.out / "fidelity.md")
    side_by_side(reference, candidate, args.out / "side_by_side.png")
    log.info("detections match %.3f, PSNR %.2f dB over %d images → %s", result["detection_match"],
             result["psnr_db"], result["images"], args.out)
    return result


if __name__ == "__main__":
    main()
