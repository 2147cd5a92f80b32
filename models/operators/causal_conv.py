"""The one causal depthwise 1-D convolution shared by every Hyena variant, MLP Hyena-X and Mamba-2.

It is an `nn.Conv1d` (groups = channels) so that checkpoints keep the `weight` [C, 1, K] / `bias` [C] keys of the
paper's `CausalConv1D_filter`. The `causal_conv1d` CUDA kernel is used when installed; the pure-PyTorch path
(left padding + `F.conv1d`) is its exact reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.operators.kernels import CAUSAL_CONV1D, PURE, UsesKernel

#: Kernel widths the `causal_conv1d` CUDA kernel implements.
KERNEL_WIDTHS = (2, 3, 4)


class CausalDepthwiseConv1d(UsesKernel, nn.Conv1d):
    """(B, C, L) → (B, C, L); output at position t sees inputs t-K+1 … t of its own channel only."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size[0] not in KERNEL_WIDTHS:
            out, self.backend = self.pure(x), PURE
        else:
            out, self.backend = CAUSAL_CONV1D.run(
                lambda kernel: kernel.causal_conv1d_fn(x, self.weight.squeeze(1), self.bias, activation=None),
                lambda: self.pure(x), x)
        return out

    def pure(self, x: torch.Tensor) -> torch.Tensor:
        """Left padding + F.conv1d: the exact reference of the kernel."""
        return F.conv1d(F.pad(x, (self.kernel_size[0] - 1, 0)), self.weight, self.bias, groups=self.groups)

    def forward_flops(self, length: int) -> int:
        """Forward FLOPs per sample over a sequence of `length`: 2 · K · channels · length."""
        return 2 * self.kernel_size[0] * self.in_channels * length


def init_identity_(conv: CausalDepthwiseConv1d) -> CausalDepthwiseConv1d:
    """Make the filter pass its input through unchanged (last tap 1), as Hyena's inner filter starts."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    return conv
