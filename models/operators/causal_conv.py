"""The one causal depthwise 1-D convolution shared by every Hyena variant, MLP Hyena-X and Mamba-2.

It is an `nn.Conv1d` (groups = channels) so that checkpoints keep the `weight` [C, 1, K] / `bias` [C] keys of the
paper's `CausalConv1D_filter`. The `causal_conv1d` CUDA kernel is used when installed; the pure-PyTorch path
(K shifted multiply-adds) is its exact reference.

Inputs are (B, C, L) in any memory layout. Token mixers pass their (B, L, C) projections as a transposed view
(channel-last strides); both paths keep that layout in their output, so no caller copies to transpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from models.operators.kernels import CAUSAL_CONV1D, UsesKernel, compiling, pure_backend

#: Kernel widths the `causal_conv1d` CUDA kernel implements.
KERNEL_WIDTHS = (2, 3, 4)


class CausalDepthwiseConv1d(UsesKernel, nn.Conv1d):
    """(B, C, L) → (B, C, L); output at position t sees inputs t-K+1 … t of its own channel only."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size[0] not in KERNEL_WIDTHS:
            out, self.backend = self.pure(x), pure_backend()
        else:
            out, self.backend = CAUSAL_CONV1D.run(
                lambda kernel: kernel.causal_conv1d_fn(kernel_layout(x), self.weight.squeeze(1), self.bias,
                                                       activation=None),
                lambda: self.pure(x), x)
        return out

    def pure(self, x: torch.Tensor) -> torch.Tensor:
        """out[..., t] = bias + Σ_j w[:, j] · x[..., t - (K-1) + j], as one multiply-add per tap on shifted views.

        No padded copy and no layout change (a depthwise `F.conv1d` needs both, and on the CPU it is several times
        slower). Eagerly it runs as one op, `grafting::shifted_causal_conv`, with a backward pass written the same
        way and a FLOP formula; compiled, as a sum of shifted views of the left-padded input (`padded_taps`),
        which the compiler fuses with its neighbours into one loop.
        Half precision accumulates in float32, as the kernel does.
        """
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        args = (x.to(acc), self.weight[:, 0].to(acc), None if self.bias is None else self.bias.to(acc))
        out = padded_taps(*args) if compiling() else shifted_causal_conv(*args)
        return out.to(x.dtype)

    def forward_flops(self, length: int) -> int:
        """Forward FLOPs per sample over a sequence of `length`: 2 · K · channels · length."""
        return 2 * self.kernel_size[0] * self.in_channels * length


def shifted_taps(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False
                 ) -> torch.Tensor:
    """Σ_j taps[:, j] · x shifted by K-1-j steps along the last axis (towards the end; towards the start if
    `reverse`, which is the transposed convolution), plus `bias`; the output keeps x's memory layout."""
    length, k = x.shape[-1], taps.shape[1]
    last = taps[:, -1, None]
    out = x * last if bias is None else torch.addcmul(bias[:, None], x, last)
    for j in range(k - 1):
        back = k - 1 - j
        if back < length:
            target, source = (out[..., :length - back], x[..., back:]) if reverse else (out[..., back:],
                                                                                        x[..., :length - back])
            target.addcmul_(source, taps[:, j, None])
    return out


def padded_taps(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`shifted_taps` without in-place updates, for the compiler: every term reads the left-padded input, so the
    padding, the taps, the bias and whatever consumes the result become one fused loop."""
    length, k = x.shape[-1], taps.shape[1]
    padded = F.pad(x, (k - 1, 0))
    out = sum(padded[..., j:j + length] * taps[:, j, None] for j in range(k))
    return out if bias is None else out + bias[:, None]


@torch.library.custom_op("grafting::shifted_causal_conv", mutates_args=())
def shifted_causal_conv(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv of x (B, C, L) with taps (C, K) and bias (C,) or None; output in x's layout."""
    return shifted_taps(x, taps, bias)


@shifted_causal_conv.register_fake
def _(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x * taps[:, -1, None])  # the layout the multiply-adds give


def _save_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, taps, bias = inputs
    ctx.save_for_backward(x, taps)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    """Shifted multiply-adds again: autograd through in-place slices would copy the whole gradient once per tap."""
    x, taps = ctx.saved_tensors
    length, k = x.shape[-1], taps.shape[1]
    grad_x = shifted_taps(grad, taps, None, reverse=True) if ctx.needs_input_grad[0] else None
    grad_taps = None
    if ctx.needs_input_grad[1]:
        grad_taps = taps.new_zeros(taps.shape)
        product = torch.zeros_like(grad)  # one buffer for every tap; summed whole, which is the fast reduction
        for j in range(k):
            back = k - 1 - j
            if back < length:
                torch.mul(grad[..., back:], x[..., :length - back], out=product[..., back:])
                grad_taps[:, j] = product.sum(dim=(0, 2))
    grad_bias = grad.sum(dim=(0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_taps, grad_bias


shifted_causal_conv.register_autograd(_backward, setup_context=_save_for_backward)


@register_flop_formula(torch.ops.grafting.shifted_causal_conv)
def _flops(x_shape, taps_shape, bias_shape, out_shape=None, **kwargs) -> int:
    """2 · K multiply-adds per output element, as torch counts a depthwise convolution."""
    return 2 * taps_shape[1] * x_shape[0] * x_shape[1] * x_shape[2]


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` as `causal_conv1d` takes it: sequence-contiguous, or channel-last with every stride a multiple of 8."""
    if x.stride(2) == 1 or (x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0
                            and x.stride(2) % 8 == 0):
        return x
    return x.contiguous()


def init_identity_(conv: CausalDepthwiseConv1d) -> CausalDepthwiseConv1d:
    """Make the filter pass its input through unchanged (last tap 1), as Hyena's inner filter starts."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()
    return conv
