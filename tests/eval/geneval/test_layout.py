"""The official folder layout: names written, and exactly the files the official evaluator would read."""
from __future__ import annotations

import json

from PIL import Image

from eval.geneval.layout import list_images, sample_path, write_metadata


def test_sample_names_and_metadata_round_trip(tmp_path):
    assert sample_path(tmp_path, 7, 3) == tmp_path / "00007" / "samples" / "0003.png"
    record = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a pink car"}
    write_metadata(tmp_path, 7, record)
    text = (tmp_path / "00007" / "metadata.jsonl").read_text()
    assert json.loads(text) == record and list(json.loads(text)) == list(record)  # key order kept


def test_walker_takes_digit_folders_and_numbered_pngs_in_sorted_order(tmp_path):
    def png(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(path)

    for index in (12, 3):
        write_metadata(tmp_path, index, {"tag": "single_object", "prompt": f"p{index}", "include": []})
    for name in ("0001.png", "0000.png", "00002.png", "grid.png", "0003.jpg", "x0004.png"):
        png(tmp_path / "00003" / "samples" / name)
    png(tmp_path / "00012" / "samples" / "0000.png")
    png(tmp_path / "notes" / "samples" / "0000.png")  # not a digit folder
    (tmp_path / "generation.json").write_text("{}")
    found = list_images(tmp_path)
    assert [(img.index, img.path.name) for img in found] == [(3, "0000.png"), (3, "0001.png"), (3, "00002.png"),
                                                             (12, "0000.png")]
    assert found[-1].metadata["prompt"] == "p12"


def test_a_prompt_folder_with_an_unknown_tag_or_broken_record_is_named(tmp_path):
    import pytest

    from eval.geneval.prompts import MetadataError

    write_metadata(tmp_path, 4, {"tag": "shapes", "prompt": "p", "include": []})
    with pytest.raises(MetadataError, match=r"00004/metadata.jsonl \(the images of 00004/samples\): field tag: "
                                            r"'shapes' is not one of GenEval's tags"):
        list_images(tmp_path)
    (tmp_path / "00004" / "metadata.jsonl").write_text('{"tag": "single')
    with pytest.raises(MetadataError, match=r"00004/metadata.jsonl: not a JSON prompt record"):
        list_images(tmp_path)
