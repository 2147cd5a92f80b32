"""Writing a dataset as fixed-range tar shards, split across ranks and resumable.

Shard `s` always holds the samples with global indices [s·size, (s+1)·size), whatever the world size, and rank
`r` of `w` writes the shards with s % w == r. A shard is finished once its tar and then its index JSON exist under
their final names (each is written to a temporary name and renamed), so a restarted job skips finished shards,
deletes what a killed writer left of the others, rewrites them and never duplicates a sample.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm.auto import tqdm

from common.files import atomic_write, save_json
from common.runtime import Rank

log = logging.getLogger(__name__)

SHARD_NAME = "shard-r{rank:03d}-{index:06d}.tar"
SHARD_PATTERN = re.compile(r"shard-r(\d+)-(\d+)\.tar")
DATASET_INFO = "dataset.json"


@dataclass(frozen=True)
class ShardPlan:
    """Which global sample indices each shard holds and which rank writes it."""

    num_samples: int
    shard_size: int

    def __post_init__(self):
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError(f"need at least one sample and a shard size ≥ 1, got {self.num_samples} samples "
                             f"and shard size {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def samples(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))

    def shards_of(self, rank: Rank) -> list[int]:
        return rank.shard(list(range(self.num_shards)))


def index_path(shard_path: Path) -> Path:
    """The shard's index: its sample keys and count, next to it as `<name>.json`."""
    return shard_path.with_suffix(".json")


def finished_shards(out: Path) -> dict[int, Path]:
    """Shard index → path of every finished shard in `out` (its tar and its index both exist), whichever rank
    wrote it."""
    found: dict[int, Path] = {}
    for path in sorted(out.glob("shard-r*-*.tar")):
        match = SHARD_PATTERN.fullmatch(path.name)
        if not match or not index_path(path).is_file():
            continue
        index = int(match.group(2))
        if index in found:
            raise FileExistsError(f"shard {index} exists twice ({found[index].name}, {path.name}), e.g. from two "
                                  "jobs writing to the same folder; delete one of them")
        found[index] = path
    return found


def write_shards(out: Path, plan: ShardPlan, rank: Rank, make_samples: Callable[[range], Iterable[dict]],
                 unit: str = "sample") -> list[Path]:
    """Write this rank's unfinished shards from `make_samples(indices)`; returns the paths written now."""
    out.mkdir(parents=True, exist_ok=True)
    mine = plan.shards_of(rank)
    done = finished_shards(out)
    todo = [s for s in mine if s not in done]
    log.info("%s: %d shards of %d samples in all; this rank (%d of %d) writes %d, %d of them already finished",
             out, plan.num_shards, plan.num_samples, rank.rank, rank.world_size, len(mine), len(mine) - len(todo))
    written = []
    with tqdm(total=sum(len(plan.samples(s)) for s in todo), unit=unit, desc=f"rank {rank.rank}") as bar:
        for shard in todo:
            remove_partial(out, shard)
            path = out / SHARD_NAME.format(rank=rank.rank, index=shard)
            write_shard(path, shard, plan.samples(shard), _counted(make_samples(plan.samples(shard)), bar))
            written.append(path)
    return written


def write_shard(path: Path, shard: int, indices: range, samples: Iterable[dict]) -> None:
    """Write one shard under a temporary name and rename it to `path`, then its index the same way: an index
    under its final name means the tar is complete."""
    keys = []

    def write(tmp: str) -> None:
        with wds.TarWriter(tmp, encoder=False, mtime=0) as tar:  # fixed mtime: same samples, same bytes
            for sample in samples:
                tar.write(sample)
                keys.append(sample["__key__"])

    atomic_write(path, write)
    save_json({"shard": shard, "first": indices.start, "stop": indices.stop, "samples": len(keys), "keys": keys,
               "bytes": path.stat().st_size}, index_path(path))


def chunks(indices: range, size: int) -> Iterator[range]:
    """Consecutive batches of `indices`, the first starting at its start."""
    for start in range(indices.start, indices.stop, size):
        yield range(start, min(start + size, indices.stop))


def remove_partial(out: Path, shard: int) -> None:
    """Delete what a killed writer of the unfinished `shard` left behind: temporary files (`.<final name>.*`) and
    a tar without its index or an index without its tar, from any rank."""
    for stale in [*out.glob(f".shard-r*-{shard:06d}.*"), *out.glob(f"shard-r*-{shard:06d}.*")]:
        log.info("removing a partial shard left by an interrupted run: %s", stale.name)
        stale.unlink()


def _counted(samples: Iterable[dict], bar: tqdm) -> Iterator[dict]:
    for sample in samples:
        yield sample
        bar.update(1)
