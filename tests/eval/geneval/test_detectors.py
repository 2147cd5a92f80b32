"""Detector backends: mmdet-equivalent pre/post-processing on hand-made tensors, the transformers Mask2Former
loader on a tiny random model written in the real folder format, and the mmdet result conversion."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from eval.geneval.detectors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Mask2FormerDetector,
    MMDetDetector,
    from_mmdet_result,
    group_by_class,
    instance_postprocess,
    mask_to_box,
    preprocess,
    resized_shape,
)
from eval.geneval.prompts import read_object_names
from tests.conftest import add_to_hub_cache, shared_file
from tests.eval.geneval.tiny_models import write_tiny_mask2former


@pytest.fixture(scope="module")
def names() -> list[str]:
    """GenEval's 80 class names, in the detector's class-index order."""
    return read_object_names(shared_file("geneval/object_names.txt"))


def test_resize_matches_mmdet_keep_ratio_scale():
    assert resized_shape(512, 512) == (800, 800)
    assert resized_shape(1024, 1024) == (800, 800)
    assert resized_shape(600, 1000) == (800, 1333)
    assert resized_shape(400, 1200) == (444, 1333)  # the long side binds: 1333 / 1200


def test_preprocess_normalises_then_pads_with_zeros_to_32():
    image = Image.new("RGB", (50, 40), (123, 116, 103))
    pixels, size = preprocess(image, shortest=40, longest=100)
    assert size == (40, 50) and pixels.shape == (1, 3, 64, 64)
    expected = (torch.tensor([123.0, 116.0, 103.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pixels[0, :, :40, :50], expected.view(3, 1, 1).expand(3, 40, 50))
    assert (pixels[0, :, 40:] == 0).all() and (pixels[0, :, :, 50:] == 0).all()


def test_mask_to_box_adds_one_to_the_far_edges_and_zeros_empty_masks():
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert mask_to_box(masks).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_instance_postprocess_on_a_hand_made_blob(names):
    queries, classes = 3, len(names)
    class_logits = torch.full((queries, classes + 1), -20.0)
    class_logits[:, -1] = 0.0  # "no object" wins for queries 1 and 2
    class_logits[0, 15] = 10.0  # query 0: cat
    mask_logits = torch.full((queries, 16, 16), -8.0)
    mask_logits[0, 4:8, 2:10] = 8.0
    labels, scores, boxes, masks = instance_postprocess(class_logits, mask_logits, padded=(64, 64),
                                                        resized=(64, 64), original=(32, 32), max_per_image=100)
    assert len(labels) == 100 and masks.shape == (100, 32, 32)
    assert names[int(labels[0])] == "cat"
    prob = torch.softmax(class_logits[0], -1)[15]
    assert prob * 0.97 < scores[0] <= prob  # times the mean sigmoid inside the mask
    assert boxes[0].tolist() == [4.0, 8.0, 20.0, 16.0]  # the blob at 1/2 scale: x 2..10 → 4..20, y 4..8 → 8..16
    assert scores[1:].max() < 1e-3


def test_instance_postprocess_crops_the_padding_before_resizing():
    class_logits = torch.zeros(1, 3)
    mask_logits = torch.full((1, 8, 8), -5.0)
    mask_logits[0, :, :4] = 5.0  # left half of the resized image (padded 8 wide, resized 4 wide)
    _, _, boxes, masks = instance_postprocess(class_logits, mask_logits, padded=(8, 8), resized=(8, 4),
                                              original=(8, 8))
    assert masks[0].all()  # after cropping to the resized 8×4, the mask fills the original image
    assert boxes[0].tolist() == [0.0, 0.0, 8.0, 8.0]


def test_group_by_class_keeps_order_and_drops_low_scores(names):
    labels = torch.tensor([15, 16, 15])
    scores = torch.tensor([0.9, 0.2, 0.5])
    boxes = torch.arange(12.0).view(3, 4)
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    grouped = group_by_class(labels, scores, boxes, masks, names, min_score=0.3)
    assert list(grouped) == ["cat"] and [d.score for d in grouped["cat"]] == pytest.approx([0.9, 0.5])
    assert list(group_by_class(labels, scores, boxes, masks, names)) == ["cat", "dog"]
    assert list(group_by_class(labels.flip(0) + torch.tensor([1, 0, 0]), scores, boxes, masks, names)) == [
        "cat", "dog"]  # class-index order, whatever the score order
    assert grouped["cat"][1].box == (8.0, 9.0, 10.0, 11.0) and grouped["cat"][0].mask.shape == (4, 4)


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory, names):
    return write_tiny_mask2former(tmp_path_factory.mktemp("mask2former"), names, confident_class=names.index("cat"))


def test_tiny_mask2former_loads_from_its_folder_and_detects(tiny_detector, names):
    detector = Mask2FormerDetector.from_path(tiny_detector, names, shortest=64, longest=128)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    found = detector.detect(image)
    assert set(found) <= set(names) and "cat" in found
    assert sum(map(len, found.values())) <= 100  # mmdet's max_per_image over 8 queries × 80 classes
    for dets in found.values():
        for d in dets:
            assert 0 <= d.score <= 1 and d.mask.shape == (48, 64) and d.mask.dtype == bool
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48
    assert detector.info["backend"] == "mask2former-transformers" and detector.info["resize"] == [64, 128]
    confident = Mask2FormerDetector.from_path(tiny_detector, names, shortest=64, longest=128, min_score=0.3)
    assert all(d.score > 0.3 for dets in confident.detect(image).values() for d in dets)


def test_loader_errors_name_the_problem(tiny_detector, tmp_path, names):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mask2FormerDetector.from_path(tmp_path, names)
    with pytest.raises(ValueError, match="80 classes"):
        Mask2FormerDetector.from_path(tiny_detector, names[:10])


def test_a_cached_hub_repo_id_loads_like_its_folder(tiny_detector, tmp_path, monkeypatch, names):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    add_to_hub_cache(tmp_path, "facebook/mask2former-swin-small-coco-instance", tiny_detector)
    cached = Mask2FormerDetector.from_path("facebook/mask2former-swin-small-coco-instance", names)
    local = Mask2FormerDetector.from_path(tiny_detector, names)
    assert all(torch.equal(a, b) for a, b in zip(cached.model.state_dict().values(), local.model.state_dict().values()))


def test_mmdet_results_convert_per_class_in_order(names):
    bbox = [np.zeros((0, 5), np.float32) for _ in names]
    bbox[15] = np.array([[1, 2, 3, 4, 0.9], [5, 6, 7, 8, 0.4]], np.float32)
    segm = [[] for _ in names]
    segm[15] = [np.ones((10, 10), bool), np.zeros((10, 10), bool)]
    found = from_mmdet_result((bbox, segm), names)
    assert list(found) == ["cat"] and found["cat"][0].box == (1.0, 2.0, 3.0, 4.0)
    assert found["cat"][1].score == pytest.approx(0.4) and not found["cat"][1].mask.any()
    assert from_mmdet_result(bbox, names)["cat"][0].mask is None  # a box-only result
    with pytest.raises(ValueError, match="classes"):
        from_mmdet_result(bbox[:3], names)


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed")
def test_mmdet_backend_says_how_to_install_when_missing(names):
    with pytest.raises(ImportError, match="mmdet 2.x"):
        MMDetDetector("config.py", "model.pth", names, "cpu")
