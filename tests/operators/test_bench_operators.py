"""The operator benchmark runs end to end on the settings files and reports ratios to mha."""
from __future__ import annotations

import json

import pytest

from eval import bench_operators
from models.operators import settings_names


def test_benchmark_runs_every_settings_file_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_operators.main(["--lengths", "16", "--width", "32", "--heads", "4", "--device", "cpu",
                                 "--warmup", "0", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [row["operator"] for row in saved["rows"]] == [row.operator for row in rows] == [
        "mha", "hyena_se", "hyena_x", "hyena_y", "mamba2", "swa", "mlp_hyena_x", "mlp_ratio_3", "mlp_ratio_4",
        "mlp_ratio_6"]
    assert set(settings_names()) == {row.operator for row in rows}
    assert saved["setup"]["settings"]["swa"]["window_size"] == [4, 4]
    mha = next(row for row in rows if row.operator == "mha")
    assert mha.flops_vs_mha == mha.time_vs_mha == 1.0
    ratio = {row.operator: row.flops_vs_mha for row in rows}
    assert ratio["mlp_ratio_3"] < ratio["mlp_ratio_4"] < ratio["mlp_ratio_6"]


def test_the_ratios_need_mha():
    with pytest.raises(SystemExit):
        bench_operators.main(["--operators", "swa", "--lengths", "16", "--width", "32", "--device", "cpu"])
