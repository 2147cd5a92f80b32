"""`python eval/geneval.py --world shapes`: the same harness on the shapes world (its exact detector, held-out
prompts and shipped teacher as defaults), and `--metadata` with any prompt file in GenEval's schema."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from data.shapes import split_prompts
from eval.geneval import cli as geneval
from eval.geneval.worlds import get_world, prompt_set
from models.teachers import SHAPES_TEACHER


def run(out, pipeline, *extra):
    geneval.main(["--world", "shapes", "--pipeline", str(pipeline), "--out", str(out), "--steps", "2",
                  "--samples-per-prompt", "2", "--batch-size", "8", *extra])
    return json.loads((out / "scores.json").read_text())


def test_world_run_scores_held_out_prompts_with_the_exact_detector(shapes_pipeline, tmp_path):
    scores = run(tmp_path, shapes_pipeline, "--limit", "1")
    assert scores["images"] == 12 and list(scores["tags"]) == ["single_object", "two_object", "counting", "colors",
                                                               "position", "color_attr"]
    assert scores["run"]["detector"]["backend"] == "shapes-exact" and scores["run"]["world"] == "shapes"
    assert scores["overall_prompt_agnostic_baseline"] is not None
    held = split_prompts("eval")
    first = json.loads((tmp_path / "images" / "00000" / "metadata.jsonl").read_text())
    assert first == held[0]
    with Image.open(tmp_path / "images" / "00000" / "samples" / "0000.png") as image:
        assert image.size == (32, 32)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(isinstance(r["correct"], bool) for r in rows)
    assert (tmp_path / "summary.md").read_text().count("|") > 20 and (tmp_path / "grid.png").is_file()


def test_any_prompt_file_in_genevals_schema_and_bad_ones_named(shapes_pipeline, tmp_path):
    custom = tmp_path / "mine.jsonl"
    records = [{"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "purple"}],
                "prompt": "a photo of a purple triangle"},
               {"tag": "counting", "include": [{"class": "square", "count": 3}],
                "exclude": [{"class": "square", "count": 4}], "prompt": "a photo of three squares"}]
    custom.write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = run(tmp_path / "out", shapes_pipeline, "--metadata", str(custom))
    assert scores["images"] == 4 and set(scores["tags"]) == {"colors", "counting"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n" + json.dumps({**records[1], "include": [{"class": "cat",
                                                                                          "count": 1}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: class 'cat'"):
        run(tmp_path / "bad", shapes_pipeline, "--metadata", str(bad))


def test_world_defaults_and_prompt_sets():
    world = get_world("shapes")
    assert world.teacher == SHAPES_TEACHER and world.class_names == ("circle", "square", "triangle")
    assert prompt_set("shapes:val") == split_prompts("val")
    with pytest.raises(ValueError, match="unknown split"):
        prompt_set("shapes:test")
    with pytest.raises(ValueError, match="unknown world"):
        get_world("coco")
