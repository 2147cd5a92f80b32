"""metrics.jsonl survives what a full disk or a kill leaves: a torn last line is skipped when reading and cut off
when the log is opened again, so the stage can finish."""
from __future__ import annotations

import json
import logging

from recipes.reporting import RunLog, read_metrics


def test_a_torn_last_line_is_skipped_then_repaired(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "train/loss": 2.0}) + "\n" + '{"step": 2, "train/lo')
    with caplog.at_level(logging.WARNING, logger="recipes.reporting"):
        assert read_metrics(metrics) == [{"step": 1, "train/loss": 2.0}]
    assert f"{metrics}:2: skipped a line that is not a metrics row" in caplog.text
    log = RunLog(tmp_path, enabled=True)  # a resumed stage opens its log: the torn line goes
    log.log(2, {"train/loss": 1.0})
    log.close("t")
    assert metrics.read_text().splitlines() == ['{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/loss": 1.0}']
    assert [row["step"] for row in read_metrics(metrics)] == [1, 2] and (tmp_path / "loss_curves.png").is_file()


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "lr": 0.1}))
    RunLog(tmp_path, enabled=True).log(2, {"lr": 0.2})
    assert [row["lr"] for row in read_metrics(metrics)] == [0.1, 0.2]
