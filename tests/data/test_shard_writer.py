"""The shard writer: a shard counts as finished only with both its tar and its index; leftovers are cleaned."""
from __future__ import annotations

import json

from common.runtime import Rank
from data.sample_format import LATENT, shard_sample
from data.shard_writer import ShardPlan, finished_shards, write_shards
from tests.data.conftest import synthetic_tensors

PLAN = ShardPlan(6, 2)


def samples(indices: range) -> list[dict]:
    return [shard_sample(i, {LATENT: synthetic_tensors(i, text=False)[LATENT]}, {"index": i}) for i in indices]


def test_index_is_written_after_its_tar(tmp_path):
    written = write_shards(tmp_path, PLAN, Rank(), samples)
    assert [p.name for p in written] == [f"shard-r000-00000{i}.tar" for i in range(3)]
    for path in written:
        index = json.loads(path.with_suffix(".json").read_text())
        assert index["bytes"] == path.stat().st_size and index["samples"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in written] + [p.with_suffix(".json").name for p in written])


def test_a_shard_without_tar_or_without_index_is_unfinished_and_cleaned(tmp_path):
    write_shards(tmp_path, PLAN, Rank(), samples)
    reference = {i: p.read_bytes() for i, p in finished_shards(tmp_path).items()}
    (tmp_path / "shard-r000-000001.tar").rename(tmp_path / "shard-r001-000001.tar")  # a tar killed before its index
    (tmp_path / "shard-r000-000002.tar").unlink()  # an orphan index of a shard without tar (another rank's name)
    (tmp_path / "shard-r000-000002.json").rename(tmp_path / "shard-r001-000002.json")
    (tmp_path / ".shard-r000-000002.tar.abc.tmp").write_bytes(b"partial")
    assert sorted(finished_shards(tmp_path)) == [0]

    assert [p.name for p in write_shards(tmp_path, PLAN, Rank(), samples)] == ["shard-r000-000001.tar",
                                                                              "shard-r000-000002.tar"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"shard-r000-00000{i}.{ext}" for i in range(3) for ext in ("json", "tar")]
    assert {i: p.read_bytes() for i, p in finished_shards(tmp_path).items()} == reference
