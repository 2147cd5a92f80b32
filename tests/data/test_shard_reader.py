"""The shard reader: bit-exact round trips, skipped-and-counted damage, rank × worker splits, exact resumption."""
from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from common.runtime import Rank
from data.reader import ReaderConfig, ShardLoader, detect_kind
from data.sample_format import LATENT, LATENT_FLIP, TEXT, shard_sample
from data.shard_writer import write_shard
from tests.data.conftest import TEXT_DIM, synthetic_tensors, write_synthetic


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def read_all(folder: Path, num_workers: int = 0, rank: Rank = Rank(), **config) -> tuple[list[dict], ShardLoader]:
    config = {"batch_size": 4, "epochs": 1, **config}
    loader = ShardLoader(ReaderConfig(shards=[str(folder)], num_workers=num_workers, **config), rank)
    return list(loader), loader


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_write_then_read_is_bit_exact(text_shards, dtype):
    folder, written = text_shards
    batches, loader = read_all(folder, caption_tokens=10, dtype=dtype)
    seen = [k for b in batches for k in b["keys"]]
    assert sorted(seen) == sorted(written) and loader.skipped == {}
    for batch in batches:
        assert batch["text"].shape[1:] == (10, TEXT_DIM) and batch["text_mask"].dtype == torch.bool
        for i, key in enumerate(batch["keys"]):
            latent, text = written[key][LATENT], written[key][TEXT]
            n = len(text)
            if dtype is None:
                assert batch["latent"].dtype == torch.bfloat16
                assert torch.equal(bits(batch["latent"][i]), bits(latent))
                assert torch.equal(bits(batch["text"][i, :n]), bits(text))
            else:
                assert torch.equal(batch["latent"][i], latent.float())
                assert torch.equal(batch["text"][i, :n], text.float())
            assert batch["text"][i, n:].abs().sum() == 0
            assert batch["text_mask"][i].tolist() == [True] * n + [False] * (10 - n)


def test_text_longer_than_caption_tokens_is_cut(text_shards):
    folder, written = text_shards
    batches, _ = read_all(folder, caption_tokens=3)
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            n = min(3, len(written[key][TEXT]))
            assert torch.equal(batch["text"][i, :n], written[key][TEXT][:n]) and batch["text_mask"][i].sum() == n


def test_class_shards_give_labels_and_flips(tmp_path):
    written = write_synthetic(tmp_path, 12, 3, kind="class", flip=True)
    batches, loader = read_all(tmp_path, batch_size=3, epochs=2, flip=True)
    assert loader.config.kind == "class"  # detected from the shards
    sources = Counter()
    for batch in batches:
        assert "text" not in batch and batch["label"].dtype == torch.long
        for i, key in enumerate(batch["keys"]):
            assert batch["label"][i] == int(key) % 5
            source = [n for n in (LATENT, LATENT_FLIP) if torch.equal(batch["latent"][i], written[key][n])]
            assert len(source) == 1
            sources[source[0]] += 1
    assert sum(sources.values()) == 24 and sources[LATENT] > 0 and sources[LATENT_FLIP] > 0


def damaged_shards(folder: Path) -> list[str]:
    """6 shards of 4 good samples, 4 of them then damaged, plus a shard of 5 bad-in-one-way samples and 1 good one.
    Returns the keys a reader must yield."""
    write_synthetic(folder, 24, 4)
    shards = sorted(folder.glob("*.tar"))
    good = [f"{i:09d}" for i in range(24) if i // 4 in (0, 5)]

    def member_offsets(path: Path) -> list[tarfile.TarInfo]:
        with tarfile.open(path) as tar:
            return tar.getmembers()

    mid = member_offsets(shards[1])[7]  # sample 2's safetensors member: cut inside its data
    shards[1].write_bytes(shards[1].read_bytes()[:mid.offset_data + mid.size // 2])
    good += ["000000004", "000000005"]
    boundary = member_offsets(shards[2])[6]  # sample 2's first member: cut cleanly before its header
    shards[2].write_bytes(shards[2].read_bytes()[:boundary.offset])
    good += ["000000008", "000000009"]
    shards[3].write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy().tobytes())
    shards[4].write_bytes(b"")
    odd = [shard_sample(100, {LATENT: torch.zeros(4, 8, 8)}, {}),                              # no text features
           shard_sample(101, {LATENT: torch.zeros(3, 8, 8), TEXT: torch.zeros(2, TEXT_DIM)}, {}),  # 3 channels
           {**shard_sample(102, synthetic_tensors(102), {}), "safetensors": b"\x00" * 7},  # undecodable
           {"__key__": "000000103", "txt": b"caption only"},                                    # no tensors
           shard_sample(104, synthetic_tensors(104), {})]
    write_shard(folder / "shard-r000-000006.tar", 6, range(100, 105), odd)
    return good + ["000000104"]


EXPECTED_SKIPS = {"corrupt_shard": 4, "missing_key": 3, "bad_shape": 1, "undecodable": 1}


def test_damaged_shards_and_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    good = damaged_shards(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        batches, loader = read_all(tmp_path)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    assert dict(loader.skipped) == EXPECTED_SKIPS
    skipped_lines = [r.message for r in caplog.records if r.message.startswith("skipped")]
    assert len(skipped_lines) == sum(EXPECTED_SKIPS.values())
    assert any("truncated" in line for line in skipped_lines)
    assert loader.state_dict()["skipped"] == EXPECTED_SKIPS


def test_skip_counts_reach_the_main_process_from_workers(tmp_path):
    good = damaged_shards(tmp_path)
    batches, loader = read_all(tmp_path, num_workers=2)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    assert dict(loader.skipped) == EXPECTED_SKIPS


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_reader_counts_skips_as_an_uninterrupted_one(tmp_path, num_workers):
    damaged_shards(tmp_path)
    config = ReaderConfig(shards=[str(tmp_path)], batch_size=2, epochs=2, shuffle_buffer=3, num_workers=num_workers)
    reference = list(ShardLoader(config))
    for cut in range(1, len(reference)):
        first = ShardLoader(config)
        for n, _ in enumerate(first, start=1):
            if n == cut:
                break
        state = json.loads(json.dumps(first.state_dict()))
        resumed = ShardLoader(config, state=state)
        rest = list(resumed)
        assert [b["keys"] for b in rest] == [b["keys"] for b in reference[cut:]]
        assert dict(resumed.skipped) == {k: 2 * v for k, v in EXPECTED_SKIPS.items()}, f"cut after {cut} batches"


def test_kind_detection_warns_about_unreadable_shards(text_shards, tmp_path, caplog):
    folder, _ = text_shards
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar")
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        assert detect_kind([str(broken), *sorted(str(p) for p in folder.glob("*.tar"))]) == "text"
    assert any("broken.tar" in r.message for r in caplog.records)


@pytest.mark.parametrize("num_shards", [8, 7])  # 7: uneven over 4 slots, still exactly once
def test_two_ranks_times_two_workers_read_each_sample_once_per_epoch(tmp_path, num_shards):
    write_synthetic(tmp_path, num_shards * 5, 5)
    for epochs in (1, 2):
        per_rank = [Counter(k for b in read_all(tmp_path, 2, Rank(r, 2), epochs=epochs, batch_size=3)[0]
                            for k in b["keys"]) for r in range(2)]
        total = per_rank[0] + per_rank[1]
        assert set(total.values()) == {epochs} and len(total) == num_shards * 5


def mixed_shape_shards(folder: Path) -> None:
    write_synthetic(folder, 40, 5, latent_hw=lambda i: (8, 8) if i % 3 else (6, 10))


@pytest.mark.parametrize("num_workers, cuts", [(2, (1, 8, 17, 26)), (0, (5, 14))])
def test_resumed_reader_yields_exactly_the_remaining_batches(tmp_path, num_workers, cuts):
    mixed_shape_shards(tmp_path)
    config = ReaderConfig(shards=[str(tmp_path)], batch_size=3, shuffle_buffer=7, seed=3,  # endless epochs
                          num_workers=num_workers)
    total = 32  # about two epochs of 40 samples

    def take(loader: ShardLoader, n: int) -> list[dict]:
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
        raise AssertionError("the endless reader stopped")

    reference = take(ShardLoader(config), total)
    for batch in reference:
        assert len({tuple(batch["latent"].shape)}) == 1
    assert {b["latent"].shape[2:] for b in reference} == {(8, 8), (6, 10)}  # both shapes, never mixed
    for cut in cuts:
        first = ShardLoader(config)
        take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = take(ShardLoader(config, state=state), total - cut)
        for expected, got in zip(reference[cut:], resumed):
            assert got["keys"] == expected["keys"]
            assert torch.equal(bits(got["latent"]), bits(expected["latent"]))
            assert torch.equal(got["text_mask"], expected["text_mask"])


def test_reader_state_only_resumes_the_same_setup(text_shards):
    folder, _ = text_shards
    config = ReaderConfig(shards=[str(folder)], batch_size=3, num_workers=0)
    loader = ShardLoader(config)
    next(iter(loader))
    with pytest.raises(ValueError, match="batch_size: saved 3, now 4"):
        ShardLoader(replace(config, batch_size=4), state=loader.state_dict())
    with pytest.raises(ValueError, match="num_workers"):
        ShardLoader(replace(config, num_workers=2), state=loader.state_dict())


def test_too_few_shards_for_the_reader_slots(text_shards):
    folder, _ = text_shards
    with pytest.raises(ValueError, match="8 shards cannot feed 4 ranks × 4 workers"):
        ShardLoader(ReaderConfig(shards=[str(folder)], batch_size=2, num_workers=4), Rank(0, 4))
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardLoader(ReaderConfig(shards=[str(folder / "nothing-*.tar")], batch_size=2))
    with pytest.raises(ValueError, match="shards is empty"):
        ShardLoader(ReaderConfig(batch_size=2))



def test_a_slot_whose_epoch_holds_only_bad_shards_draws_other_shards_next_epoch(tmp_path, caplog):
    """3 of 4 shards are garbage: in some epochs a slot draws only garbage. It goes on with the next epoch's shards
    instead of ending the run, and the batches it reads are all good samples."""
    written = write_synthetic(tmp_path, 4, 4)  # one good shard of 4 samples
    for n in range(1, 4):
        (tmp_path / f"junk-{n}.tar").write_bytes(b"not a tar file" * 10)
    loader = ShardLoader(ReaderConfig(shards=[str(tmp_path)], batch_size=4, num_workers=0), Rank(0, 2))
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        batches = [b for b, _ in zip(loader, range(6))]
    assert all(set(b["keys"]) == set(written) for b in batches)
    assert loader.skipped["corrupt_shard"] >= 3
    assert "gave no valid sample" in caplog.text and "going on with the next epoch" in caplog.text


def test_a_data_set_without_any_good_sample_is_a_clear_error(tmp_path):
    write_synthetic(tmp_path, 8, 4, latent_hw=lambda i: (16, 16))  # every latent of the wrong size
    loader = ShardLoader(ReaderConfig(shards=[str(tmp_path)], batch_size=2, num_workers=0, latent_size=(8, 8)))
    with pytest.raises(RuntimeError, match=r"none of the 2 shards holds a valid sample .*bad_shape"):
        next(iter(loader))


def test_workers_of_a_distributed_process_come_from_a_fork_server(tmp_path):
    """With torch.distributed up, forking the process can deadlock the worker (`worker_context`): the workers
    are children of a fork server, not of this process, and read what forked workers read."""
    import psutil
    import torch.distributed as dist

    write_synthetic(tmp_path, 20, 5)
    forked, _ = read_all(tmp_path, 2, batch_size=3)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loader = iter(ShardLoader(ReaderConfig(shards=[str(tmp_path)], batch_size=3, epochs=1, num_workers=2)))
        served = [next(loader)]
        me = psutil.Process()
        children = me.children(recursive=True)
        workers = [p for p in children if p.ppid() != me.pid]
        assert len(workers) == 2 and all(p.parent() in children for p in workers), children
        served += list(loader)
    finally:
        dist.destroy_process_group()
    assert [b["keys"] for b in served] == [b["keys"] for b in forked]
    for a, b in zip(served, forked):
        assert torch.equal(bits(a["latent"]), bits(b["latent"]))
