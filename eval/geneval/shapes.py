"""The exact detector and colour classifier of the shapes world (data/shapes.py), behind GenEval's `Detector` and
`ColorClassifier` interfaces, so the unchanged scoring rules judge generated shapes images.

Detection rules (docs/shapes.md):
1. Every pixel takes the nearest (Euclidean RGB) of the background and the six palette colours.
2. An object candidate is a 4-connected component of pixels of one palette colour whose box is at least
   `MIN_SIDE` pixels on both sides; smaller components are noise.
3. Its shape is the one whose ideal mask (`data.shapes.shape_mask` at the component's box) has the highest IoU
   with the component; its score is that IoU times the box's aspect ratio (short side / long side), so
   ground-truth objects score exactly 1 and blobs, fragments and stretched shapes score less.
4. Its box is [min_x, min_y, max_x + 1, max_y + 1] and its mask the component, as Mask2Former's outputs are.
The colour classifier names the palette colour most of an object crop's pixels are nearest to.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from data.shapes import BACKGROUND, PALETTE, SHAPES, SIZES, shape_mask
from eval.geneval.rules import Detection

MIN_SIDE = SIZES[0] // 2  # components with a shorter box side are noise, not objects
FILL = (153, 153, 153)  # "#999", the grey GenEval paints outside an object's mask before classifying its colour
COLOR_NAMES = tuple(PALETTE)
_REFERENCE = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)  # index 0: background


def nearest_colors(pixels: np.ndarray, references: np.ndarray = _REFERENCE) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) index of the nearest reference colour (ties: the lower index)."""
    diff = pixels.astype(np.float64)[..., None, :] - references
    return np.einsum("hwkc,hwkc->hwk", diff, diff).argmin(axis=-1)


@lru_cache(maxsize=None)
def _template(kind: str, width: int, height: int) -> np.ndarray:
    return shape_mask(kind, width, height)


def classify_shape(component: np.ndarray) -> tuple[str, float]:
    """(shape, score) of one component cropped to its box: the best-fitting ideal shape and its IoU × aspect."""
    height, width = component.shape
    best_kind, best_iou = SHAPES[0], -1.0
    for kind in SHAPES:
        template = _template(kind, width, height)
        iou = np.logical_and(component, template).sum() / np.logical_or(component, template).sum()
        if iou > best_iou:
            best_kind, best_iou = kind, float(iou)
    return best_kind, best_iou * min(width, height) / max(width, height)


class ShapesDetector:
    """Exact detector of the shapes world: the `Detector` protocol of eval/geneval/detections.py."""

    info = {"backend": "shapes-exact", "min_side": MIN_SIDE, "colors": dict(PALETTE), "background": BACKGROUND}

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Per shape name, its detections sorted by score (highest first)."""
        labels = nearest_colors(np.asarray(image.convert("RGB")))
        found: dict[str, list[Detection]] = {}
        for color_index in range(1, len(_REFERENCE)):
            components, _ = ndimage.label(labels == color_index)
            for index, region in enumerate(ndimage.find_objects(components), start=1):
                ys, xs = region
                if ys.stop - ys.start < MIN_SIDE or xs.stop - xs.start < MIN_SIDE:
                    continue
                kind, score = classify_shape(components[region] == index)
                mask = components == index
                found.setdefault(kind, []).append(
                    Detection((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)), score, mask))
        return {kind: sorted(found[kind], key=lambda d: -d.score) for kind in SHAPES if kind in found}


class PaletteColorClassifier:
    """Exact colour classifier of the shapes world: the `ColorClassifier` protocol. Each crop pixel takes the
    nearest of the background, the #999 fill and the palette; the palette colour with most pixels wins (ties:
    palette order). A crop with no palette pixel gets the palette colour nearest to its mean."""

    info = {"backend": "shapes-palette", "colors": dict(PALETTE)}
    _references = np.array([BACKGROUND, FILL, *PALETTE.values()], dtype=np.float64)

    def classify(self, crops: Sequence[Image.Image], colors: Sequence[str], class_name: str) -> list[str]:
        missing = [c for c in COLOR_NAMES if c not in colors]
        if missing:
            raise ValueError(f"the scoring colours {tuple(colors)} lack the shapes world's {missing}")
        return [self._color(np.asarray(crop.convert("RGB"))) for crop in crops]

    def _color(self, pixels: np.ndarray) -> str:
        if pixels.size == 0:
            raise ValueError("empty object crop: the detector returned a box with no pixels")
        votes = np.bincount(nearest_colors(pixels, self._references).ravel(), minlength=len(self._references))[2:]
        if votes.any():
            return COLOR_NAMES[int(votes.argmax())]
        mean = pixels.reshape(-1, 3).mean(axis=0, keepdims=True)[None]
        return COLOR_NAMES[int(nearest_colors(mean, self._references[2:])[0, 0])]
