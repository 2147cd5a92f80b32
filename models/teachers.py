"""Teachers shipped inside the repo (small enough to commit), as pipeline folders the loaders take like any other."""
from __future__ import annotations

from pathlib import Path

#: PixArt-Sigma trained on the shapes world (data/shapes.py): transformer/, text_encoder/, tokenizer/, vae/ (a
#: pixel codec) and scheduler/; reproduced by `python -m recipes.shapes_teacher` (models/shapes_teacher/README.md)
SHAPES_TEACHER = Path(__file__).resolve().parent / "shapes_teacher"
