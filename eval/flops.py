"""Forward FLOPs of a (grafted) PixArt-Sigma: analytic per component, and torch's counter on the meta device.

The analytic count is what the speed tool's FLOP-bound speed-up uses; the meta-device count checks it (tests and
every speed run). Both count 2·MACs of matmuls and convolutions, the attention core as 4·N·keys·D, and no
elementwise work (norms, activations, softmax, gates). Each block's token and channel mixer counts itself
(`forward_flops(tokens)`), so a grafted operator is counted with the graft's own settings; a parallel pair
(models.parallel_blocks) counts both branches, and its merge projection is the `merge` component.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.config import ConfigError
from models.graft import GraftSpec
from models.parallel_blocks import ParallelPair
from models.pixart import PixArtConfig, PixArtSigma

TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's sinusoid width


def meta_model(config: PixArtConfig, graft: GraftSpec | None = None) -> PixArtSigma:
    """The (grafted) model on the meta device: its structure without memory; the graft at the config's width."""
    with torch.device("meta"):
        model = PixArtSigma(config).eval()
        if graft is not None:
            graft.with_width(config.hidden_size).apply(model)
    return model


def pixart_forward_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], caption_tokens: int,
                         graft: GraftSpec | None = None) -> dict[str, int]:
    """Forward FLOPs by component (`embedding`, `self_attention`, `cross_attention`, `mlp`, `merge`, `final`,
    `total`)."""
    if config.kv_compress:
        raise ConfigError("the analytic FLOP count does not cover KV compression (no released model uses it)")
    n, d, length = hw[0] * hw[1], config.hidden_size, caption_tokens
    blocks = meta_model(config, graft).blocks
    cross = 2 * n * d * d + 2 * length * d * 2 * d + 4 * n * length * d + 2 * n * d * d  # q, kv, core, out
    per_sample = {
        "embedding": (2 * n * d * config.in_channels * config.patch_size**2  # patch conv
                      + 2 * (TIMESTEP_FREQUENCIES * d + d * d) + 2 * d * 6 * d  # timestep MLP, adaLN-single
                      + 2 * length * (config.caption_channels * d + d * d)),  # caption projection
        "self_attention": sum(block.attn.forward_flops(n) for block in blocks),
        "cross_attention": config.depth * cross,  # every block's, in a parallel pair or not
        "mlp": sum(block.mlp.forward_flops(n) for block in blocks),
        "merge": sum(block.merge_flops(n) for block in blocks if isinstance(block, ParallelPair)),
        "final": 2 * n * d * config.patch_size**2 * config.out_channels,
    }
    flops = {key: batch * value for key, value in per_sample.items()}
    flops["total"] = sum(flops.values())
    return flops


def meta_forward_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], caption_tokens: int,
                       graft: GraftSpec | None = None) -> int:
    """torch's FlopCounterMode over one forward on the meta device (no memory, no time; SDPA is counted there,
    unlike on CPU tensors). The caption mask is left out: it cannot be checked on meta and costs no FLOPs."""
    p = config.patch_size
    with torch.device("meta"):
        inputs = (torch.empty(batch, config.in_channels, hw[0] * p, hw[1] * p), torch.empty(batch),
                  torch.empty(batch, caption_tokens, config.caption_channels))
    return counted_flops(meta_model(config, graft), *inputs)


def counted_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """torch's FlopCounterMode over one forward of `model` (on the meta device, as its `inputs`)."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()
