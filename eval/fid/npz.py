"""ADM-format sample batches: `.npz` files whose `arr_0` is uint8 (N, H, W, 3), streamed in and out.

50,000 samples at 256² are 9.8 GB, and ADM's reference batches are large too, so neither the writer nor the reader
holds a whole array in memory: members are written and read through `zipfile` a batch at a time, like ADM's
`open_npz_array`. The files are ordinary `.npz` archives (`numpy.load` reads them).
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from common.files import atomic_write

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"  # guided-diffusion's sample batches store class labels here; the evaluator ignores it


def write_npz_streaming(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str,
                        parts: Iterable[np.ndarray], key: str = IMAGES_KEY,
                        extra: dict[str, np.ndarray] | None = None) -> None:
    """Atomically write `key` (of `shape`, filled part by part along axis 0) plus small `extra` arrays."""
    dtype = np.dtype(dtype)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                rows = 0
                for part in parts:
                    part = np.ascontiguousarray(part, dtype=dtype)
                    if part.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{path}: part of shape {part.shape} does not fit {shape}")
                    member.write(part.tobytes())
                    rows += len(part)
                if rows != shape[0]:
                    raise ValueError(f"{path}: wrote {rows} rows, header says {shape[0]}")
            for name, value in (extra or {}).items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    atomic_write(path, write)


def npz_array_shape(path: str | Path, key: str = IMAGES_KEY) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member, read from its header only."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, path, key) as member:
        shape, _, dtype = _read_header(member)
    return shape, dtype


def iter_npz_batches(path: str | Path, batch_size: int, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """Consecutive batches of one member (C order), never more than a batch in memory."""
    with zipfile.ZipFile(path) as archive, _open_member(archive, path, key) as member:
        shape, fortran, dtype = _read_header(member)
        if fortran:
            raise ValueError(f"{path}: {key} is stored in Fortran order; re-save it with numpy.savez")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            data = member.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise ValueError(f"{path}: {key} is truncated at row {start}")
            yield np.frombuffer(data, dtype=dtype).reshape(rows, *shape[1:])


def _open_member(archive: zipfile.ZipFile, path: str | Path, key: str) -> IO[bytes]:
    name = f"{key}.npy"
    if name not in archive.namelist():
        raise KeyError(f"{path}: no array {key!r}; it holds {[n.removesuffix('.npy') for n in archive.namelist()]}")
    return archive.open(name)


def _read_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(member)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(member)
    return shape, fortran, np.dtype(dtype)
