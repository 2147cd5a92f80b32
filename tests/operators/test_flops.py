"""Every operator's analytic forward FLOPs (`forward_flops`) equal torch's FLOP counter, at the paper's settings
and at other settings of its own (kernel sizes, ratios, state sizes), on the meta device."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.operators import build, load_settings, operator_info, settings_names, settings_operator, with_length
from models.operators.attention import window_pairs

BATCH, LENGTH, WIDTH = 2, 256, 1152  # DiT-XL/2 at 256 px


def counted(name: str, config: dict, length: int = LENGTH, width: int = WIDTH) -> tuple[int, int]:
    """(torch's count, the operator's analytic count) for one forward of a batch."""
    with torch.device("meta"):
        op = build(name, **config)
        x = torch.empty(BATCH, length, width)
        with FlopCounterMode(display=False) as counter:
            op(x) if operator_info(name).replaces == "mlp" else op(x, (1, length))
    return counter.get_total_flops(), BATCH * op.forward_flops(length)


# SWA is left out because the blocked pure path computes whole score blocks, and Mamba-2 because the chunked scan
# does more work than the recurrent count; FlopCounterMode counts exactly what the analytic count covers for the
# others (matmuls, attention's two batched products, depthwise convs as 2·K·C·N, no elementwise work).
COUNTABLE = [s for s in settings_names() if settings_operator(s) not in ("swa", "mamba2")]


@pytest.mark.parametrize("settings", COUNTABLE)
def test_analytic_flops_at_the_papers_settings_match_the_flop_counter(settings):
    name = settings_operator(settings)
    config = with_length(name, load_settings(settings) | {operator_info(name).width_key: WIDTH}, LENGTH)
    torch_count, analytic = counted(name, config)
    assert torch_count == analytic


@pytest.mark.parametrize("name, config", [
    ("hyena_se", {"short_filter_order": 3, "inner_filter_len": 3}),
    ("hyena_x", {"short_filter_order": 7}),
    ("hyena_y", {"inner_filter_len": 2}),
    ("mlp", {"expansion_ratio": 2.5}),
    ("mlp_hyena_x", {"expansion_ratio": 3, "short_filter_order": 2}),
    ("mha", {"num_heads": 8, "qkv_bias": False}),
])
def test_analytic_flops_follow_the_operators_own_settings(name, config):
    config = with_length(name, {operator_info(name).width_key: 96, **config}, LENGTH)
    torch_count, analytic = counted(name, config, width=96)
    assert torch_count == analytic


def test_swa_and_mamba2_counts_follow_their_settings():
    swa = build("swa", embed_dim=64, num_heads=4, window_size=[4, 4])
    wide = build("swa", embed_dim=64, num_heads=4, window_size=[8, 8])
    projections = 2 * 100 * 64 * (3 * 64 + 64)
    assert swa.forward_flops(100) == projections + 4 * window_pairs(100, (4, 4)) * 64
    assert wide.forward_flops(100) > swa.forward_flops(100)
    small, large = (build("mamba2", d_model=64, d_state=s, headdim=16) for s in (16, 64))
    assert large.forward_flops(100) - small.forward_flops(100) == (
        2 * 100 * 64 * 2 * 48  # in_proj: B and C grow by 48 each
        + 2 * 4 * 2 * 48 * 100  # the conv runs over them too
        + 2 * 2 * 100 * 128 * 48)  # the scan: d_inner 128 × 48 more states


@pytest.mark.parametrize("tokens, window", [(10, (4, 4)), (3, (4, 4)), (10, (-1, 2)), (10, (0, 0)), (1, (-1, -1))])
def test_window_pairs_count_the_band(tokens, window):
    left, right = window
    expected = sum(1 for i in range(tokens) for j in range(tokens)
                   if (left < 0 or j >= i - left) and (right < 0 or j <= i + right))
    assert window_pairs(tokens, window) == expected
