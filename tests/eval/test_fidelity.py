"""Fidelity to the teacher: detection matching (objects, colours, relations) and PSNR between two GenEval image
folders of the same prompts and seeds."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.shapes import Shape, layout, render, split_prompts
from eval.fidelity import fidelity, main, psnr, scene
from eval.geneval.layout import sample_path, write_metadata
from eval.geneval.shapes import PaletteColorClassifier, ShapesDetector
from models.sampling import save_png

DETECTOR, CLASSIFIER = ShapesDetector(), PaletteColorClassifier()


def write_folder(root, scenes: dict[tuple[int, int], tuple[dict, list[Shape]]]):
    for (index, sample), (record, objects) in scenes.items():
        write_metadata(root, index, record)
        save_png(torch.from_numpy(render(objects)), sample_path(root, index, sample))
    return root


def test_same_objects_and_relations_match_and_anything_else_does_not():
    a = Image.fromarray(render([Shape("circle", "red", 2, 2, 12), Shape("square", "blue", 18, 4, 12)]))
    moved = Image.fromarray(render([Shape("circle", "red", 3, 3, 11), Shape("square", "blue", 17, 5, 13)]))
    swapped = Image.fromarray(render([Shape("circle", "red", 18, 4, 12), Shape("square", "blue", 2, 2, 12)]))
    recoloured = Image.fromarray(render([Shape("circle", "green", 2, 2, 12), Shape("square", "blue", 18, 4, 12)]))
    extra = Image.fromarray(render([Shape("circle", "red", 2, 2, 12), Shape("square", "blue", 18, 4, 12),
                                    Shape("triangle", "red", 10, 18, 12)]))
    ref = scene(a, "two_object", DETECTOR, CLASSIFIER)
    assert scene(moved, "two_object", DETECTOR, CLASSIFIER) == ref  # other sizes and places, same relations
    for other in (swapped, recoloured, extra):
        assert scene(other, "two_object", DETECTOR, CLASSIFIER) != ref


def test_psnr():
    assert psnr(0.0) == math.inf
    assert psnr(255.0**2) == pytest.approx(0.0) and psnr(1.0) == pytest.approx(48.1308, abs=1e-4)


def test_fidelity_of_two_folders_per_tag_and_the_command(tmp_path):
    rng = random.Random(0)
    records = split_prompts("eval")[:12]
    scenes = {(i, j): (r, layout(r, rng)) for i, r in enumerate(records) for j in range(2)}
    reference = write_folder(tmp_path / "teacher" / "images", scenes)
    changed = dict(scenes)
    record, objects = scenes[(0, 1)]
    changed[(0, 1)] = (record, [Shape(o.kind, "purple" if o.color != "purple" else "red", o.x, o.y, o.size)
                                for o in objects])
    candidate = write_folder(tmp_path / "graft" / "images", changed)
    result = fidelity(reference, candidate, DETECTOR, CLASSIFIER)
    assert result["images"] == 24 and result["detection_match"] == pytest.approx(23 / 24)
    first_tag = records[0]["tag"]
    assert result["tags"][first_tag]["detection_match"] < 1
    expected_mse = np.mean((render(objects).astype(float) - render(changed[(0, 1)][1]).astype(float)) ** 2) / 24
    assert result["psnr_db"] == pytest.approx(psnr(expected_mse))
    assert result["identical"] == 23

    out = main(["--reference", str(tmp_path / "teacher"), "--candidate", str(tmp_path / "graft"),
                "--out", str(tmp_path / "fid")])
    assert json.loads((tmp_path / "fid" / "fidelity.json").read_text())["detection_match"] == out["detection_match"]
    assert "detections match" in (tmp_path / "fid" / "fidelity.md").read_text()
    assert Image.open(tmp_path / "fid" / "side_by_side.png").size[0] == 4 * 32 * 4  # 2 + 2 samples, 4× magnified


def test_folders_of_other_prompts_are_refused(tmp_path):
    rng = random.Random(1)
    records = split_prompts("eval")
    a = write_folder(tmp_path / "a", {(0, 0): (records[0], layout(records[0], rng))})
    b = write_folder(tmp_path / "b", {(0, 0): (records[1], layout(records[1], rng))})
    c = write_folder(tmp_path / "c", {(1, 0): (records[1], layout(records[1], rng))})
    with pytest.raises(ValueError, match="other prompts"):
        fidelity(a, b, DETECTOR, CLASSIFIER)
    with pytest.raises(ValueError, match="different images"):
        fidelity(a, c, DETECTOR, CLASSIFIER)
