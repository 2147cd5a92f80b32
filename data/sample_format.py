"""One sample inside a shard: its member names and their bytes. The schema is documented in docs/data.md.

Tensors of a sample live in one safetensors member: bf16 round-trips bit-exactly and nothing is ever unpickled.
The reader reads only that member's header (`tensor_layout`) and later copies the tensor bytes straight from the
file into the batch (data/shard_io.py).
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load, save

# member extensions (the part of the file name after the sample key)
TENSORS = "safetensors"
CAPTION = "txt"
METADATA = "json"
LABEL = "cls"
IMAGE_FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}

# tensor names inside the safetensors member
LATENT = "latent"  # (C, h, w): the sampler's output or a VAE encoding, already scaled by the VAE's factor
LATENT_FLIP = "latent_flip"  # (C, h, w): the horizontally flipped image's latent (precomputed class data)
TEXT = "t5"  # (n, D): T5 features of the n valid tokens only
STORAGE_DTYPE = torch.bfloat16

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SampleError(ValueError):
    """A stored sample cannot be decoded or does not have the expected keys or shapes."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def sample_key(index: int) -> str:
    """The key of the dataset's `index`-th sample: zero-padded so shard order is key order."""
    return f"{index:09d}"


def shard_sample(index: int, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                 caption: str | None = None, label: int | None = None, image: bytes | None = None,
                 image_format: str = "png") -> dict[str, Any]:
    """The member-name → bytes dict that webdataset's TarWriter stores as one sample."""
    sample = {"__key__": sample_key(index), TENSORS: encode_tensors(tensors),
              METADATA: json.dumps(metadata, sort_keys=True, ensure_ascii=False).encode()}
    if caption is not None:
        sample[CAPTION] = caption.encode()
    if label is not None:
        sample[LABEL] = str(int(label)).encode()
    if image is not None:
        sample[image_format] = image
    return sample


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of CPU copies of `tensors`, cast to the storage dtype (bf16) when floating point."""
    return save({name: t.detach().to("cpu", STORAGE_DTYPE if t.is_floating_point() else t.dtype).contiguous()
                 for name, t in tensors.items()})


def decode_tensors(buf: bytes | memoryview) -> dict[str, torch.Tensor]:
    """A tensor member's tensors (copies; the reader reads them straight into batches instead)."""
    return load(bytes(buf))


def tensor_layout(buf: bytes | memoryview) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Name → (dtype, shape, byte offset in the member) from a safetensors member's header, checked against its
    size, without touching the tensor bytes (layout: 8-byte little-endian header length, JSON header, data)."""
    view = memoryview(buf)
    if len(view) < 8:
        raise SampleError("undecodable", f"tensor member has {len(view)} bytes, not a safetensors file")
    header_len = int.from_bytes(view[:8], "little")
    if 8 + header_len > len(view):
        raise SampleError("undecodable", f"safetensors header of {header_len} bytes overruns the member")
    try:
        header = json.loads(bytes(view[8:8 + header_len]))
        entries = {name: (SAFETENSORS_DTYPES[spec["dtype"]], tuple(int(n) for n in spec["shape"]),
                          [int(o) for o in spec["data_offsets"]])
                   for name, spec in header.items() if name != "__metadata__"}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise SampleError("undecodable", f"malformed safetensors header ({type(err).__name__}: {err})") from None
    base, data_len = 8 + header_len, len(view) - 8 - header_len
    layout = {}
    for name, (dtype, shape, offsets) in entries.items():
        size = math.prod(shape) * dtype.itemsize
        if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_len or offsets[1] - offsets[0] != size:
            raise SampleError("undecodable", f"tensor {name!r} {dtype}{list(shape)} does not fit bytes {offsets} "
                                             f"of {data_len}")
        layout[name] = (dtype, shape, base + offsets[0])
    return layout


def encode_image(image: torch.Tensor, image_format: str) -> bytes:
    """(H, W, 3) uint8 → PNG (lossless), JPEG or WebP (quality 95) bytes."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {sorted(IMAGE_FORMATS)}")
    pil_format, options = IMAGE_FORMATS[image_format]
    out = io.BytesIO()
    Image.fromarray(image.numpy()).save(out, format=pil_format, **options)
    return out.getvalue()


def valid_tokens(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The (n, D) features of the n real tokens; T5 pads on the right, so they must be a prefix of the mask."""
    n = int(mask.sum())
    if n == 0 or not bool(mask[:n].all()):
        raise ValueError(f"text mask is not a non-empty prefix of ones ({mask.tolist()}); "
                         "the tokenizer must pad on the right")
    return features[:n]
