"""The detection pass with a fake detector and colour classifier, the detections file round trip, aggregation,
the prompt-agnostic baseline and the report files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eval.geneval.detections import ImageDetections, detect_image, load_detections, save_detections
from eval.geneval.report import write_grid, write_results, write_summary
from eval.geneval.rules import Detection, ScoringOptions
from eval.geneval.scoring import RESULT_FIELDS, prompt_agnostic_baseline, score_image, summarize

COLORS_PROMPT = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}],
                 "prompt": "a photo of a red cat"}
CAT_PROMPT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
DOG_PROMPT = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


class FakeDetector:
    info = {"backend": "fake"}

    def __init__(self, found):
        self.found = found

    def detect(self, image):
        return self.found


class CentreColor:
    """Red when the crop's centre pixel is red, else black; records what it was asked."""

    info = {"backend": "centre pixel"}

    def __init__(self):
        self.calls = []

    def classify(self, crops, colors, class_name):
        self.calls.append((class_name, [c.size for c in crops]))
        return ["red" if c.getpixel((c.width // 2, c.height // 2)) == (255, 0, 0) else "black" for c in crops]


class CentreRGB:
    """Red or blue by the crop's centre pixel."""

    info = {"backend": "centre pixel"}

    def classify(self, crops, colors, class_name):
        return ["red" if c.getpixel((c.width // 2, c.height // 2))[0] > 128 else "blue" for c in crops]


def red_cat_image():
    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[8:16, 8:16] = (255, 0, 0)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    found = {"cat": [Detection((4, 4, 20, 20), 0.95, mask), Detection((0, 0, 8, 8), 0.3, mask),
                     Detection((0, 0, 8, 8), 0.5, None)],
             "dog": [Detection((0, 0, 4, 4), 0.2, None)]}
    return Image.fromarray(pixels), found


def test_detection_pass_stores_above_the_lower_threshold_and_colours_only_when_asked():
    image, found = red_cat_image()
    colors = CentreColor()
    stored = detect_image(image, COLORS_PROMPT, FakeDetector(found), colors, ScoringOptions())
    assert list(stored) == ["cat"] and [d.score for d in stored["cat"]] == [0.95, 0.5]
    assert [d.color for d in stored["cat"]] == ["red", "black"] and all(d.mask is None for d in stored["cat"])
    assert colors.calls == [("cat", [(16, 16), (8, 8)])]
    plain = detect_image(image, CAT_PROMPT, FakeDetector(found), colors, ScoringOptions())
    assert [d.color for d in plain["cat"]] == [None, None] and len(colors.calls) == 1
    with pytest.raises(ValueError, match="colour classifier"):
        detect_image(image, COLORS_PROMPT, FakeDetector(found), None, ScoringOptions())


def scored_set() -> list[ImageDetections]:
    cat = [Detection((0.0, 0.0, 8.0, 8.0), 0.95, color="red")]
    return [ImageDetections("a.png", CAT_PROMPT, {"cat": cat}),
            ImageDetections("b.png", DOG_PROMPT, {"cat": cat}),
            ImageDetections("c.png", DOG_PROMPT, {"dog": [Detection((1.0, 1.0, 5.0, 5.0), 0.5)]}),
            ImageDetections("d.png", COLORS_PROMPT, {"cat": cat})]


def test_rows_follow_the_official_schema():
    row = score_image(scored_set()[0])
    assert tuple(row) == RESULT_FIELDS and row["correct"] is True and row["reason"] == ""
    assert json.loads(row["metadata"]) == CAT_PROMPT and row["metadata"] == json.dumps(CAT_PROMPT)
    assert json.loads(row["details"]) == {"cat": [[0.0, 0.0, 8.0, 8.0, 0.95]]}
    assert score_image(scored_set()[0], metadata=DOG_PROMPT)["correct"] is False


def test_detections_file_round_trip_rescores_identically(tmp_path):
    images, options = scored_set(), ScoringOptions()
    save_detections(tmp_path / "detections.json", images, options, {"detector": {"backend": "fake"}})
    loaded, run = load_detections(tmp_path / "detections.json", options)
    assert run == {"detector": {"backend": "fake"}}
    assert [score_image(d) for d in loaded] == [score_image(d) for d in images]
    stricter = ScoringOptions(threshold=0.6)
    reloaded, _ = load_detections(tmp_path / "detections.json", stricter)
    assert score_image(reloaded[2], stricter)["correct"] is False  # the 0.5 dog no longer counts


def test_a_tie_between_a_blue_and_a_red_object_scores_like_upstream_after_storing_and_rescoring(tmp_path):
    """Upstream puts the later of two tied detections first, so here the blue cat is the one CLIP's colour is
    checked on. Sorting the stored list again at scoring time would bring the red one back to the top."""
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    pixels = np.array(image)
    pixels[:, :16] = (255, 0, 0)
    image = Image.fromarray(pixels)
    found = {"cat": [Detection((0, 0, 16, 32), 0.75), Detection((16, 0, 32, 32), 0.75)]}
    blue_cat = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "blue"}],
                "prompt": "a photo of a blue cat"}
    stored = detect_image(image, blue_cat, FakeDetector(found), CentreRGB(), ScoringOptions())
    assert [d.color for d in stored["cat"]] == ["blue", "red"]
    images = [ImageDetections("tie.png", blue_cat, stored)]
    assert score_image(images[0])["correct"] is True
    save_detections(tmp_path / "d.json", images, ScoringOptions(), {})
    loaded, _ = load_detections(tmp_path / "d.json", ScoringOptions())
    assert score_image(loaded[0])["correct"] is True
    red_cat = {**blue_cat, "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"}
    assert score_image(loaded[0], metadata=red_cat)["correct"] is False


@pytest.mark.parametrize("pairs, problem", [(["threshold=0.2"], "thresholds below 0.3"),
                                            (["max_objects=20"], "max_objects"),
                                            (["bgcolor=original"], "bgcolor"), (["colors=red,blue"], "colors")])
def test_detections_cannot_be_rescored_beyond_what_was_stored(tmp_path, pairs, problem):
    save_detections(tmp_path / "d.json", scored_set(), ScoringOptions(), {})
    with pytest.raises(ValueError, match=problem):
        load_detections(tmp_path / "d.json", ScoringOptions.from_pairs(pairs))


def row(tag, prompt, correct):
    return {"tag": tag, "metadata": json.dumps({"prompt": prompt}), "correct": correct}


def test_overall_is_the_mean_of_tag_means_not_of_images():
    rows = [row("single_object", "cat", True)] * 2 + [row("two_object", "p1", True), row("two_object", "p1", False)]
    rows += [row("two_object", p, False) for p in ("p2", "p2", "p3", "p3")]
    summary = summarize(rows)
    assert summary.tags["single_object"].score == 1 and summary.tags["two_object"].score == pytest.approx(1 / 6)
    assert summary.overall == pytest.approx((1 + 1 / 6) / 2) and summary.image_accuracy == pytest.approx(3 / 8)
    assert (summary.images, summary.prompts, summary.prompt_accuracy) == (8, 4, 0.5)
    assert summary.overall_baseline is None
    with pytest.raises(ValueError, match="no images"):
        summarize([])


def test_prompt_agnostic_baseline_scores_each_image_against_every_prompt_of_its_tag():
    images = scored_set()
    own = summarize([score_image(d) for d in images])
    assert own.tags["single_object"].score == pytest.approx(2 / 3)
    baseline = prompt_agnostic_baseline(images)
    assert baseline == {"single_object": pytest.approx(3 / 6), "colors": 1.0}
    summary = summarize([score_image(d) for d in images], baseline)
    assert summary.overall_baseline == pytest.approx(0.75)


def test_report_files(tmp_path):
    images = scored_set()
    for name, color in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (16, 16), color).save(tmp_path / name)
    for d in images:
        d.filename = str(tmp_path / d.filename)
    rows = [score_image(d) for d in images]
    summary = summarize(rows, prompt_agnostic_baseline(images))
    write_results(rows, tmp_path / "results.jsonl")
    parsed = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert parsed == rows and all(isinstance(r["metadata"], str) and isinstance(r["details"], str) for r in parsed)
    write_summary(summary, {"detector": {"backend": "fake"}, "seed": 42}, tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text()
    assert "| single_object | 3 | 2 | 0.6667 | 0.5000 |" in text and "- seed: `42`" in text
    assert f"**Overall: {summary.overall:.5f}**" in text and "  - backend: `fake`" in text
    assert not write_grid(rows, tmp_path / "grid.png")  # d.png is not on disk
    assert write_grid(rows[:3], tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 24, 2 * 24)  # prompts cat and dog: rows of up to 2 framed 16+8 px tiles


def rewrite(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][1]["metadata"].update(tag="circles"),
     r"images\[1\] \(b.png\) metadata: field tag: 'circles' is not one of GenEval's tags"),
    (lambda d: d["images"][0]["metadata"]["include"][0].pop("count"),
     r"images\[0\] \(a.png\) metadata: field include\[0\].count: expected an integer ≥ 1, got None"),
    (lambda d: d["images"][3]["objects"]["cat"][0].update(box=[0, 0, 8]),
     r"images\[3\] \(d.png\): field objects.cat\[0\].box: expected four finite numbers"),
    (lambda d: d["images"][2]["objects"]["dog"][0].pop("score"),
     r"images\[2\] \(c.png\): field objects.dog\[0\].score: expected a finite number, got None"),
    (lambda d: d["images"][0].update(objects=[]), r"images\[0\] \(a.png\): field objects: expected an object"),
    (lambda d: d["images"][0].pop("filename"), r"images\[0\]: field filename: expected an object with a file name"),
    (lambda d: d["images"][0]["metadata"]["include"][0].update(position=["near", 0]),
     r"images\[0\] \(a.png\) metadata: field include\[0\].position: expected \[one of"),
    (lambda d: d.pop("max_objects"), r"field max_objects: expected int, got None"),
])
def test_malformed_detections_files_name_the_file_the_image_and_the_field(tmp_path, change, message):
    path = tmp_path / "detections.json"
    save_detections(path, scored_set(), ScoringOptions(), {})
    rewrite(path, change)
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_detections(path, ScoringOptions())


def test_results_of_unknown_tags_are_not_averaged_in():
    rows = [row("single_object", "a", True), {**row("circles", "b", False), "filename": "b.png"}]
    with pytest.raises(ValueError, match=r"unknown tags \['circles'\] .*b.png"):
        summarize(rows)
