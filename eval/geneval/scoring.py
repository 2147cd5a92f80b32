"""From stored detections to GenEval numbers: per-image results (the official results.jsonl rows), tag means,
the overall score (mean of the tag means, as summary_scores.py), and the prompt-agnostic baseline.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from eval.geneval.detections import ImageDetections
from eval.geneval.prompts import TAGS, tag_order
from eval.geneval.rules import ScoringOptions, details_json, evaluate, select_detections

RESULT_FIELDS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")


def score_image(image: ImageDetections, options: ScoringOptions = ScoringOptions(),
                metadata: dict | None = None) -> dict:
    """One results.jsonl row; `metadata` scores the image against another prompt (default: its own)."""
    metadata = metadata or image.metadata
    detected = select_detections(image.objects, options.threshold_for(metadata["tag"]), options.max_objects,
                                 options.max_overlap)
    correct, reason = evaluate(detected, metadata, options)
    return {"filename": image.filename, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": reason, "metadata": json.dumps(metadata), "details": details_json(detected)}


@dataclass
class TagScore:
    images: int
    correct: int
    baseline: float | None = None

    @property
    def score(self) -> float:
        return self.correct / self.images


@dataclass
class Summary:
    """summary_scores.py's numbers: image and prompt totals, per-tag image means, and the overall score."""

    images: int
    prompts: int
    image_accuracy: float  # mean of `correct` over all images
    prompt_accuracy: float  # fraction of prompts with at least one correct image
    tags: dict[str, TagScore] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        """Unweighted mean of the tag means (not the mean over images)."""
        return sum(t.score for t in self.tags.values()) / len(self.tags)

    @property
    def overall_baseline(self) -> float | None:
        values = [t.baseline for t in self.tags.values()]
        return None if None in values else sum(values) / len(values)

    def to_dict(self) -> dict:
        return {"overall": self.overall, "overall_prompt_agnostic_baseline": self.overall_baseline,
                "images": self.images, "prompts": self.prompts, "image_accuracy": self.image_accuracy,
                "prompt_accuracy": self.prompt_accuracy,
                "tags": {tag: {"images": t.images, "correct": t.correct, "score": t.score,
                               "prompt_agnostic_baseline": t.baseline} for tag, t in self.tags.items()}}


def summarize(rows: Sequence[dict], baseline: dict[str, float] | None = None) -> Summary:
    """Aggregate results rows; prompts are told apart by their `metadata` string, as upstream."""
    if not rows:
        raise ValueError("no images were scored: check the image folder and --tags / --limit")
    unknown = sorted({r["tag"] for r in rows} - set(TAGS))
    if unknown:  # the overall score is the mean over GenEval's tags; another tag would change what it means
        raise ValueError(f"results of unknown tags {unknown} (GenEval's are {list(TAGS)}); "
                         f"e.g. {next(r['filename'] for r in rows if r['tag'] in unknown)}")
    by_prompt: dict[str, bool] = {}
    for row in rows:
        by_prompt[row["metadata"]] = by_prompt.get(row["metadata"], False) or row["correct"]
    summary = Summary(len(rows), len(by_prompt), sum(r["correct"] for r in rows) / len(rows),
                      sum(by_prompt.values()) / len(by_prompt))
    for tag in tag_order([r["tag"] for r in rows]):
        tagged = [r for r in rows if r["tag"] == tag]
        summary.tags[tag] = TagScore(len(tagged), sum(r["correct"] for r in tagged),
                                     None if baseline is None else baseline[tag])
    return summary


def prompt_agnostic_baseline(images: Sequence[ImageDetections],
                             options: ScoringOptions = ScoringOptions()) -> dict[str, float]:
    """Per tag, the mean correctness of every image against every prompt of its tag: the score of a model that
    ignores its prompt but draws the same kind of images. A model is only meaningful well above it."""
    prompts: dict[str, dict[str, dict]] = {}
    for image in images:
        prompts.setdefault(image.metadata["tag"], {})[json.dumps(image.metadata)] = image.metadata
    hits: dict[str, int] = {}
    pairs: dict[str, int] = {}
    for image in images:
        tag = image.metadata["tag"]
        detected = select_detections(image.objects, options.threshold_for(tag), options.max_objects,
                                     options.max_overlap)
        hits[tag] = hits.get(tag, 0) + sum(evaluate(detected, p, options)[0] for p in prompts[tag].values())
        pairs[tag] = pairs.get(tag, 0) + len(prompts[tag])
    return {tag: hits[tag] / pairs[tag] for tag in hits}
