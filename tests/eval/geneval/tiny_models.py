"""Tiny, randomly initialised stand-ins of GenEval's detector and CLIP, written in the real on-disk formats.

The real Mask2Former and CLIP weights cannot be downloaded on CPU CI machines; these miniatures load through the
same local-path loaders (`Mask2FormerDetector.from_path`, `ClipColorClassifier.from_path`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def write_tiny_mask2former(folder: str | Path, class_names: Sequence[str], confident_class: int | None = None,
                           seed: int = 0) -> Path:
    """A Swin-backed Mask2Former for `class_names` (config.json + model.safetensors).

    `confident_class` makes every query predict that class with probability ≈ 1, so its detections pass
    GenEval's 0.3 threshold and the colour path runs.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(seed)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=len(class_names), num_queries=8, hidden_dim=32,
                               mask_feature_size=32, feature_size=32, encoder_layers=1, decoder_layers=2,
                               dim_feedforward=64, num_attention_heads=2, encoder_feedforward_dim=64,
                               id2label=dict(enumerate(class_names)))
    model = Mask2FormerForUniversalSegmentation(config).eval()
    if confident_class is not None:
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.fill_(-10.0)
            model.class_predictor.bias[confident_class] = 10.0
    model.save_pretrained(folder)
    return Path(folder)


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """An open_clip model folder (open_clip_config.json + open_clip_model.safetensors) with 32-pixel inputs."""
    from open_clip.model import CLIP

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder
