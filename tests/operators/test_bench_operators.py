"""The benchmark's analytic FLOP counts agree with torch's FLOP counter, and the script runs end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from eval import bench_operators
from eval.bench_operators import forward_flops, operator_config
from models.operators import build, operator_info

BATCH, LENGTH, WIDTH, HEADS = 2, 256, 1152, 16  # DiT-XL/2 at 256 px


@pytest.mark.parametrize("name", ["mha", "hyena_se", "hyena_x", "hyena_y", "mlp", "mlp_hyena_x"])
def test_analytic_flops_match_flop_counter(name):
    """FlopCounterMode counts matmuls (linear layers, attention's two batched products) and convolutions
    (depthwise: 2·K·C·N) but no elementwise work, exactly what the analytic count covers, so the totals must be
    equal. SWA is left out because the blocked pure path computes whole score blocks, and Mamba-2 because the
    chunked scan does more work than the recurrent count."""
    with torch.device("meta"):
        op = build(name, **operator_config(name, WIDTH, HEADS, LENGTH))
        x = torch.empty(BATCH, LENGTH, WIDTH)
        with FlopCounterMode(display=False) as counter:
            op(x) if operator_info(name).replaces == "mlp" else op(x, (16, 16))
    assert counter.get_total_flops() == forward_flops(name, BATCH, LENGTH, WIDTH)


def test_every_benchmarked_operator_has_a_flop_count():
    for name in bench_operators.OPERATORS:
        assert forward_flops(name, 1, 64, 32) > 0


def test_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_operators.main(["--lengths", "16", "--width", "32", "--heads", "4", "--device", "cpu",
                                 "--warmup", "0", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [row["operator"] for row in saved["rows"]] == bench_operators.OPERATORS
    assert len(rows) == len(bench_operators.OPERATORS)
    mha = next(row for row in rows if row.operator == "mha")
    assert mha.flops_vs_mha == mha.time_vs_mha == 1.0
