"""Measurement helpers: calls timed in alternation, paired ratios, and the CPU peak-memory count."""
from __future__ import annotations

import torch

from eval.measure import Ratio, peak_memory, time_alternating

MIB = 2**20


def test_calls_are_timed_in_alternating_rounds_after_their_warm_up():
    order = []
    times = time_alternating({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                             torch.device("cpu"), warmup=2, repeats=3, desc="test")
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(len(t.wall) == len(t.cpu) == 3 and min(t.wall) >= 0 for t in times.values())


def test_paired_ratio_is_the_median_and_range_over_rounds():
    ratio = Ratio.of([2.0, 4.0, 9.0], [1.0, 1.0, 3.0])
    assert (ratio.median, ratio.low, ratio.high) == (3.0, 2.0, 4.0)
    assert Ratio.of([], []) is None


def test_cpu_peak_memory_counts_what_is_alive_at_once():
    """1 MiB tensors: a and b alive together (2 MiB), then a freed and c made (still 2 MiB); what existed before
    is not counted (and a few bytes of scalars are)."""
    before = torch.ones(4 * MIB // 4)

    def work():
        a = torch.ones(MIB // 4)
        b = a + 1
        del a
        c = b * 2
        return c.sum()

    assert before.numel() and 2 * MIB <= peak_memory(work, torch.device("cpu")) < 2 * MIB + 1024


def test_op_cpu_profile_names_each_aten_op_and_custom_ops_as_one():
    from eval.measure import op_profile
    from models.operators import build

    op = build("hyena_x", d_model=32, l_max=64)
    x = torch.randn(2, 64, 32)
    with torch.inference_mode():
        ms = op_profile(lambda: op(x, (8, 8)), torch.device("cpu"), clock="cpu")
    # ops are counted at the outermost dispatch: the projections as one op (linear, or addmm below autograd),
    # the convolution as the one custom op whatever it runs inside
    assert {"grafting::shifted_causal_conv", "aten::mul"} <= set(ms)
    assert {"aten::linear", "aten::addmm"} & set(ms)
    assert all(value >= 0 for value in ms.values())
