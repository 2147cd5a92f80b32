"""Training batches from shards: shuffled, split by rank and DataLoader worker, endless epochs, resumable.

    loader = ShardLoader(ReaderConfig(shards=["data/synthetic_2k"], batch_size=4, num_workers=2))
    for batch in loader:           # {"latent": (B,4,h,w), "text": (B,300,D), "text_mask": (B,300), "keys": [...]}
        ...
        checkpoint["data"] = loader.state_dict()     # later: ShardLoader(config, state=checkpoint["data"])

Every epoch permutes the shards with (seed, epoch) and deals them to the world_size × num_workers reader slots,
so each sample is read exactly once per epoch; each slot shuffles its samples through a buffer seeded by (seed,
epoch, rank, worker). The sequence of batches is a function of the config, the shard names, the world size and
the worker count, and the state dict records each worker's position in it, so a resumed loader yields exactly the
batches an uninterrupted one would have. Corrupt shards and bad samples are skipped, counted and logged.

Workers send only where each tensor lies in its shard (data/shard_io.py); the batch is read in this process.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import braceexpand
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from common.lifeline import exit_with
from common.runtime import Rank, parse_dtype
from data.batching import ShapeBuckets, collate
from data.sample_format import LABEL, LATENT, LATENT_FLIP, TENSORS, TEXT, SampleError, tensor_layout
from data.shard_io import TensorRef, mapped_tar_files
from data.skips import SkipCounter

log = logging.getLogger(__name__)
STATE_FORMAT = 1
_WARNED_UNEVEN: set[tuple[int, int]] = set()  # (shards, slots) already warned about in this process
#: config fields that decide which samples form which batches; a saved position is valid only if they match
ORDER_FIELDS = ("batch_size", "kind", "caption_tokens", "text_dim", "latent_channels", "latent_size", "flip",
                "shuffle_buffer", "seed")


@dataclass
class ReaderConfig:
    """What to read, how to batch it and how to load it: every reader option, in one place. Recipes embed it as
    `data.reader` (recipes/config.py) and fill `shards` and `seed` themselves."""

    shards: list[str] = field(default_factory=list)  # folders (their *.tar), globs, brace patterns, tar paths
    batch_size: int = 8  # per rank
    kind: Literal["auto", "text", "class"] = "auto"  # text: T5 features + mask; class: labels; auto: detect
    caption_tokens: int = 300  # text features are padded (or cut) to this many tokens
    text_dim: int | None = None  # expected feature width (4096 for T5-XXL); None: batches group by width
    latent_channels: int = 4
    latent_size: tuple[int, int] | None = None  # expected (h, w); None: batches group by latent size
    flip: bool = False  # use the stored flipped latent for a random half of the samples
    shuffle_buffer: int = 1000  # samples per worker; only their places are held, so RAM is not the limit
    seed: int = 0
    epochs: int | None = None  # None: endless
    dtype: str | None = None  # fp32 / bf16 / fp16 batches; None keeps the stored bf16 (cast on the device)
    num_workers: int = 2  # DataLoader worker processes per rank, one reader slot each (0: read in this process)
    pin_memory: bool = False  # allocate batches in pinned memory (CUDA only)


@dataclass
class WorkerPosition:
    """Where one reader slot stands: its epoch, how many samples of that epoch's shuffled stream it has passed,
    which of those sit in partial batches, and how many unreadable shards of that epoch it has counted."""

    epoch: int = 0
    consumed: int = 0
    pending: list[int] = field(default_factory=list)
    shard_errors: int = 0


def resolve_shards(specs: list[str]) -> list[str]:
    """Shard paths in a fixed order from folders, globs, brace patterns and paths; errors name what is missing."""
    paths: list[str] = []
    for spec in specs:
        if Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).glob("*.tar") if not p.name.startswith("."))
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec))
        else:
            found = list(braceexpand.braceexpand(spec))
        missing = [p for p in found if not Path(p).is_file()]
        if not found or missing:
            raise FileNotFoundError(f"no shards for {spec!r}" + (f": missing {missing[:5]}" if missing else "")
                                    + "; give shard folders, globs, brace patterns or .tar paths")
        paths += found
    duplicates = sorted(p for p, n in Counter(paths).items() if n > 1)
    if duplicates:
        raise ValueError(f"shards listed more than once: {duplicates[:5]}; each would be read twice per epoch")
    return paths


def plan_sample(raw: dict, config: ReaderConfig, epoch: int) -> tuple[tuple, dict]:
    """A raw tar sample → (shape key, {key, latent, text | label}) with tensors as `TensorRef`s, after checking
    its keys and shapes; SampleError says what is wrong."""
    if TENSORS not in raw:
        raise SampleError("missing_key", f"no .{TENSORS} member (has {sorted(k for k in raw if k[0] != '_')})")
    member = raw[TENSORS]
    layout = tensor_layout(member.view)
    flip = config.flip and random.Random(f"{config.seed}:{epoch}:{raw['__key__']}").random() < 0.5
    needed = [LATENT_FLIP if flip else LATENT] + ([TEXT] if config.kind == "text" else [])
    refs = {}
    for name in needed:
        if name not in layout:
            raise SampleError("missing_key", f"no {name!r} tensor (has {sorted(layout)})")
        dtype, shape, offset = layout[name]
        refs[name] = TensorRef(member.path, member.offset + offset, dtype, shape)
    latent = refs[needed[0]]
    if (len(latent.shape) != 3 or latent.shape[0] != config.latent_channels or not latent.dtype.is_floating_point
            or (config.latent_size is not None and latent.shape[1:] != tuple(config.latent_size))):
        raise SampleError("bad_shape", f"latent {latent.dtype}{list(latent.shape)}, expected floating point "
                                       f"({config.latent_channels}, {config.latent_size or 'h, w'})")
    sample = {"key": raw["__key__"], "latent": latent}
    if config.kind == "class":
        if LABEL not in raw:
            raise SampleError("missing_key", f"no .{LABEL} member (class label)")
        label = bytes(raw[LABEL].view).strip()
        if not label.isdigit():
            raise SampleError("undecodable", f"class label {label[:20]!r} is not a non-negative integer")
        sample["label"] = int(label)
        return latent.shape, sample
    text = refs[TEXT]
    if (len(text.shape) != 2 or text.shape[0] == 0 or not text.dtype.is_floating_point
            or (config.text_dim is not None and text.shape[1] != config.text_dim)):
        raise SampleError("bad_shape", f"text features {text.dtype}{list(text.shape)}, expected floating point "
                                       f"(tokens ≥ 1, {config.text_dim or 'D'})")
    if text.shape[0] > config.caption_tokens:  # the first caption_tokens rows are a prefix of the stored bytes
        text = replace(text, shape=(config.caption_tokens, text.shape[1]))
    sample["text"] = text
    return (latent.shape, text.shape[1]), sample


def detect_kind(shards: list[str]) -> str:
    """'text' or 'class', from the first readable sample that tells (T5 features, or a class label)."""
    def on_error(exn: Exception) -> bool:
        log.warning("detecting the data kind: skipped an unreadable shard (%s)", exn)
        return True

    for raw in group_by_keys(mapped_tar_files(({"url": p} for p in shards), handler=on_error)):
        if TENSORS in raw:
            try:
                if TEXT in tensor_layout(raw[TENSORS].view):
                    return "text"
            except SampleError:
                continue
        if LABEL in raw:
            return "class"
    raise ValueError(f"no sample in {len(shards)} shards ({shards[0]}, …) has T5 features ('{TEXT}' tensor) or a "
                     f"class label (.{LABEL}); are these shards from data.generate or data.precompute?")


class ShardErrors:
    """The pipeline's error handler for one slot's epoch: counts each unreadable shard as a `corrupt_shard` skip
    and goes on. A resumed slot replays its epoch from the start; the first `counted` errors of the replay were
    counted before the interruption and are not counted again."""

    def __init__(self, skips: SkipCounter, counted: int = 0):
        self.skips, self.counted, self.seen = skips, counted, 0

    def __call__(self, exn: Exception) -> bool:
        self.seen += 1
        if self.seen > self.counted:
            self.skips.skip("corrupt_shard", str(exn))
        return True


class ShardStream(IterableDataset):
    """The batches of this rank's reader slots; each DataLoader worker runs one slot from its saved position.

    `first_slot` is the slot worker 0 runs: the DataLoader always asks worker 0 first, and the batch an
    uninterrupted run would have produced next may belong to another slot.
    """

    def __init__(self, config: ReaderConfig, shards: list[str], rank: Rank, positions: list[WorkerPosition],
                 first_slot: int):
        self.config, self.shards, self.rank = config, shards, rank
        self.positions, self.first_slot = positions, first_slot

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slot = (worker_id + self.first_slot) % num_workers
        yield from self.slot_batches(slot, num_workers, self.positions[slot])

    def epoch_shards(self, epoch: int, slot: int, num_workers: int) -> list[str]:
        """This slot's shards in `epoch`: a (seed, epoch) permutation dealt round-robin over all slots."""
        order = list(self.shards)
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        return order[self.rank.rank * num_workers + slot::self.rank.world_size * num_workers]

    def raw_samples(self, epoch: int, slot: int, num_workers: int, on_error: ShardErrors) -> Iterator[dict]:
        """Undecoded samples of this slot's epoch, shuffled (cheap to replay: they are views of mapped files)."""
        rng = random.Random(f"{self.config.seed}:{epoch}:{self.rank.rank}:{slot}")
        return iter(wds.DataPipeline(
            wds.SimpleShardList(self.epoch_shards(epoch, slot, num_workers)),
            partial(mapped_tar_files, handler=on_error),
            partial(group_by_keys, handler=on_error),
            wds.shuffle(self.config.shuffle_buffer, initial=self.config.shuffle_buffer, rng=rng)))

    def slot_batches(self, slot: int, num_workers: int, start: WorkerPosition) -> Iterator[dict]:
        """One slot's batch plans from `start` on. Samples before `start.consumed` are passed over unread, except
        the `start.pending` ones, which go back into their partial batches. Each epoch ends with its partial
        batches, short, so no sample waits across epochs."""
        cfg, skips = self.config, SkipCounter(log)
        epoch, skip_to, pending = start.epoch, start.consumed, set(start.pending)
        errors = ShardErrors(skips, counted=start.shard_errors)
        barren: set[str] = set()  # shards this slot drew in its latest epochs that gave no valid sample at all
        while cfg.epochs is None or epoch < cfg.epochs:
            buckets, valid, total = ShapeBuckets(cfg.batch_size), 0, 0
            for i, raw in enumerate(self.raw_samples(epoch, slot, num_workers, errors)):
                total = i + 1
                if i < skip_to and i not in pending:
                    continue
                try:
                    shape, sample = plan_sample(raw, cfg, epoch)
                except SampleError as err:
                    skips.skip(err.reason, f"sample {raw['__key__']} of {raw['__url__']}: {err}")
                    continue
                valid += 1
                full = buckets.add(i, shape, sample)
                if full is not None:
                    yield self.message(slot, WorkerPosition(epoch, i + 1, buckets.pending(), errors.seen), skips,
                                       full)
            if valid == 0 and skip_to == 0 and cfg.epochs is None:
                self.check_not_barren(barren, epoch, slot, num_workers, skips)
            elif valid:
                barren.clear()
            for rest in buckets.flush():
                held = buckets.pending()
                position = WorkerPosition(epoch, total, held, errors.seen) if held else WorkerPosition(epoch + 1)
                yield self.message(slot, position, skips, rest)
            epoch, skip_to, pending, errors = epoch + 1, 0, set(), ShardErrors(skips)
        yield self.message(slot, WorkerPosition(epoch), skips)  # the end of a finite run: the last counts

    def check_not_barren(self, barren: set[str], epoch: int, slot: int, num_workers: int, skips: SkipCounter
                         ) -> None:
        """A slot whose epoch gave no valid sample goes on with the next epoch, which deals it other shards; only
        when its barren epochs have covered every shard does the data set hold no usable sample, an error."""
        drawn = self.epoch_shards(epoch, slot, num_workers)
        barren.update(drawn)
        if len(barren) == len(self.shards):
            raise RuntimeError(f"none of the {len(self.shards)} shards holds a valid sample (reader slot {slot} of "
                               f"rank {self.rank.rank} drew every one of them in epochs up to {epoch}; skipped: "
                               f"{dict(skips.counts)}); fix or remove those shards (see the warnings above)")
        log.warning("reader slot %d of rank %d: epoch %d gave no valid sample (its shards %s); going on with the next "
                    "epoch's shards", slot, self.rank.rank, epoch, drawn[:5])

    @staticmethod
    def message(slot: int, position: WorkerPosition, skips: SkipCounter, samples: list[dict] | None = None) -> dict:
        """What a worker sends: a batch plan (the samples' tensor references, small to pass between processes)
        if any, and its slot's position and new skip counts."""
        plan = {"_slot": slot, "_position": asdict(position), "_skipped": skips.new_since_last_call()}
        return plan if samples is None else {**plan, "samples": samples}


class ShardLoader:
    """This rank's training batches, a DataLoader over `ShardStream`; `state_dict()` is its exact position.

    Each rank saves its own state. A state only resumes a loader with the same shards, world size, worker count
    and ordering fields of the config (`ORDER_FIELDS`); anything else is an error that names what changed.
    """

    def __init__(self, config: ReaderConfig, rank: Rank | None = None, state: dict | None = None):
        if not config.shards:
            raise ValueError("ReaderConfig.shards is empty: give shard folders, globs, brace patterns or .tar paths")
        self.rank = rank or Rank.from_env()
        self.shards = resolve_shards(config.shards)
        self.config = config if config.kind != "auto" else replace(config, kind=detect_kind(self.shards))
        workers = max(config.num_workers, 1)
        slots = self.rank.world_size * workers
        if len(self.shards) < slots:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.rank.world_size} ranks × "
                             f"{workers} workers: every reader slot needs a shard each epoch. Write "
                             "smaller shards (--shard-size) or use fewer workers")
        if len(self.shards) % slots and (len(self.shards), slots) not in _WARNED_UNEVEN:
            _WARNED_UNEVEN.add((len(self.shards), slots))
            log.warning("%d shards over %d reader slots: slots get %d or %d shards per epoch, so ranks see "
                        "different numbers of batches per epoch (count training in steps, not epochs)",
                        len(self.shards), slots, len(self.shards) // slots, len(self.shards) // slots + 1)
        self.positions = [WorkerPosition() for _ in range(workers)]
        self.next_slot = 0
        self.batches = 0
        self.skipped: Counter[str] = Counter()
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        stream = ShardStream(self.config, self.shards, self.rank, list(self.positions), self.next_slot)
        text_tokens = self.config.caption_tokens if self.config.kind == "text" else None
        dtype = parse_dtype(self.config.dtype) if self.config.dtype else None
        workers = self.config.num_workers
        for plan in DataLoader(stream, batch_size=None, num_workers=workers,
                               worker_init_fn=partial(_end_with_the_reader, os.getpid()),
                               multiprocessing_context=worker_context() if workers else None):
            slot = plan["_slot"]
            self.positions[slot] = WorkerPosition(**plan["_position"])
            self.skipped.update(plan["_skipped"])
            self.next_slot = (slot + 1) % len(self.positions)
            if "samples" in plan:
                batch = collate(plan["samples"], text_tokens, dtype, self.config.pin_memory)
                self.batches += 1
                yield batch
        if self.skipped:
            log.warning("reader finished after skipping %d samples or shards: %s", sum(self.skipped.values()),
                        dict(self.skipped))

    def fingerprint(self) -> dict:
        names = "\n".join(Path(p).name for p in self.shards).encode()
        return {"shards": len(self.shards), "shard_names_sha256": hashlib.sha256(names).hexdigest(),
                "rank": self.rank.rank, "world_size": self.rank.world_size, "num_workers": self.config.num_workers,
                **{k: getattr(self.config, k) for k in ORDER_FIELDS}}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "fingerprint": self.fingerprint(), "batches": self.batches,
                "next_slot": self.next_slot, "positions": [asdict(p) for p in self.positions],
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"reader state format {state.get('format')!r} is not {STATE_FORMAT}")
        ours = _comparable(self.fingerprint())
        saved = _comparable(state["fingerprint"])
        changed = sorted(k for k in ours.keys() | saved.keys() if ours.get(k) != saved.get(k))
        if changed:
            raise ValueError("the saved reader position belongs to another reader set-up ("
                             + ", ".join(f"{k}: saved {saved.get(k)!r}, now {ours.get(k)!r}" for k in changed)
                             + "); resume with the same shards, world size, workers and config, or start afresh")
        self.positions = [WorkerPosition(**p) for p in state["positions"]]
        self.next_slot, self.batches = state["next_slot"], state["batches"]
        self.skipped = Counter(state["skipped"])


def worker_context() -> multiprocessing.context.BaseContext | None:
    """How DataLoader workers start: by forking this process (the platform default), except where
    torch.distributed is up. A rank's other threads (gloo's C++ threads among them) can hold CPython's
    thread-state lock at the moment of a fork, and on Python ≤ 3.11 the child then waits on that lock forever
    (cpython gh-112275; a stage-1 validation loader hung so in a 2-rank test). A fork server (started by
    fork + exec, single-threaded, with the reader imported) forks the workers instead."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data.reader"])
    return context


def _end_with_the_reader(reader: int, worker_id: int) -> None:
    """A DataLoader worker ends at once when the process it reads for dies (SIGKILL, OOM), not seconds later:
    its parent, or the fork server's client (which the fork server would otherwise outlive with its workers)."""
    exit_with(reader)


def _comparable(fingerprint: dict) -> dict:
    """Tuples and lists compare equal (a state may have been through JSON or YAML)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fingerprint.items()}
