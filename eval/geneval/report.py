"""GenEval output files: results.jsonl (official schema), scores.json, summary.md and grid.png."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from common.files import save_text
from common.tables import markdown_table
from eval.geneval.scoring import RESULT_FIELDS, Summary
from models.sampling import image_grid, save_png

log = logging.getLogger(__name__)
GRID_PROMPTS_PER_TAG = 2
FRAME = 4  # pixels of green (correct) or red (wrong) around each grid tile


def write_results(rows: Sequence[dict], path: Path) -> None:
    """One JSON object per image with the official fields; `metadata` and `details` are JSON strings."""
    save_text("".join(json.dumps({k: row[k] for k in RESULT_FIELDS}) + "\n" for row in rows), path)


def write_scores(summary: Summary, run: dict, path: Path) -> None:
    """The summary's numbers and the run settings as JSON, tags in the paper's order."""
    save_text(json.dumps({**summary.to_dict(), "run": run}, indent=2) + "\n", path)


def write_summary(summary: Summary, run: dict, path: Path) -> None:
    """A Markdown page: tag table, overall score, totals, then every setting of the run."""
    baseline = summary.overall_baseline
    overall = f"**Overall: {summary.overall:.5f}** (mean of {len(summary.tags)} tag means)"
    headers = ["tag", "images", "correct", "score"]
    if baseline is not None:
        overall += f"; prompt-agnostic baseline {baseline:.5f}"
        headers.append("prompt-agnostic baseline")
    table = markdown_table(headers, tag_rows(summary), align="l" + "r" * (len(headers) - 1))
    lines = ["# GenEval", "", overall, "", table]
    lines += ["", f"Images: {summary.images}; prompts: {summary.prompts}; correct images: "
              f"{summary.image_accuracy:.2%}; prompts with at least one correct image: {summary.prompt_accuracy:.2%}."]
    if baseline is not None:
        lines += ["", "The baseline scores every image against every prompt of its tag: what a model that ignores "
                  "its prompt but draws the same kind of images would score."]
    lines += ["", "## Run settings", "", *_settings_lines(run)]
    save_text("\n".join(lines) + "\n", path)


def tag_rows(summary: Summary) -> list[list]:
    """A table row per tag: images, correct images, score, and the prompt-agnostic baseline when it was computed."""
    with_baseline = summary.overall_baseline is not None
    return [[tag, t.images, t.correct, f"{t.score:.4f}"] + ([f"{t.baseline:.4f}"] if with_baseline else [])
            for tag, t in summary.tags.items()]


def _settings_lines(run: dict, depth: int = 0) -> list[str]:
    lines = []
    for key, value in run.items():
        if isinstance(value, dict):
            lines += ["  " * depth + f"- {key}:"] + _settings_lines(value, depth + 1)
        else:
            lines.append("  " * depth + f"- {key}: `{value}`")
    return lines


def write_grid(rows: Sequence[dict], path: Path) -> bool:
    """A few prompts per tag, one row of samples each, framed green or red by correctness. Returns False (and
    writes nothing) when the images are not on this machine, e.g. when re-scoring a detections file."""
    prompts: dict[str, list[dict]] = {}
    for row in rows:
        prompts.setdefault(row["metadata"], []).append(row)
    chosen, per_tag = [], {}
    for samples in prompts.values():
        tag = samples[0]["tag"]
        if per_tag.get(tag, 0) < GRID_PROMPTS_PER_TAG:
            per_tag[tag] = per_tag.get(tag, 0) + 1
            chosen.append(samples)
    files = [Path(r["filename"]) for samples in chosen for r in samples]
    if not all(f.is_file() for f in files):
        log.warning("grid.png skipped: %d of %d images are not on this machine", sum(not f.is_file() for f in files),
                    len(files))
        return False
    columns = max(len(samples) for samples in chosen)
    with Image.open(files[0]) as first:
        size = first.size
    tiles = []
    for samples in chosen:
        for i in range(columns):
            tiles.append(_tile(samples[i], size) if i < len(samples) else Image.new("RGB", _framed(size), "white"))
    grid = image_grid(torch.stack([torch.from_numpy(np.array(t)) for t in tiles]), columns=columns)
    save_png(grid, path)
    return True


def _framed(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] + 2 * FRAME, size[1] + 2 * FRAME


def _tile(row: dict, size: tuple[int, int]) -> Image.Image:
    with Image.open(row["filename"]) as image:
        image = image.convert("RGB").resize(size)
    return ImageOps.expand(image, border=FRAME, fill="green" if row["correct"] else "red")
