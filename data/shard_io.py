"""Where a sample's bytes sit in a local shard file, and how they get into a batch with a single copy.

DataLoader workers parse shards through a memory map and hand on only the places of the tensors (`TensorRef`),
never their bytes: webdataset's own expander copies every member through tarfile's 10 KB-record stream, and
returning tensors from a worker copies them again into fresh shared memory, which together held 3 MB
(2K-resolution) samples to about 200 samples/s on our 2-core machines. The training process then reads each
tensor once, straight from the file into the batch (docs/data.md has the measurements).
"""
from __future__ import annotations

import mmap
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)  # two zero blocks close every complete tar


@dataclass(frozen=True)
class Member:
    """One tar member: a view of its bytes in the mapped shard, and where they start in the file."""

    path: str
    offset: int
    view: memoryview


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a shard file: `dtype` and `shape` at byte `offset`, read when a batch is assembled."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read_into(self, out: torch.Tensor) -> None:
        """Fill `out` (this shape, any dtype) from the file: straight into its memory when dtypes match."""
        target = out if out.dtype == self.dtype and out.is_contiguous() else torch.empty(self.shape, dtype=self.dtype)
        buffer = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:  # unbuffered: the read goes straight into `buffer`
            f.seek(self.offset)
            done = 0
            while done < len(buffer):
                n = f.readinto(buffer[done:])
                if not n:
                    raise OSError(f"{self.path} ended at byte {self.offset + done} while reading a tensor; the shard "
                                  "changed after it was indexed (shards must not be rewritten while being read)")
                done += n
        if target is not out:
            out.copy_(target)


def mapped_tar_files(shards: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset pipeline stage: {'url': path} dicts → webdataset's file stream (`fname`, `data`, `__url__`,
    then `{}` after each shard), with `data` a `Member` instead of a copy of the bytes.

    A shard that cannot be read (missing, not a tar, truncated) goes to `handler` after the members read before
    the damage; the handler returns True to go on with the next shard.
    """
    for source in shards:
        url = source["url"]
        try:
            yield from _members(url)
        except (OSError, ValueError, tarfile.TarError) as exn:  # ValueError: mmap of an empty file
            exn.args = (f"{url}: {exn}",)
            if not handler(exn):
                return
        yield {}


def _members(path: str) -> Iterator[dict]:
    with open(path, "rb") as f:
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                end = info.offset_data + info.size
                if end > len(view):
                    raise tarfile.ReadError(f"member {info.name} runs past the end of the file: truncated shard")
                if info.isreg():
                    member = Member(path, info.offset_data, view[info.offset_data:end])
                    yield {"fname": info.name, "data": member, "__url__": path}
            if view[tar.offset:tar.offset + len(END_OF_ARCHIVE)] != END_OF_ARCHIVE:
                raise tarfile.ReadError(f"no end-of-archive marker after byte {tar.offset}: truncated or damaged "
                                        "shard (members after this point are lost)")
