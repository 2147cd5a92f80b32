"""Building blocks shared by PixArt-Sigma and DiT (the original repos' layouts and numerics)."""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cos half first (DiT / PixArt); `freq_shift=1` gives diffusers' DiT variant."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.reshape(-1).float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timestep → hidden vector: sinusoid (256 frequencies) then a two-layer SiLU MLP (`mlp.0`, `mlp.2`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def linear_flops(layer: nn.Linear, tokens: int) -> int:
    """Forward FLOPs of a linear layer on `tokens` rows: 2 · MACs (the bias is elementwise work, not counted)."""
    return 2 * tokens * layer.in_features * layer.out_features


class Mlp(nn.Module):
    """timm `Mlp` layout (`fc1`, `fc2`) with tanh-approximated GELU, as in DiT and PixArt."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample (matmuls only)."""
        return linear_flops(self.fc1, tokens) + linear_flops(self.fc2, tokens)


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) → tokens (B, H/p · W/p, D) in row-major (h, w) order (`proj` conv)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(hidden_size: int, grid_hw: tuple[int, int], base_size: float | None = None,
                        interpolation_scale: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (N, D); first half encodes w, second h (as PixArt and DiT do).

    Positions are `arange(n) / (n / base_size) / interpolation_scale`; with `base_size=None` they are plain
    `arange(n)` (DiT). This is what lets PixArt-Sigma run at any aspect ratio.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden size {hidden_size} must be divisible by 4 for a 2D sin-cos embedding")
    h, w = grid_hw
    pos_h = torch.arange(h, dtype=torch.float32, device=device)
    pos_w = torch.arange(w, dtype=torch.float32, device=device)
    if base_size is not None:
        pos_h = pos_h / (h / base_size) / interpolation_scale
        pos_w = pos_w / (w / base_size) / interpolation_scale
    grid_w, grid_h = torch.meshgrid(pos_w, pos_h, indexing="xy")  # each (h, w)
    emb_w = _sincos_1d(hidden_size // 2, grid_w.reshape(-1))
    emb_h = _sincos_1d(hidden_size // 2, grid_h.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1).float()


class SinCosPositions(nn.Module):
    """Cached fixed position embeddings per token grid (no parameters, so no state-dict keys)."""

    def __init__(self, hidden_size: int, base_size: float | None = None, interpolation_scale: float = 1.0):
        super().__init__()
        self.hidden_size, self.base_size, self.interpolation_scale = hidden_size, base_size, interpolation_scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (hw, str(device))
        if key not in self._cache:
            self._cache[key] = sincos_pos_embed_2d(self.hidden_size, hw, self.base_size, self.interpolation_scale,
                                                   device=device)
        return self._cache[key]


def run_blocks(blocks: nn.ModuleList, checkpointing: bool, x: torch.Tensor, *args) -> torch.Tensor:
    """Apply the blocks in order, each under activation checkpointing when asked for and training."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x · (1 + scale) + shift; shift and scale broadcast over tokens. One fused pass (addcmul)
    instead of two, without the temporary in between."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate · y in one fused pass (addcmul); the gate broadcasts over tokens."""
    return torch.addcmul(x, gate, y)


def unpatchify(x: torch.Tensor, grid_hw: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Tokens (B, h·w, p·p·C) → image (B, C, h·p, w·p); channel is the fastest index of each token."""
    h, w = grid_hw
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)
