"""The reader benchmark runs end to end at a tiny size and prints its Markdown table."""
from __future__ import annotations

from data import bench_reader


def test_bench_reader_prints_a_table(capsys):
    rows = bench_reader.main(["--samples", "4", "--shard-size", "2", "--batch-size", "2", "--workers", "0",
                              "--epochs", "1", "--repeats", "1"])
    assert len(rows) == 5 and all(r["samples_per_s"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert table.startswith("| loader") and table.count("\n|") == 6 and "load average" in table
