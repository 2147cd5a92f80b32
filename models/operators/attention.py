"""Self-attention operators: `mha` (timm `Attention` layout) and `swa` (flash-attn `MHA` layout, sliding window)."""
from __future__ import annotations

import torch
from torch import nn

from models.layers import linear_flops
from models.operators.attention_core import attention, window_attention
from models.operators.kernels import UsesKernel


class MultiHeadAttention(nn.Module):
    """`mha`: timm `Attention` (keys `qkv`, `proj`; optional per-head `q_norm` / `k_norm`): DiT's and PixArt's
    self-attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"mha: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor, hw: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) → q, k, v as (B, N, H, Dh); subclasses may use the grid (e.g. to compress keys)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x, hw)
        out = attention(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.flatten(2)))

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample: q, k, v and output projections, and the core's two products
        (4 · N · keys · D); softmax and norms are elementwise work, not counted."""
        core = 4 * tokens * tokens * self.num_heads * self.head_dim
        return linear_flops(self.qkv, tokens) + core + linear_flops(self.proj, tokens)


class SlidingWindowAttention(UsesKernel, nn.Module):
    """`swa`: flash-attn `MHA` (keys `Wqkv`, `out_proj`) with a `(left, right)` window over the raster sequence.

    Takes the flash-attn constructor arguments of the paper's `swa.yaml` unchanged; options the paper never used
    (cross-attention, rotary, depthwise conv, returning the residual) are refused with a clear error.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None, cross_attn: bool = False,
                 qkv_proj_bias: bool = True, out_proj_bias: bool = True, dropout: float = 0.0,
                 softmax_scale: float | None = None, causal: bool = False, layer_idx: int | None = None,
                 dwconv: bool = False, rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_scale_base: float | None = None, rotary_emb_interleaved: bool = False,
                 use_alibi: bool = False, window_size: tuple[int, int] | list[int] = (-1, -1),
                 fused_bias_fc: bool = False, use_flash_attn: bool = False, return_residual: bool = False,
                 checkpointing: bool = False, device=None, dtype=None):
        super().__init__()
        unsupported = {"cross_attn": cross_attn, "dwconv": dwconv, "rotary_emb_dim": rotary_emb_dim,
                       "use_alibi": use_alibi, "return_residual": return_residual}
        used = [key for key, value in unsupported.items() if value]
        if used:
            raise ValueError(f"swa: options {used} are not supported (the paper's SWA is plain self-attention)")
        num_heads_kv = num_heads_kv or num_heads
        if embed_dim % num_heads or num_heads % num_heads_kv:
            raise ValueError(f"swa: embed_dim {embed_dim}, num_heads {num_heads}, num_heads_kv {num_heads_kv} "
                             "must divide evenly")
        if len(window_size) != 2:
            raise ValueError(f"swa: window_size must be (left, right), got {window_size}")
        self.num_heads, self.num_heads_kv = num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        self.softmax_scale = softmax_scale
        self.dropout = dropout
        left, right = (int(w) for w in window_size)
        self.window = (left, 0) if causal else (left, right)
        factory = {"device": device, "dtype": dtype}
        qkv_dim = self.head_dim * (num_heads + 2 * num_heads_kv)
        self.Wqkv = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.Wqkv(x)
        q_width = self.num_heads * self.head_dim
        q = qkv[..., :q_width].reshape(b, n, self.num_heads, self.head_dim)
        k, v = qkv[..., q_width:].reshape(b, n, 2, self.num_heads_kv, self.head_dim).unbind(2)
        if self.num_heads_kv != self.num_heads:
            repeat = self.num_heads // self.num_heads_kv
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        out, self.backend = window_attention(q, k, v, self.window, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(b, n, -1))

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample: projections, and the core over the (query, key) pairs inside the
        window only (4 · pairs · head_dim per head), which is what a windowed kernel computes."""
        core = 4 * window_pairs(tokens, self.window) * self.num_heads * self.head_dim
        return linear_flops(self.Wqkv, tokens) + core + linear_flops(self.out_proj, tokens)


def window_pairs(tokens: int, window: tuple[int, int]) -> int:
    """(query, key) pairs with i - left <= j <= i + right among `tokens` positions (-1: unbounded side)."""
    left, right = (tokens - 1 if w < 0 else min(w, tokens - 1) for w in window)
    return tokens + left * tokens - left * (left + 1) // 2 + right * tokens - right * (right + 1) // 2
