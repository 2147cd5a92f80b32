"""Reader throughput on 2K-shaped samples (latent 4×256×256 + T5 300×4096, bf16: ~3 MB each) against simpler
loaders: is data loading fast enough to keep a 2K training step fed?

    python -m data.bench_reader --samples 256 --workers 2 --batch-size 8

Writes the samples to a temporary folder three ways (our shards; one .npy per tensor per sample in fp32, the
usual numpy dump, since numpy has no bf16; the same with the bf16 bits stored as uint16), reads each with a
DataLoader of `--workers` workers, and prints a Markdown table of samples/s: the median over `--repeats` runs of
`--epochs` epochs through one loader (workers kept between epochs), timed from the first batch, after one
warm-up run of each.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.runtime import Rank, setup_logging
from common.tables import markdown_table
from data.batching import collate
from data.reader import ReaderConfig, ShardLoader
from data.sample_format import LATENT, TENSORS, TEXT, shard_sample
from data.shard_writer import ShardPlan, write_shards

log = logging.getLogger("bench_reader")
LATENT_SHAPE, TEXT_SHAPE = (4, 256, 256), (300, 4096)  # PixArt-Sigma at 2048²: latent and T5-XXL features
BASELINE = "naive: .npy per tensor per sample, fp32"


def fake_samples(indices: Iterable[int]) -> Iterable[tuple[int, torch.Tensor, torch.Tensor]]:
    for i in indices:
        g = torch.Generator().manual_seed(i)
        yield i, torch.randn(LATENT_SHAPE, generator=g).bfloat16(), torch.randn(TEXT_SHAPE, generator=g).bfloat16()


def fake_shard_samples(indices: range) -> Iterator[dict]:
    """The fake samples as the shard writer takes them."""
    for i, lat, txt in fake_samples(indices):
        yield shard_sample(i, {LATENT: lat, TEXT: txt}, {"index": i}, caption="a benchmark sample")


def write_npy(folder: Path, num_samples: int, as_bits: bool) -> None:
    folder.mkdir(parents=True)
    for i, lat, txt in fake_samples(range(num_samples)):
        for name, t in (("latent", lat), ("t5", txt)):
            np.save(folder / f"{i:09d}.{name}.npy", t.view(torch.int16).numpy() if as_bits else t.float().numpy())


class NpyPerSample(Dataset):
    """The naive loader: np.load each sample's files, default collate."""

    def __init__(self, folder: Path, num_samples: int, as_bits: bool):
        self.folder, self.num_samples, self.as_bits = folder, num_samples, as_bits

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        out = {}
        for name in ("latent", "t5"):
            t = torch.from_numpy(np.load(self.folder / f"{i:09d}.{name}.npy"))
            out[name] = t.view(torch.bfloat16) if self.as_bits else t
        out["t5_mask"] = torch.ones(TEXT_SHAPE[0], dtype=torch.bool)
        return out


def stock_webdataset(folder: Path, batch_size: int) -> wds.WebDataset:
    """webdataset's own tar reading and safetensors' `load` (both copy every member), our collate."""
    def decode(sample: dict) -> dict:
        tensors = load(sample[TENSORS])
        return {"key": sample["__key__"], "latent": tensors[LATENT], "text": tensors[TEXT]}

    return (wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False,
                           nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
            .map(decode).batched(batch_size, collation_fn=partial(collate, text_tokens=TEXT_SHAPE[0])))


def samples_per_second(batches: Iterable) -> float:
    """Samples/s of one pass over `batches`, timed from its first batch (worker start-up excluded)."""
    count, started = 0, None
    for batch in batches:
        if started is None:
            started = time.perf_counter()
            continue
        count += len(batch["latent"])
    return count / (time.perf_counter() - started)


def epochs_of(loader: DataLoader, epochs: int) -> Iterable:
    """`epochs` passes over a map-style or webdataset DataLoader, its workers kept between passes."""
    return itertools.chain.from_iterable(loader for _ in range(epochs))


def folder_mb_per_sample(folder: Path, num_samples: int) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / num_samples / 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per timed run (one loader, workers kept)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loader, after one warm-up run")
    args = parser.parse_args(argv)
    setup_logging(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log.warning("writing %d samples three ways under %s", args.samples, root)
        write_shards(root / "shards", ShardPlan(args.samples, args.shard_size), Rank(), fake_shard_samples)
        write_npy(root / "npy_fp32", args.samples, as_bits=False)
        write_npy(root / "npy_bf16", args.samples, as_bits=True)
        os.sync()  # no write-back competing with the timed reads

        persistent = {"num_workers": args.workers, "persistent_workers": args.workers > 0}

        def ours(dtype: str | None) -> Callable[[], Iterable]:
            config = ReaderConfig(shards=[str(root / "shards")], batch_size=args.batch_size, epochs=args.epochs,
                                  shuffle_buffer=args.shard_size, dtype=dtype, num_workers=args.workers)
            return lambda: ShardLoader(config)

        def naive(as_bits: bool) -> Callable[[], Iterable]:
            data = NpyPerSample(root / ("npy_bf16" if as_bits else "npy_fp32"), args.samples, as_bits)
            return lambda: epochs_of(DataLoader(data, batch_size=args.batch_size, shuffle=True, **persistent),
                                     args.epochs)

        def stock() -> Iterable:
            return epochs_of(DataLoader(stock_webdataset(root / "shards", args.batch_size), batch_size=None,
                                        **persistent), args.epochs)

        loaders = [  # (name, folder read, batches)
            ("ours: tensor refs from workers, one read into the batch, bf16 out", "shards", ours(None)),
            ("ours, fp32 out (cast while gathering)", "shards", ours("fp32")),
            ("stock webdataset + safetensors.load in the workers, bf16 out", "shards", stock),
            (BASELINE, "npy_fp32", naive(as_bits=False)),
            ("naive: .npy per tensor per sample, bf16 bits as int16", "npy_bf16", naive(as_bits=True)),
        ]
        load_before = os.getloadavg()[0]
        for _, _, make in tqdm(loaders, desc="warm-up"):
            samples_per_second(make())  # page cache, allocator
        runs: dict[str, list[float]] = {name: [] for name, _, _ in loaders}
        for _ in tqdm(range(args.repeats), desc="timed rounds"):  # interleaved: load changes hit every loader
            for name, _, make in loaders:
                runs[name].append(samples_per_second(make()))
        rows = [{"loader": name, "mb_per_sample": folder_mb_per_sample(root / folder, args.samples),
                 "samples_per_s": statistics.median(runs[name])} for name, folder, _ in loaders]
    baseline = next(r["samples_per_s"] for r in rows if r["loader"] == BASELINE)
    headers = [f"loader ({args.samples} samples, batch {args.batch_size}, {args.workers} workers)", "MB per sample",
               "samples/s", "vs naive fp32"]
    print(markdown_table(headers, [[r["loader"], f"{r['mb_per_sample']:.2f}", f"{r['samples_per_s']:.0f}",
                                    f"{r['samples_per_s'] / baseline:.1f}×"] for r in rows], align="lrrr"))
    print(f"\n{os.cpu_count()} CPUs; 1-minute load average {load_before:.1f} before the timed rounds, "
          f"{os.getloadavg()[0]:.1f} after")
    return rows


if __name__ == "__main__":
    main()
