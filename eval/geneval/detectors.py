"""Object detector backends for GenEval: an image in, per-class lists of `Detection(box, score, mask)` out.

- `Mask2FormerDetector` (default): a transformers Mask2Former folder (the HF port of Detectron2's Swin-S COCO
  instance model), run with mmdet's test-time pre- and post-processing so the scores are calibrated as GenEval's.
- `MMDetDetector` (optional, faithful): GenEval's own mmdet 2.x Mask2Former; mmdet is imported only when used.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.hub import local_path
from eval.geneval.rules import Detection

log = logging.getLogger(__name__)

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255: mmdet's img_norm_cfg and Detectron2's PIXEL_MEAN
IMAGENET_STD = (58.395, 57.12, 57.375)
COCO_ALIASES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}  # GenEval → COCO


def resized_shape(height: int, width: int, shortest: int = 800, longest: int = 1333) -> tuple[int, int]:
    """mmdet's keep-ratio Resize to img_scale (longest, shortest): the largest scale that fits both limits."""
    scale = min(longest / max(height, width), shortest / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: Image.Image, shortest: int = 800, longest: int = 1333,
               size_divisor: int = 32) -> tuple[torch.Tensor, tuple[int, int]]:
    """(1, 3, H', W') network input and the resized size: bilinear resize of the uint8 image, ImageNet
    normalisation, zero padding (after normalisation) at the bottom and right to a multiple of `size_divisor`."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)[None]
    size = resized_shape(*pixels.shape[-2:], shortest, longest)
    pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pad_h, pad_w = (-size[0]) % size_divisor, (-size[1]) % size_divisor
    return F.pad(pixels, (0, pad_w, 0, pad_h)), size


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool → (N, 4) boxes [min_x, min_y, max_x + 1, max_y + 1]; zeros for an empty mask (mmdet)."""
    n, h, w = masks.shape
    cols, rows = masks.any(dim=1), masks.any(dim=2)
    arange_w = torch.arange(w, device=masks.device)
    arange_h = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, arange_w, w).amin(dim=1)
    x2 = torch.where(cols, arange_w, -1).amax(dim=1) + 1
    y1 = torch.where(rows, arange_h, h).amin(dim=1)
    y2 = torch.where(rows, arange_h, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                         resized: tuple[int, int], original: tuple[int, int], max_per_image: int = 100
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's MaskFormerFusionHead.instance_postprocess for one image: labels, scores, boxes, binary masks.

    Mask logits are upsampled bilinearly to the padded input, cropped to the resized image, resized to the
    original size, then thresholded at 0. Scores: the top `max_per_image` of the flattened query×class softmax
    (no-object dropped), each times the mean sigmoid inside its mask. No NMS, no threshold.
    """
    masks = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : resized[0], : resized[1]]
    masks = F.interpolate(masks[None], size=original, mode="bilinear", align_corners=False)[0]
    probs = class_logits.softmax(dim=-1)[:, :-1]
    num_classes = probs.shape[1]
    top_probs, top = probs.flatten().topk(min(max_per_image, probs.numel()))  # sorted, unlike mmdet: fixed order
    labels, queries = top % num_classes, top // num_classes
    logits = masks[queries]
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, top_probs * mask_scores, mask_to_box(binary), binary


def group_by_class(labels: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                   class_names: Sequence[str], min_score: float = 0.0) -> dict[str, list[Detection]]:
    """Per-class detection lists (classes in class-index order, as upstream's `details`; detections in the order
    given); scores at or below `min_score` are dropped before their masks are copied off the device."""
    keep = (scores > min_score).nonzero().flatten()
    grouped: dict[str, list[Detection]] = {}
    for i in keep.tolist():
        det = Detection(tuple(boxes[i].tolist()), float(scores[i]), masks[i].cpu().numpy())
        grouped.setdefault(class_names[int(labels[i])], []).append(det)
    return {name: grouped[name] for name in class_names if name in grouped}


class Mask2FormerDetector:
    """A transformers Mask2Former instance model from a local folder, with mmdet-equivalent processing."""

    def __init__(self, model: torch.nn.Module, class_names: Sequence[str], device: str | torch.device = "cpu",
                 shortest: int = 800, longest: int = 1333, min_score: float = 0.0, info: dict | None = None):
        num_labels = model.config.num_labels
        if num_labels != len(class_names):
            raise ValueError(f"the detector predicts {num_labels} classes but {len(class_names)} class names were "
                             "given: use a COCO instance-segmentation checkpoint (80 classes) with object_names.txt")
        self.model, self.class_names, self.device = model.eval().to(device), list(class_names), torch.device(device)
        self.shortest, self.longest, self.min_score = shortest, longest, min_score
        self.info = {"backend": "mask2former-transformers", "resize": [shortest, longest], **(info or {})}
        _warn_on_label_mismatch(model.config.id2label, self.class_names)

    @classmethod
    def from_path(cls, path: str | Path, class_names: Sequence[str], device: str | torch.device = "cpu",
                  shortest: int = 800, longest: int = 1333, min_score: float = 0.0) -> Mask2FormerDetector:
        """Load e.g. facebook/mask2former-swin-small-coco-instance: a local folder (config.json + weights) or that
        repo id once it is in the local Hugging Face cache."""
        from transformers import Mask2FormerForUniversalSegmentation

        path = local_path(path, "Mask2Former folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; pass a local transformers Mask2Former folder "
                                    "(see docs/geneval.md for the download command)")
        model = Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=True)
        return cls(model, class_names, device, shortest, longest, min_score, {"path": str(path)})

    @torch.no_grad()
    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        pixels, resized = preprocess(image, self.shortest, self.longest)
        out = self.model(pixel_values=pixels.to(self.device))
        labels, scores, boxes, masks = instance_postprocess(
            out.class_queries_logits[0].float(), out.masks_queries_logits[0].float(), tuple(pixels.shape[-2:]),
            resized, (image.height, image.width))
        return group_by_class(labels, scores, boxes, masks, self.class_names, self.min_score)


def _warn_on_label_mismatch(id2label: dict, class_names: list[str]) -> None:
    """Catch a checkpoint whose class order is not COCO's (random test models have LABEL_i names: skipped)."""
    names = [id2label.get(i, id2label.get(str(i), "")) for i in range(len(class_names))]
    if all(n.startswith("LABEL_") for n in names):
        return
    differ = [(i, ours, theirs) for i, (ours, theirs) in enumerate(zip(class_names, names))
              if theirs not in (ours, COCO_ALIASES.get(ours))]
    if differ:
        log.warning("%d of the detector's class labels differ from object_names.txt, e.g. %s: is this a COCO "
                    "instance model with the standard class order?", len(differ), differ[:3])


def from_mmdet_result(result: Sequence[np.ndarray] | tuple[Sequence[np.ndarray], Sequence[Sequence[np.ndarray]]],
                      class_names: Sequence[str]) -> dict[str, list[Detection]]:
    """mmdet 2.x `inference_detector` output, (bbox[num_classes], segm[num_classes]) or bbox alone → detections."""
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    if len(bbox) != len(class_names):
        raise ValueError(f"the mmdet model returned {len(bbox)} classes but {len(class_names)} class names were given")
    grouped = {}
    for i, name in enumerate(class_names):
        dets = [Detection(tuple(float(v) for v in row[:4]), float(row[4]),
                          None if segm is None else np.asarray(segm[i][j], dtype=bool))
                for j, row in enumerate(np.asarray(bbox[i]).reshape(-1, 5))]
        if dets:
            grouped[name] = dets
    return grouped


class MMDetDetector:
    """GenEval's own detector (mmdet 2.x + mmcv-full 1.x with CUDA ops); optional, and untested on CPU CI."""

    def __init__(self, config: str | Path, checkpoint: str | Path, class_names: Sequence[str],
                 device: str | torch.device = "cuda"):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as err:
            raise ImportError(f"the mmdet backend needs mmdet 2.x and mmcv-full 1.x ({err}); see docs/geneval.md, "
                              "or use the default --detector mask2former") from None
        self._infer = inference_detector
        self.model = init_detector(str(config), str(checkpoint), device=str(device))
        self.class_names = list(class_names)
        self.info = {"backend": "mmdet", "config": str(config), "path": str(checkpoint)}

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # what mmcv.imread gives
        return from_mmdet_result(self._infer(self.model, bgr), self.class_names)
