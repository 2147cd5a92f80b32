"""Images as the VAE gets them: RGB, center-cropped to a square, as (3, S, S) tensors in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's crop, which DiT was trained with: halve with a box filter while the short side is ≥ 2·size, resize
    the short side to `size` (bicubic), then cut the central square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_square(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) float in [-1, 1]; raises OSError (PIL's) for unreadable files."""
    with Image.open(path) as image:
        square = center_crop(image.convert("RGB"), size)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1).float() / 127.5 - 1
