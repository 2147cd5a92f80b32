"""Channel mixers that replace a DiT MLP: `mlp` (timm `Mlp`, any expansion ratio) and `mlp_hyena_x` (paper §4)."""
from __future__ import annotations

import torch
from torch import nn

from models.layers import Mlp, linear_flops
from models.operators.causal_conv import CausalDepthwiseConv1d
from models.operators.hyena import check_paper_settings


def build_mlp(d_model: int, expansion_ratio: float = 4, dropout: float = 0.0) -> Mlp:
    """`mlp`: the DiT/PixArt MLP (keys `fc1`, `fc2`, tanh GELU) at another width, as the paper's r=3/4/6 configs."""
    return Mlp(d_model, int(d_model * expansion_ratio), drop=dropout)


class MlpHyenaX(nn.Module):
    """`mlp_hyena_x`: gated MLP whose featurizer is a causal conv along the *feature* axis of each token.

    The released code feeds the (B, L, 3·r·D) projection straight into a depthwise conv with `l_max` channels, so
    the tokens are the conv channels: every token has its own 4-tap filter sliding over its features, and tokens
    never mix. That ties the operator to exactly `l_max` tokens (256 for DiT-XL/2 at 256 px).

    `fused_bias_fc` (a flash-attn fused-GEMM switch in the paper's YAML) changes no numerics and is accepted only
    so the YAML loads unchanged.
    """

    def __init__(self, d_model: int, l_max: int, expansion_ratio: float = 2, order: int = 2, inner_factor: int = 1,
                 num_heads: int = 1, num_blocks: int = 1, fused_bias_fc: bool = False, short_filter_order: int = 4):
        super().__init__()
        check_paper_settings("mlp_hyena_x", order=order, inner_factor=inner_factor, num_heads=num_heads,
                             num_blocks=num_blocks)
        self.l_max = l_max
        self.hidden = int(d_model * expansion_ratio)
        # Created in the released code's order, so a seed gives the same initial weights.
        self.in_proj = nn.Linear(d_model, 3 * self.hidden)
        self.out_proj = nn.Linear(self.hidden, d_model)
        self.short_filter = CausalDepthwiseConv1d(l_max, short_filter_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.l_max:
            raise ValueError(f"mlp_hyena_x: got {x.shape[1]} tokens but l_max={self.l_max}; this operator's conv "
                             "channels are the tokens, so the token count must equal l_max exactly")
        q, k, v = self.short_filter(self.in_proj(x)).split(self.hidden, dim=-1)
        return self.out_proj(q * (k * v))

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample: projections and the conv (l_max channels over 3 · hidden features)."""
        conv = self.short_filter.forward_flops(self.in_proj.out_features)
        return linear_flops(self.in_proj, tokens) + conv + linear_flops(self.out_proj, tokens)
