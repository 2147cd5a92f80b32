"""GenEval's image folder layout: `<index:05d>/metadata.jsonl` and `<index:05d>/samples/<n:04d>.png`.

The same folder can be scored by the official `evaluate_images.py`; the walker accepts exactly what it accepts
(digit folders, names that start with `\\d+\\.png`), in sorted order instead of os.listdir order.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.files import save_text
from eval.geneval.prompts import MetadataError, check_metadata

SAMPLE_NAME = re.compile(r"(\d+)\.png")  # re.match: a prefix match, as upstream


def prompt_folder(images_dir: Path, index: int) -> Path:
    return images_dir / f"{index:05d}"


def sample_path(images_dir: Path, index: int, sample: int) -> Path:
    return prompt_folder(images_dir, index) / "samples" / f"{sample:04d}.png"


def write_metadata(images_dir: Path, index: int, record: dict) -> None:
    """`metadata.jsonl` holds the prompt's one record (read back with json.load); rewritten only if it differs."""
    path = prompt_folder(images_dir, index) / "metadata.jsonl"
    text = json.dumps(record) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        save_text(text, path)


@dataclass(frozen=True)
class GeneratedImage:
    """One image to score and the prompt record it was generated for."""

    path: Path
    index: int
    metadata: dict


def list_images(images_dir: str | Path) -> list[GeneratedImage]:
    """Every image the official evaluator would score in `images_dir`, sorted by prompt index then sample number."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such image folder")
    found = []
    folders = [p for p in images_dir.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()]
    for folder in sorted(folders, key=lambda p: (int(p.name), p.name)):
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing; every prompt folder needs its metadata record")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise MetadataError(f"{meta_path}: not a JSON prompt record ({err})") from None
        check_metadata(metadata, f"{meta_path} (the images of {folder.name}/samples)")
        samples = folder / "samples"
        files = [p.name for p in samples.iterdir() if p.is_file()] if samples.is_dir() else []
        numbered = sorted((int(m[1]), n) for n in files if (m := SAMPLE_NAME.match(n)))
        found += [GeneratedImage(samples / n, int(folder.name), metadata) for _, n in numbered]
    return found
