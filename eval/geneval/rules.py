"""GenEval's scoring rules (djghosh13/geneval `evaluation/evaluate_images.py`) as pure functions on detections.

Every detector backend and every world (COCO objects now, synthetic shapes later) is scored by this one module, so
each rule lives in one place. Comments mark the official behaviours that ports most often get wrong.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from common.config import ConfigError, split_assignment

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # argmax ties
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: box (x1, y1, x2, y2) in image pixels, score, optional binary mask and CLIP colour."""

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    color: str | None = None


@dataclass(frozen=True)
class ScoringOptions:
    """The official `--options key=value` settings, with the official defaults."""

    threshold: float = 0.3  # minimum score (strict >) for every tag but counting
    counting_threshold: float = 0.9  # minimum score (strict >) for the counting tag
    max_objects: int = 16  # detections kept per class, after sorting by score
    max_overlap: float = 1.0  # per-class greedy NMS IoU; 1.0 (the default) turns NMS off
    position_threshold: float = 0.1  # c in the position rule
    bgcolor: str = "#999"  # fill outside the mask for the colour crop; "original" keeps the image
    crop: bool = True  # crop to the box before CLIP (official "crop=1")
    colors: tuple[str, ...] = COLORS

    @classmethod
    def from_pairs(cls, pairs: Sequence[str]) -> ScoringOptions:
        """Options from `key=value` strings, as the official `--options` takes them."""
        values = {}
        for pair in pairs:
            key, value = split_assignment(pair, "scoring option", "threshold=0.3")
            if key not in _OPTION_PARSERS:
                raise ConfigError(f"scoring option {pair!r}: unknown key {key!r}; known: {sorted(_OPTION_PARSERS)} "
                                  "(the official 'model' and 'clip_model' options are --detector-path and --clip here)")
            try:
                values[key] = _OPTION_PARSERS[key](value)
            except ValueError:
                raise ConfigError(f"scoring option {pair!r}: {value!r} is not a valid {key}") from None
        return cls(**values)

    def threshold_for(self, tag: str) -> float:
        """Counting prompts need confident detections: exactly N objects above 0.9."""
        return self.counting_threshold if tag == "counting" else self.threshold

    def to_dict(self) -> dict:
        return asdict(self)


_OPTION_PARSERS = {"threshold": float, "counting_threshold": float, "max_objects": int, "max_overlap": float,
                   "position_threshold": float, "bgcolor": str, "crop": lambda v: v == "1",
                   "colors": lambda v: tuple(c.strip() for c in v.split(","))}


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with the old "+1" pixel convention, 0 when the union is empty (as the official NMS computes it), in
    float32 like upstream's box arrays."""
    a, b = np.asarray(box_a[:4], dtype=np.float32), np.asarray(box_b[:4], dtype=np.float32)
    one = np.float32(1)

    def area(box):
        return max(box[2] - box[0] + one, 0) * max(box[3] - box[1] + one, 0)

    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return float(inter / union) if union else 0.0


def rank_detections(detections: Mapping[str, Sequence[Detection]], threshold: float,
                    max_objects: int = 16) -> dict[str, list[Detection]]:
    """Upstream's order on a detector's output: per class, `argsort(scores)[::-1]` on float32 scores, then
    score > threshold (in float32), then the first `max_objects`. Classes with nothing left are absent.

    The sort is stable before the reversal, so tied scores keep the later detection first. That is what
    upstream's default argsort does on the numpy its environment pins (an insertion sort for up to 16
    detections of a class); newer numpy's SIMD sorts order ties by CPU, so the default kind is not called here.
    """
    ranked: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        scores = np.array([d.score for d in dets], dtype=np.float32)
        order = np.argsort(scores, kind="stable")[::-1]
        kept = [dets[int(i)] for i in order if scores[i] > np.float32(threshold)][:max_objects]
        if kept:
            ranked[name] = kept
    return ranked


def select_detections(ranked: Mapping[str, Sequence[Detection]], threshold: float, max_objects: int = 16,
                      max_overlap: float = 1.0) -> dict[str, list[Detection]]:
    """From lists already in upstream order (`rank_detections`, or stored detections): score > threshold, the
    first `max_objects`, then greedy per-class NMS (off at the default max_overlap 1.0).

    Never sorts again: a second sort of a sorted list reverses the order of tied scores back to the detector's,
    which changes which of two tied objects is the "top" one that colour and position rules look at.
    """
    kept: dict[str, list[Detection]] = {}
    for name, dets in ranked.items():
        scores = np.array([d.score for d in dets], dtype=np.float32)
        if np.any(scores[1:] > scores[:-1]):
            raise ValueError(f"{name}: detections are not in descending score order (stored detections keep "
                             "upstream's order; rank a detector's output with rank_detections)")
        order = [i for i in range(len(dets)) if scores[i] > np.float32(threshold)][:max_objects]
        chosen = []
        while order:
            best = dets[order.pop(0)]
            chosen.append(best)
            if max_overlap < 1:
                order = [i for i in order if compute_iou(best.box, dets[i].box) < np.float32(max_overlap)]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], c: float = 0.1) -> set[str]:
    """Where A is relative to B (image y grows downwards); empty when the centres are too close.

    Each axis offset shrinks by c·(dim_A + dim_B) and is then divided by the norm of the ORIGINAL offset, so a
    clear diagonal can hold two relations at once. All in float32, as upstream's box arrays: in float64 a
    whole-pixel box exactly on the 0.5 boundary can land on the other side of it.
    """
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float32).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - np.float32(c) * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < np.float32(1e-3)):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    half = np.float32(0.5)
    found = {"left of": dx < -half, "right of": dx > half, "above": dy < -half, "below": dy > half}
    return {rel for rel, holds in found.items() if holds}


def evaluate(detected: Mapping[str, Sequence[Detection]], metadata: Mapping,
             options: ScoringOptions = ScoringOptions()) -> tuple[bool, str]:
    """Whether filtered detections satisfy a prompt record, and the official reason string when they do not.

    Includes are ANDed, excludes ORed. Colour and position are checked on the top-`count` detections only; a
    failed colour skips that include's position check; excludes count the whole filtered list.
    """
    correct, reasons, matched_groups = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = list(detected.get(name, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [_color_of(obj, name) for obj in found]
                hits = colors.count(req["color"])
                if hits < count:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in options.colors if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}; and {seen}")
            if "position" in req and matched:
                matched = _check_position(name, found, req["position"], matched_groups, options, reasons)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(detected.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


def _color_of(obj: Detection, name: str) -> str:
    if obj.color is None:
        raise ValueError(f"a {name} detection has no colour: colours are classified at detection time for prompts "
                         "with a colour requirement; re-run detection (not --from-detections) for this prompt set")
    return obj.color


def _check_position(name: str, found: list[Detection], position: Sequence, matched_groups: list,
                    options: ScoringOptions, reasons: list[str]) -> bool:
    """Every found A must hold the relation to every object of the target include; stops at the first failure."""
    relation, group = position
    targets = matched_groups[group]
    if targets is None:
        reasons.append(f"no target for {name} to be {relation}")
        return False
    for obj in found:
        for target in targets:
            true_rels = relative_position(obj.box, target.box, options.position_threshold)
            if relation not in true_rels:
                shown = " and ".join(r for r in RELATIONS if r in true_rels)  # upstream joins a set: any order
                reasons.append(f"expected {name} {relation} target, found {shown} target")
                return False
    return True


def details_json(detected: Mapping[str, Sequence[Detection]]) -> str:
    """The official `details` field: JSON of {class: [[x1, y1, x2, y2, score], ...]} for the kept detections."""
    return json.dumps({name: [[*map(float, d.box), float(d.score)] for d in dets] for name, dets in detected.items()})
