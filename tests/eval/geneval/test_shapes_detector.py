"""The shapes world's exact detector and colour classifier on hand-made images: boxes, masks, scores, noise,
imperfect shapes, and colours of crops as GenEval makes them."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.shapes import BACKGROUND, PALETTE, SHAPES, Shape, render, shape_mask
from eval.geneval.colours import object_crop
from eval.geneval.rules import COLORS
from eval.geneval.shapes import MIN_SIDE, PaletteColorClassifier, ShapesDetector, classify_shape


def image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("kind", SHAPES)
def test_a_rendered_shape_is_found_with_score_one_and_mmdet_style_box_and_mask(kind):
    shape = Shape(kind, "blue", 5, 9, 13)
    found = ShapesDetector().detect(image(render([shape])))
    assert list(found) == [kind] and len(found[kind]) == 1
    det = found[kind][0]
    assert det.score == 1.0 and det.box == (5.0, 9.0, 18.0, 22.0)
    assert det.mask.shape == (32, 32) and det.mask.sum() == shape_mask(kind, 13, 13).sum()


def test_shapes_are_told_apart_by_their_best_fitting_template():
    assert classify_shape(shape_mask("circle", 12, 12)) == ("circle", 1.0)
    corner_cut = shape_mask("square", 12, 12).copy()
    corner_cut[0, 0] = corner_cut[0, -1] = False
    kind, score = classify_shape(corner_cut)
    assert kind == "square" and score == pytest.approx(142 / 144)
    stretched = np.ones((6, 12), dtype=bool)  # a filled 12 × 6 rectangle fits the square template, at half aspect
    assert classify_shape(stretched) == ("square", 0.5)


def test_noise_small_fragments_and_near_palette_pixels():
    pixels = np.full((32, 32, 3), BACKGROUND, dtype=np.int32)
    pixels[2:2 + MIN_SIDE - 1, 2:2 + MIN_SIDE - 1] = PALETTE["red"]  # too small to be an object
    pixels[10:22, 10:22] = np.array(PALETTE["green"]) + np.array([12, -10, 8])  # off-palette, nearest is green
    found = ShapesDetector().detect(image(pixels))
    assert list(found) == ["square"] and found["square"][0].box == (10.0, 10.0, 22.0, 22.0)


def test_objects_of_two_colours_that_touch_stay_apart_but_one_colour_merges():
    pixels = render([Shape("square", "red", 2, 2, 10), Shape("square", "blue", 12, 2, 10)])
    assert len(ShapesDetector().detect(image(pixels))["square"]) == 2
    pixels = render([Shape("square", "red", 2, 2, 10), Shape("square", "red", 12, 2, 10)])
    merged = ShapesDetector().detect(image(pixels))["square"]
    assert len(merged) == 1 and merged[0].score == pytest.approx(0.5)  # one 20 × 10 box: aspect 0.5


def test_detections_are_sorted_by_score():
    pixels = render([Shape("circle", "red", 1, 1, 12), Shape("circle", "blue", 18, 18, 12)])
    pixels[18:30, 18:20] = PALETTE["blue"]  # a ragged blue circle
    scores = [d.score for d in ShapesDetector().detect(image(pixels))["circle"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[1] < 1.0


def test_palette_classifier_names_the_colour_of_geneval_crops():
    classifier = PaletteColorClassifier()
    pixels = render([Shape("triangle", "purple", 4, 4, 14), Shape("circle", "orange", 18, 18, 12)])
    img = image(pixels)
    dets = ShapesDetector().detect(img)
    crops = [object_crop(img, d.box, d.mask) for name in ("triangle", "circle") for d in dets[name]]
    assert classifier.classify(crops, COLORS, "shape") == ["purple", "orange"]
    whole = object_crop(img, (0, 0, 32, 32), None)  # no mask: most palette pixels win (the triangle's)
    assert classifier.classify([whole], COLORS, "triangle") == ["purple"]
    with pytest.raises(ValueError, match="lack the shapes world"):
        classifier.classify(crops, ("red", "green"), "triangle")
