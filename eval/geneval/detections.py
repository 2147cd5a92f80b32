"""Detection pass of GenEval: images → stored detections (box, score, colour) → `detections.json`.

What is stored is enough to re-score exactly without any model (`--from-detections`), with other thresholds, and
against other prompts (the prompt-agnostic baseline):
- per class, the detections above min(threshold, counting_threshold) in upstream's order (`rank_detections`), at
  most `max_objects`, before NMS (every later filter keeps a prefix of this list, and greedy NMS of a prefix is
  the prefix of greedy NMS); scoring selects from this order and never sorts again;
- for images whose prompt asks for a colour, CLIP's colour of EVERY stored detection (masks are not stored, so
  colours cannot be re-derived later). Upstream classifies only the top-`count` objects of the asked classes, one
  batch per include; a colour depends only on the image, its box, mask and class, so the decisions are the same.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from common.files import save_text
from eval.geneval.colours import object_crop
from eval.geneval.layout import GeneratedImage
from eval.geneval.prompts import MetadataError, check_metadata
from eval.geneval.rules import Detection, ScoringOptions, rank_detections

FORMAT = "grafting-geneval-detections/1"


class Detector(Protocol):
    """Anything that finds objects: a Mask2Former, mmdet, or an exact detector of a synthetic world."""

    info: dict

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Per class name, the detections (box in image pixels, score, mask of the image's size or None)."""


class ColorClassifier(Protocol):
    """Anything that names the colour of object crops (CLIP zero-shot, or an exact palette lookup)."""

    info: dict

    def classify(self, crops: Sequence[Image.Image], colors: Sequence[str], class_name: str) -> list[str]:
        """One of `colors` per crop."""


@dataclass
class ImageDetections:
    """One scored image: its file name, the prompt record it was made for, and its stored detections (per class,
    in upstream's order)."""

    filename: str
    metadata: dict
    objects: dict[str, list[Detection]]


def needs_colors(metadata: dict) -> bool:
    return any("color" in req for req in metadata.get("include", []))


def storage_threshold(options: ScoringOptions) -> float:
    """Detections at or below this score can never pass any of the rules' thresholds."""
    return min(options.threshold, options.counting_threshold)


def detect_image(image: Image.Image, metadata: dict, detector: Detector, classifier: ColorClassifier | None,
                 options: ScoringOptions) -> dict[str, list[Detection]]:
    """The stored detections of one image: filtered for storage, coloured when its prompt asks for colours,
    masks dropped."""
    stored = rank_detections(detector.detect(image), storage_threshold(options), options.max_objects)
    if needs_colors(metadata):
        if classifier is None:
            raise ValueError(f"prompt {metadata['prompt']!r} asks for a colour but no colour classifier was given")
        for name, dets in stored.items():
            crops = [object_crop(image, d.box, d.mask, options.bgcolor, options.crop) for d in dets]
            colors = classifier.classify(crops, options.colors, name)
            stored[name] = [replace(d, color=c) for d, c in zip(dets, colors)]
    return {name: [replace(d, mask=None) for d in dets] for name, dets in stored.items()}


def detect_images(images: Sequence[GeneratedImage], detector: Detector, classifier: ColorClassifier | None,
                  options: ScoringOptions, progress: bool = True) -> list[ImageDetections]:
    """Detections for every image, read as upstream reads them (EXIF transpose, RGB)."""
    found = []
    for item in tqdm(images, desc="detecting", disable=not progress):
        with Image.open(item.path) as raw:
            image = ImageOps.exif_transpose(raw).convert("RGB")
        found.append(ImageDetections(str(item.path), item.metadata,
                                     detect_image(image, item.metadata, detector, classifier, options)))
    return found


def save_detections(path: Path, detections: Sequence[ImageDetections], options: ScoringOptions, run: dict) -> None:
    """Write the detections file: the settings it was made with, then one entry per image."""
    header = {"format": FORMAT, "stored_above": storage_threshold(options), "max_objects": options.max_objects,
              "bgcolor": options.bgcolor, "crop": options.crop, "colors": list(options.colors), "run": run}
    images = [{"filename": d.filename, "metadata": d.metadata,
               "objects": {name: [{"box": list(det.box), "score": det.score, "color": det.color} for det in dets]
                           for name, dets in d.objects.items()}}
              for d in detections]
    text = json.dumps({**header, "images": images}, indent=1) + "\n"  # key order kept: `metadata` strings must match
    save_text(text, path)


def load_detections(path: str | Path, options: ScoringOptions) -> tuple[list[ImageDetections], dict]:
    """Stored detections and the run settings they were made with, after checking `options` can re-score them."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as err:
        raise MetadataError(f"{path}: not a JSON detections file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise MetadataError(f"{path}: not a GenEval detections file of this harness (format {found!r})")
    header = {"stored_above": (int, float), "max_objects": int, "bgcolor": str, "crop": bool, "colors": list,
              "run": dict, "images": list}
    for key, kind in header.items():
        value = data.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise MetadataError(f"{path}: field {key}: expected {getattr(kind, '__name__', 'a number')}, got "
                                f"{value!r}")
    _check_rescorable(path, data, options)
    return [_image_entry(entry, f"{path}: images[{i}]") for i, entry in enumerate(data["images"])], data["run"]


def _image_entry(entry: object, where: str) -> ImageDetections:
    """One image of a detections file, every field checked; errors name the file, the image and the field."""
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        raise MetadataError(f"{where}: field filename: expected an object with a file name, got {entry!r:.80}")
    where = f"{where} ({entry['filename']})"
    metadata = check_metadata(entry.get("metadata"), f"{where} metadata")
    objects = entry.get("objects")
    if not isinstance(objects, dict):
        raise MetadataError(f"{where}: field objects: expected an object of class → detections, got {objects!r:.80}")
    parsed = {}
    for name, found in objects.items():
        if not isinstance(found, list):
            raise MetadataError(f"{where}: field objects.{name}: expected a list, got {found!r:.80}")
        parsed[name] = [_detection(o, f"{where}: field objects.{name}[{j}]") for j, o in enumerate(found)]
    return ImageDetections(entry["filename"], metadata, parsed)


def _detection(obj: object, where: str) -> Detection:
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(obj, dict):
        raise MetadataError(f"{where}: expected an object with box, score and color, got {obj!r:.80}")
    box, score, color = obj.get("box"), obj.get("score"), obj.get("color")
    if not isinstance(box, list) or len(box) != 4 or not all(number(v) for v in box):
        raise MetadataError(f"{where}.box: expected four finite numbers (x1, y1, x2, y2), got {box!r:.80}")
    if not number(score):
        raise MetadataError(f"{where}.score: expected a finite number, got {score!r:.80}")
    if color is not None and not isinstance(color, str):
        raise MetadataError(f"{where}.color: expected a colour name or null, got {color!r:.80}")
    return Detection(tuple(box), score, color=color)


def _check_rescorable(path: str | Path, data: dict, options: ScoringOptions) -> None:
    problems = []
    if storage_threshold(options) < data["stored_above"]:
        problems.append(f"thresholds below {data['stored_above']} (detections at or below it were not stored)")
    if options.max_objects > data["max_objects"]:
        problems.append(f"max_objects above {data['max_objects']}")
    for key in ("bgcolor", "crop", "colors"):
        stored = tuple(data[key]) if key == "colors" else data[key]
        if getattr(options, key) != stored:
            problems.append(f"{key}={getattr(options, key)!r} (colours were decided with {stored!r})")
    if problems:
        raise ValueError(f"{path} cannot be re-scored with " + "; ".join(problems)
                         + ". Run the detector again instead of --from-detections")
