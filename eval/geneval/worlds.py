"""The worlds GenEval scores: COCO (the official harness: Mask2Former or mmdet, and CLIP) and synthetic worlds
with an exact detector and colour classifier (the shapes world), whose prompts follow GenEval's schema."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data import shapes
from eval.geneval.detections import ColorClassifier, Detector
from eval.geneval.prompts import read_metadata
from eval.geneval.shapes import PaletteColorClassifier, ShapesDetector
from models.teachers import SHAPES_TEACHER


@dataclass(frozen=True)
class World:
    """What scoring a synthetic world needs: its classes, exact models, prompt splits and shipped teacher."""

    name: str
    class_names: tuple[str, ...]
    detector: Callable[[], Detector]
    classifier: Callable[[], ColorClassifier]
    splits: Callable[[str], list[dict]]
    default_split: str
    teacher: Path


WORLDS = {"shapes": World("shapes", shapes.SHAPES, ShapesDetector, PaletteColorClassifier, shapes.split_prompts,
                          "eval", SHAPES_TEACHER)}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; worlds with an exact detector: {sorted(WORLDS)}")
    return WORLDS[name]


def prompt_set(spec: str | Path) -> list[dict]:
    """Prompt records from `WORLD:SPLIT` (e.g. `shapes:eval`) or from a GenEval metadata file (JSON lines)."""
    text = str(spec)
    name, sep, split = text.partition(":")
    if sep and name in WORLDS and not Path(text).exists():
        return get_world(name).splits(split)
    return read_metadata(spec)
