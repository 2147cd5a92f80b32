"""The official prompt files: pinned hashes, the set's invariants, fetching into a cache, and selection."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from common.files import file_sha256
from eval.geneval.prompts import (
    METADATA,
    OBJECT_NAMES,
    official_file,
    read_metadata,
    read_object_names,
    select_prompts,
    tag_order,
)
from tests.conftest import shared_file


def official(spec) -> Path:
    """The test copy of an official file (`METADATA` or `OBJECT_NAMES`)."""
    return shared_file(f"geneval/{spec[0]}")


def test_local_copies_are_accepted_after_checking_their_hash():
    assert file_sha256(official(METADATA)) == METADATA[2]
    assert official_file(METADATA, official(METADATA)) == official(METADATA)
    assert official_file(OBJECT_NAMES, official(OBJECT_NAMES)) == official(OBJECT_NAMES)


def test_prompt_set_invariants():
    records = read_metadata(official(METADATA))
    names = read_object_names(official(OBJECT_NAMES))
    assert len(records) == 553 and len(names) == 80 and names[64:67] == ["computer mouse", "tv remote",
                                                                          "computer keyboard"]
    assert Counter(r["tag"] for r in records) == {"single_object": 80, "two_object": 99, "counting": 80,
                                                  "colors": 94, "position": 100, "color_attr": 100}
    assert sum(a["tag"] != b["tag"] for a, b in zip(records, records[1:])) == 5  # grouped by tag
    for r in records:
        assert all(req["class"] in names for req in r["include"] + r.get("exclude", []))
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
        else:
            assert "exclude" not in r
        for i, req in enumerate(r["include"]):
            if "position" in req:
                assert req["position"][1] < i


def test_a_wrong_file_is_an_error(tmp_path):
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_text('{"tag": "single_object"}\n')
    with pytest.raises(ValueError, match="does not match the official GenEval file"):
        official_file(METADATA, bad)
    with pytest.raises(FileNotFoundError):
        official_file(METADATA, tmp_path / "missing.jsonl")


def test_fetched_once_into_the_cache_then_verified(tmp_path):
    spec = (METADATA[0], official(METADATA).as_uri(), METADATA[2])  # a file:// URL stands in for GitHub
    cached = official_file(spec, cache_dir=tmp_path)
    assert cached == tmp_path / METADATA[0] and file_sha256(cached) == METADATA[2]
    offline = (METADATA[0], (tmp_path / "nowhere").as_uri(), METADATA[2])
    assert official_file(offline, cache_dir=tmp_path) == cached  # no second fetch
    with pytest.raises(RuntimeError, match="--metadata"):
        official_file(offline, cache_dir=tmp_path / "empty")
    cached.write_text("tampered\n")
    with pytest.raises(ValueError, match="sha256"):
        official_file(spec, cache_dir=tmp_path)


def test_select_by_tag_and_first_n_per_tag():
    prompts = list(enumerate(read_metadata(official(METADATA))))
    smoke = select_prompts(prompts, limit=2)
    assert [i for i, _ in smoke] == [0, 1, 80, 81, 179, 180, 259, 260, 353, 354, 453, 454]
    assert [i for i, _ in select_prompts(prompts, tags=["counting", "position"], limit=1)] == [179, 353]
    assert len(select_prompts(prompts)) == 553
    with pytest.raises(ValueError, match="unknown tags"):
        select_prompts(prompts, tags=["shapes"])


def test_tag_order_is_the_papers_then_first_seen():
    assert tag_order(["position", "circles", "single_object", "position"]) == ["single_object", "position",
                                                                               "circles"]
