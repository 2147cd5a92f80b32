"""The FID Inception-v3 (TF `inception-2015-12-05` graph, as ported by pytorch-fid) and its feature extraction.

ADM's evaluator, which produced every DiT / grafting FID, runs the TensorFlow graph `classify_image_graph_def.pb`
(inception-2015-12-05). We run the same network in PyTorch with pytorch-fid's port of its weights,
`pt_inception-2015-12-05-6726825d.pth` (torchvision `Inception3` key layout, 1008 classes), loaded from a local
file. The port differs from torchvision's ImageNet Inception-v3 in its weights and in the pool branches of five
blocks (`FID_POOLS`); torchvision's own ImageNet weights give features whose FIDs are not comparable to ADM's.

Preprocessing follows the TF graph fed at `ExpandDims:0`, as ADM does: uint8 RGB as float in [0, 255] → TF1's
legacy bilinear resize to 299×299 (no half-pixel centres, unlike torch's `interpolate`) → (x − 128) / 128.
Outputs, per image:
- `pool`: the 2048-d `pool_3` features (FID, precision / recall);
- `spatial`: the first 7 channels of `mixed_6/conv` (the ReLU output of `Mixed_6d.branch1x1`, 17×17), flattened
  in TF's (h, w, c) order to 2023 values (sFID);
- `logits`: pool_3 @ W of `softmax/logits` without its bias, the logits ADM's and improved-GAN's Inception Score use.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE
from tqdm.auto import tqdm

from common.hub import local_path
from models.weights import check_state_dict, read_state_dict

log = logging.getLogger(__name__)

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS}"
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's softmax has 1008 outputs (1000 ImageNet classes + unused ones)
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] for sFID
FEATURE_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")


def _avg_pool_excluding_padding(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolBranch:
    """Mixin for torchvision's Inception blocks: the pool branch (their last output) uses the TF graph's pooling.

    torchvision averages with the padding counted; the TF graph does not, and its last block max-pools. The
    branch is recomputed after torchvision's own forward (one extra 1×1 conv) instead of copying its blocks.
    """

    tf_pool: Callable[[torch.Tensor], torch.Tensor] = staticmethod(_avg_pool_excluding_padding)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)
        outputs[-1] = self.branch_pool(self.tf_pool(x))
        return outputs


class FIDInceptionA(_TFPoolBranch, InceptionA):
    pass


class FIDInceptionC(_TFPoolBranch, InceptionC):
    pass


class FIDInceptionE1(_TFPoolBranch, InceptionE):
    pass


class FIDInceptionE2(_TFPoolBranch, InceptionE):
    tf_pool = staticmethod(_max_pool)


#: Block name → constructor of the TF-graph variant (in_channels and widths as in Inception-v3).
FID_POOLS: dict[str, Callable[[], nn.Module]] = {
    "Mixed_5b": lambda: FIDInceptionA(192, pool_features=32),
    "Mixed_5c": lambda: FIDInceptionA(256, pool_features=64),
    "Mixed_5d": lambda: FIDInceptionA(288, pool_features=64),
    "Mixed_6b": lambda: FIDInceptionC(768, channels_7x7=128),
    "Mixed_6c": lambda: FIDInceptionC(768, channels_7x7=160),
    "Mixed_6d": lambda: FIDInceptionC(768, channels_7x7=160),
    "Mixed_6e": lambda: FIDInceptionC(768, channels_7x7=192),
    "Mixed_7b": lambda: FIDInceptionE1(1280),
    "Mixed_7c": lambda: FIDInceptionE2(2048),
}


def build_fid_inception() -> Inception3:
    """The FID Inception-v3 architecture with untrained weights (load real ones with `load_fid_inception`)."""
    net = Inception3(num_classes=NUM_CLASSES, aux_logits=False, transform_input=False, init_weights=False)
    for name, make in FID_POOLS.items():
        setattr(net, name, make())
    return net.eval().requires_grad_(False)


def load_fid_inception(path: str | Path) -> Inception3:
    """The FID Inception from pytorch-fid's weight file (read with `weights_only`; every tensor checked); a local
    path or a file of a Hub repo in the local cache."""
    try:
        path = local_path(path, "Inception weights")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. The file is {FID_WEIGHTS}, from {FID_WEIGHTS_URL}.") from None
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path}: not a file; download {FID_WEIGHTS} once from "
                                f"{FID_WEIGHTS_URL} and pass its path.")
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    if fc is not None and fc.shape[0] != NUM_CLASSES:
        raise ValueError(f"{path}: fc has {fc.shape[0]} classes; this looks like torchvision's ImageNet Inception-v3, "
                         f"whose features do not reproduce ADM's FID. Use {FID_WEIGHTS} ({FID_WEIGHTS_URL}).")
    net = build_fid_inception()
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # unused in eval mode
    check_state_dict(expected, state, f"{path} (expected pytorch-fid's {FID_WEIGHTS})")
    net.load_state_dict(state, strict=False)
    return net


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 `ResizeBilinear` (align_corners=False, no half-pixel centres): source = float32(dst · in/out).

    The TF graph resizes this way; torch's `interpolate` samples at half-pixel centres and gives other pixels.
    """

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = np.float32(n_in) / np.float32(size)
        src = torch.arange(size, dtype=torch.float32, device=images.device) * float(scale)
        low = src.floor().long().clamp_(max=n_in - 1)
        return low, (low + 1).clamp_(max=n_in - 1), (src - low).to(images.dtype)

    (top, bottom, dy), (left, right, dx) = taps(images.shape[-2]), taps(images.shape[-1])
    x_left, x_right = images[..., left], images[..., right]
    rows = x_left + (x_right - x_left) * dx
    upper, lower = rows[..., top, :], rows[..., bottom, :]
    return upper + (lower - upper) * dy[:, None]


class InceptionFeatures:
    """Batched uint8 images (N, H, W, 3) → pool / spatial / logits features, on one device."""

    def __init__(self, net: Inception3, device: str | torch.device = "cpu"):
        self.net = net.to(device)
        self.device = torch.device(device)
        self._spatial: list[torch.Tensor] = []
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: self._spatial.append(out))

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """One batch: `pool` (N, 2048), `spatial` (N, 2023), `logits` (N, 1008), all float32."""
        x = torch.from_numpy(np.array(images)).to(self.device)  # a copy: streamed batches are read-only
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        x = (resize_bilinear_tf1(x, INPUT_SIZE) - 128) / 128
        self._spatial.clear()
        for name in FEATURE_LAYERS:
            x = getattr(self.net, name)(x)
        pool = x.flatten(1)
        spatial = self._spatial.pop()[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        logits = pool @ self.net.fc.weight.T
        return {"pool": pool.cpu().numpy(), "spatial": spatial.cpu().numpy(), "logits": logits.cpu().numpy()}

    def extract(self, batches: Iterable[np.ndarray], total: int | None = None, desc: str = "inception"
                ) -> dict[str, np.ndarray]:
        """Features of every image of an iterable of batches, concatenated."""
        parts: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
        with tqdm(total=total, desc=desc, unit="img") as bar:
            for batch in batches:
                for key, value in self(batch).items():
                    parts[key].append(value)
                bar.update(len(batch))
        if not parts["pool"]:
            raise ValueError(f"{desc}: no images to extract features from")
        return {key: np.concatenate(values) for key, values in parts.items()}
