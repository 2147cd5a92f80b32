"""Hyena-SE / Hyena-X / Hyena-Y token mixers (paper §4), with the state-dict layout of the released checkpoints.

All three are the same order-2 gated operator over the raster-flattened token sequence:

    q, k, v = split(short_filter(in_proj(x)))     # short_filter: SE and X only
    y = out_proj(q · inner_filter(k · v))         # inner_filter: SE and Y only, starts as the identity

Both filters are causal depthwise convolutions along the sequence. Only the paper's settings (order 2, one head,
inner_factor 1, one block, identity activation) are implemented; anything else is refused rather than ignored.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import linear_flops
from models.operators.causal_conv import CausalDepthwiseConv1d, init_identity_

#: The only Hyena settings the paper (and its released code paths) use.
PAPER_SETTINGS = {"order": 2, "num_heads": 1, "inner_factor": 1, "num_blocks": 1, "activation": "id"}


def check_paper_settings(operator: str, **settings) -> None:
    """Refuse Hyena options the released code accepts but never implements (it would silently ignore them)."""
    for key, value in settings.items():
        if value != PAPER_SETTINGS[key]:
            raise ValueError(f"{operator}: {key}={value!r} is not supported; only the paper's {key}="
                             f"{PAPER_SETTINGS[key]!r} is implemented")


class HyenaOperator(nn.Module):
    """Shared order-2 Hyena; subclasses choose the filters (a kernel size, or None for no filter)."""

    name = "hyena"

    def __init__(self, d_model: int, l_max: int, short_filter_order: int | None, inner_filter_len: int | None,
                 order: int, num_heads: int, inner_factor: int, num_blocks: int, activation: str):
        super().__init__()
        check_paper_settings(self.name, order=order, num_heads=num_heads, inner_factor=inner_factor,
                             num_blocks=num_blocks, activation=activation)
        self.d_model = d_model
        self.l_max = l_max
        # Created in the released code's order, so a seed gives the same initial weights.
        self.out_proj = nn.Linear(d_model * inner_factor, d_model)
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.short_filter = (nn.Identity() if short_filter_order is None
                             else CausalDepthwiseConv1d((order + 1) * d_model, short_filter_order))
        self.inner_filter = (nn.Identity() if inner_filter_len is None
                             else init_identity_(CausalDepthwiseConv1d(d_model, inner_filter_len)))

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if x.shape[1] > self.l_max:
            raise ValueError(f"{self.name}: sequence of {x.shape[1]} tokens exceeds l_max={self.l_max}; "
                             "raise l_max in the operator config")
        # Everything stays (B, L, ·) in memory: the convolutions take (B, C, L) transposed views of it.
        u = self.short_filter(self.in_proj(x).transpose(1, 2)).transpose(1, 2)  # (B, L, 3D)
        q, k, v = u.split(self.d_model, dim=-1)
        y = self.inner_filter((k * v).transpose(1, 2)).transpose(1, 2)
        y = y * q if torch.is_grad_enabled() else y.mul_(q)  # at inference, y's buffer is not needed again
        return self.out_proj(y)

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample: projections and the causal filters (the gates are elementwise)."""
        filters = [f.forward_flops(tokens) for f in (self.short_filter, self.inner_filter)
                   if isinstance(f, CausalDepthwiseConv1d)]
        return linear_flops(self.in_proj, tokens) + linear_flops(self.out_proj, tokens) + sum(filters)


class HyenaSE(HyenaOperator):
    """`hyena_se`: featurizer conv over q, k, v and an identity-initialised inner conv on k·v."""

    name = "hyena_se"

    def __init__(self, d_model: int, l_max: int, order: int = 2, inner_filter_len: int = 4, num_heads: int = 1,
                 inner_factor: int = 1, num_blocks: int = 1, short_filter_order: int = 4, activation: str = "id"):
        if inner_filter_len != short_filter_order:
            # The released Hyena-SE sizes its inner filter with short_filter_order; a different
            # inner_filter_len would not load its checkpoints.
            raise ValueError(f"hyena_se: inner_filter_len={inner_filter_len} must equal "
                             f"short_filter_order={short_filter_order} (the released code uses one kernel size)")
        super().__init__(d_model, l_max, short_filter_order, inner_filter_len, order, num_heads, inner_factor,
                         num_blocks, activation)


class HyenaX(HyenaOperator):
    """`hyena_x`: featurizer conv only (no inner filter)."""

    name = "hyena_x"

    def __init__(self, d_model: int, l_max: int, order: int = 2, num_heads: int = 1, inner_factor: int = 1,
                 num_blocks: int = 1, short_filter_order: int = 4, activation: str = "id"):
        super().__init__(d_model, l_max, short_filter_order, None, order, num_heads, inner_factor, num_blocks,
                         activation)


class HyenaY(HyenaOperator):
    """`hyena_y`: inner conv only (no featurizer conv)."""

    name = "hyena_y"

    def __init__(self, d_model: int, l_max: int, order: int = 2, inner_filter_len: int = 4, num_heads: int = 1,
                 inner_factor: int = 1, num_blocks: int = 1, activation: str = "id"):
        super().__init__(d_model, l_max, None, inner_filter_len, order, num_heads, inner_factor, num_blocks,
                         activation)
