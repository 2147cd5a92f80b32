"""Object colours as GenEval decides them: the object's mask on #999 grey, cropped to its box, classified zero-shot
by CLIP ViT-L/14 (OpenAI weights, QuickGELU) against three templates per colour.

Reimplements the two clip_benchmark functions GenEval calls (zero_shot_classifier, run_classification), which
avoids that package and its dependencies.
"""
from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.hub import local_path

TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")  # "a", always
CLIP_ARCH = "ViT-L-14"
CLIP_BATCH = 16  # upstream DataLoader batch size
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # file names on the HF hub


def object_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None, bgcolor: str = "#999",
                crop: bool = True) -> Image.Image:
    """The picture CLIP sees for one object: pixels outside the mask filled with `bgcolor` ("original" keeps them),
    then cropped to the box (Pillow rounds float coordinates); no mask means the whole image."""
    image = image.convert("RGB")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask shape {mask.shape} does not match the image ({image.height}, {image.width}): the "
                             "detector must return masks at the original image size")
        blank = image.copy() if bgcolor == "original" else Image.new("RGB", image.size, bgcolor)
        image = Image.composite(image, blank, Image.fromarray(mask))
    return image.crop(tuple(float(v) for v in box[:4])) if crop else image


class ClipColorClassifier:
    """Zero-shot colour of object crops: argmax over colours of normalised image features · text classifier."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu",
                 info: dict | None = None):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.device = torch.device(device)
        self.info = info or {"backend": "open_clip"}
        self._classifiers: dict[tuple[tuple[str, ...], str], torch.Tensor] = {}

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu",
                  arch: str = CLIP_ARCH) -> ClipColorClassifier:
        """CLIP from local files: a folder downloaded from timm/vit_large_patch14_clip_224.openai (open_clip weights,
        with or without open_clip_config.json) or a state-dict file for `arch`. QuickGELU is always on: the OpenAI
        weights were trained with it and give wrong features without it. A Hub repo id in the local cache works too."""
        import open_clip

        try:
            path = local_path(path, "CLIP folder or weights file")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (see docs/geneval.md)") from None
        if path.is_dir() and not (path / "open_clip_config.json").is_file():
            found = [path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: neither open_clip_config.json nor open_clip weights "
                                        f"({', '.join(OPEN_CLIP_WEIGHTS)}); see docs/geneval.md")
            path = found[0]
        if path.is_dir():
            if not any(any(path.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth")):
                raise FileNotFoundError(f"{path}: no weights next to open_clip_config.json (open_clip would "
                                        "silently build a random model)")
            name, pretrained = f"local-dir:{path}", None
        elif path.is_file():
            _reject_torchscript(path)
            name, pretrained = arch, str(path)
        else:
            raise FileNotFoundError(f"{path}: no such CLIP folder or weights file (see docs/geneval.md)")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device,
                                                                     force_quick_gelu=True)
        info = {"backend": "open_clip", "path": str(path), "arch": arch if pretrained else name, "quick_gelu": True,
                "templates": list(TEMPLATES)}
        return cls(model, preprocess, open_clip.get_tokenizer(name), device, info)

    @torch.no_grad()
    def text_classifier(self, colors: Sequence[str], class_name: str) -> torch.Tensor:
        """(D, len(colors)): per colour, the renormalised mean of its normalised template embeddings (cached)."""
        key = (tuple(colors), class_name)
        if key not in self._classifiers:
            columns = []
            for color in colors:
                texts = [t.format(c=color, cls=class_name) for t in TEMPLATES]
                with self._autocast():
                    emb = self.model.encode_text(self.tokenizer(texts).to(self.device))
                emb = F.normalize(emb.float(), dim=-1).mean(dim=0)
                columns.append(emb / emb.norm())
            self._classifiers[key] = torch.stack(columns, dim=1)
        return self._classifiers[key]

    @torch.no_grad()
    def classify(self, crops: Sequence[Image.Image], colors: Sequence[str], class_name: str) -> list[str]:
        """The most likely colour name of each crop."""
        weights = self.text_classifier(colors, class_name)
        predictions = []
        for start in range(0, len(crops), CLIP_BATCH):
            batch = torch.stack([self.preprocess(c) for c in crops[start:start + CLIP_BATCH]]).to(self.device)
            with self._autocast():
                features = F.normalize(self.model.encode_image(batch), dim=-1)
                logits = 100.0 * features @ weights.to(features.dtype)
            predictions += [colors[i] for i in logits.float().argmax(dim=1).tolist()]
        return predictions

    def _autocast(self):
        """fp16 autocast on CUDA, as clip_benchmark's amp=True; plain fp32 elsewhere."""
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")


def _reject_torchscript(path: Path) -> None:
    """OpenAI's own ViT-L-14.pt is a TorchScript archive, which is not loaded (code, not weights)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(n.endswith("constants.pkl") for n in archive.namelist()):
                raise ValueError(f"{path} is a TorchScript archive (OpenAI's ViT-L-14.pt); it is not loaded here. "
                                 "Use the open_clip folder timm/vit_large_patch14_clip_224.openai, or convert the "
                                 "file once as docs/geneval.md shows")
