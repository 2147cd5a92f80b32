"""Forward FLOPs of a (grafted) PixArt-Sigma: analytic per component, and torch's counter on the meta device.

The analytic count is what the speed tool's FLOP-bound speed-up uses; the meta-device count checks it (tests and
every speed run). Both count 2·MACs of matmuls and convolutions, the attention core as 4·N·keys·D, and no
elementwise work (norms, activations, softmax, gates). Token / channel mixers that a graft swaps in are counted
with `eval.bench_operators.forward_flops`, i.e. at the paper's operator settings.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import ConfigError
from eval.bench_operators import forward_flops
from models.graft import Graft, GraftSpec
from models.pixart import PixArtConfig, PixArtSigma

TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's sinusoid width


def mixer_flops(graft: Graft | None, n: int, d: int, original: int) -> int:
    """One block's token or channel mixer: `original` unless grafted; a grafted `mlp` at its own expansion ratio,
    other operators at the paper's settings (`eval.bench_operators`)."""
    if graft is None:
        return original
    if graft.name == "mlp":
        return 2 * 2 * n * d * int(d * graft.config.get("expansion_ratio", 4))
    return forward_flops(graft.name, 1, n, d)


def grafted_blocks(depth: int, graft: GraftSpec | None) -> dict[tuple[str, int], Graft]:
    """(graft type, block index) → the graft that replaces that operator."""
    targets = {}
    for n, g in enumerate(graft.grafts if graft else []):
        g.validate(f"grafts[{n}]")
        targets.update({(g.type, i): g for i in g.layers.resolve(depth, f"grafts[{n}].layers")})
    return targets


def pixart_forward_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], caption_tokens: int,
                         graft: GraftSpec | None = None) -> dict[str, int]:
    """Forward FLOPs by component (`embedding`, `self_attention`, `cross_attention`, `mlp`, `final`, `total`)."""
    if config.kv_compress:
        raise ConfigError("the analytic FLOP count does not cover KV compression (no released model uses it)")
    n, d, length = hw[0] * hw[1], config.hidden_size, caption_tokens
    targets = grafted_blocks(config.depth, graft)
    attention = forward_flops("mha", 1, n, d)  # qkv + out projections, 4·N²·D core
    cross = 2 * n * d * d + 2 * length * d * 2 * d + 4 * n * length * d + 2 * n * d * d  # q, kv, core, out
    mlp = 2 * 2 * n * d * int(d * config.mlp_ratio)
    per_sample = {
        "embedding": (2 * n * d * config.in_channels * config.patch_size**2  # patch conv
                      + 2 * (TIMESTEP_FREQUENCIES * d + d * d) + 2 * d * 6 * d  # timestep MLP, adaLN-single
                      + 2 * length * (config.caption_channels * d + d * d)),  # caption projection
        "self_attention": sum(mixer_flops(targets.get(("mha", i)), n, d, attention) for i in range(config.depth)),
        "cross_attention": config.depth * cross,
        "mlp": sum(mixer_flops(targets.get(("mlp", i)), n, d, mlp) for i in range(config.depth)),
        "final": 2 * n * d * config.patch_size**2 * config.out_channels,
    }
    flops = {key: batch * value for key, value in per_sample.items()}
    flops["total"] = sum(flops.values())
    return flops


def meta_forward_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], caption_tokens: int,
                       graft: GraftSpec | None = None) -> int:
    """torch's FlopCounterMode over one forward on the meta device (no memory, no time; SDPA is counted there,
    unlike on CPU tensors). The caption mask is left out: it cannot be checked on meta and costs no FLOPs."""
    with torch.device("meta"):
        model = PixArtSigma(config).eval()
        if graft is not None:
            graft.with_width(config.hidden_size).apply(model)
        p = config.patch_size
        latents = torch.empty(batch, config.in_channels, hw[0] * p, hw[1] * p)
        captions = torch.empty(batch, caption_tokens, config.caption_channels)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(latents, torch.empty(batch), captions)
    return counter.get_total_flops()
