"""The speed tool: analytic FLOPs against torch's meta-device counter (the paper's 2K numbers), the dry run of the
default GPU table on the CPU, and refusing speed-ups that would measure a missing kernel."""
from __future__ import annotations

import json

import pytest

from eval import speed, speed_pairs
from eval.flops import meta_forward_flops, pixart_forward_flops
from models import compile as compiling
from models.graft import GraftSpec
from models.operators.kernels import backends
from models.pixart import PixArtSigma

HALF_HYENA_X, THREE_QUARTERS_HYENA_X = (GraftSpec.from_settings("hyena_x", {"ratio": r, "pattern": "interleaved"})
                                        for r in (0.5, 0.75))


def test_xl2_2k_flops_match_the_meta_counter_and_the_paper_numbers():
    """PixArt-Σ XL/2 at 2048² (16,384 tokens, 300 caption tokens, batch 1): 52.4 TFLOP; with Hyena-X in the odd
    blocks 35.1 TFLOP, a FLOP bound of 1.49× (the paper measures 1.43× on an H100)."""
    config = PixArtSigma.make_config(speed.FULL_PRESET)
    hw = (128, 128)
    baseline = pixart_forward_flops(config, 1, hw, 300)
    grafted = pixart_forward_flops(config, 1, hw, 300, HALF_HYENA_X)
    assert baseline["total"] == meta_forward_flops(config, 1, hw, 300)
    assert grafted["total"] == meta_forward_flops(config, 1, hw, 300, HALF_HYENA_X)
    assert round(baseline["total"] / 1e12, 1) == 52.4 and round(grafted["total"] / 1e12, 1) == 35.1
    assert round(baseline["total"] / grafted["total"], 2) == 1.49
    three_quarters = pixart_forward_flops(config, 1, hw, 300, THREE_QUARTERS_HYENA_X)["total"]
    assert round(three_quarters / 1e12, 1) == 26.4 and round(baseline["total"] / three_quarters, 2) == 1.98
    assert baseline["self_attention"] / baseline["total"] == pytest.approx(0.754, abs=1e-3)  # reference notes §7


def test_proxy_has_the_2k_token_to_width_ratio_and_flop_bound():
    proxy = speed.model_config("proxy")
    tokens = (proxy.sample_size // proxy.patch_size) ** 2
    assert tokens == 4096 and proxy.hidden_size // proxy.num_heads == 72
    assert tokens / proxy.hidden_size == pytest.approx(16384 / 1152)
    bound = (pixart_forward_flops(proxy, 2, (64, 64), 300)["total"]
             / pixart_forward_flops(proxy, 2, (64, 64), 300, HALF_HYENA_X)["total"])
    assert bound == pytest.approx(1.46, abs=0.01)  # platform notes: "about 1.46×"


@pytest.mark.parametrize("graft", [
    {"type": "mlp", "name": "mlp", "config": {"expansion_ratio": 3}, "layers": {"indexes": [0, 2]}},
    {"type": "mha", "name": "hyena_y", "config": {}, "layers": {"ratio": 0.5, "pattern": "first"}},
    {"type": "mlp", "name": "mlp_hyena_x", "config": {}, "layers": {"indexes": [3]}},
])
def test_analytic_flops_of_other_grafts_match_the_meta_counter(graft):
    """SWA is left out: its pure-PyTorch path computes whole score blocks, more than the windowed count."""
    config = PixArtSigma.make_config("tiny", depth=4)
    spec = GraftSpec.from_dict({"grafts": [graft]})
    assert pixart_forward_flops(config, 2, (4, 4), 16, spec)["total"] == meta_forward_flops(config, 2, (4, 4), 16, spec)


@pytest.fixture
def quick_compile(monkeypatch):
    """torch.compile without code generation (dynamo's tracing, then eager): the plumbing in seconds."""
    monkeypatch.setattr(compiling, "BACKEND", "eager")


def test_dry_run_prints_the_default_gpu_table(tmp_path, quick_compile, capsys):
    """Every row and column of the GPU table (baseline, 50% and 75% Hyena-X; forward and sampling, eager and
    compiled; memory; backends), at tiny shapes."""
    report = speed.main(["--dry-run", "--repeats", "2", "--sampling-repeats", "1", "--steps", "1",
                         "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["setup"]["model"] == "dry-run" and saved["modes"] == ["eager", "compiled"]
    assert [r["name"] for r in saved["rows"]] == ["baseline", "hyena_x 50%", "hyena_x 75%"]
    assert [r["graft"]["grafts"][0]["layers"] for r in saved["rows"][1:]] == [{"indexes": [1, 3]},
                                                                              {"indexes": [1, 2, 3]}]
    assert 1 < saved["rows"][1]["flop_bound"] < saved["rows"][2]["flop_bound"]
    for row in saved["rows"]:
        for mode in ("eager", "compiled"):
            assert len(row[mode]["forward"]["wall"]) == len(row[mode]["forward"]["cpu"]) == 2
            assert len(row[mode]["sampling"]["wall"]) == 1
            assert row[mode]["forward_memory"] > 0 and row[mode]["missing_kernels"] == []
        assert row["train_memory"] > row["eager"]["forward_memory"]
        assert set(row["eager"]["backends"].values()) == {"torch"}
        assert set(row["compiled"]["backends"].values()) == {"compiled"}  # no model fell back to eager
        assert row["compiled"]["backends"].keys() == row["eager"]["backends"].keys()
    assert saved["speedups"]["eager"]["baseline"]["forward"]["median"] == 1
    assert report["withheld"] is False
    for text in ("**DRY RUN", "### One forward pass", "| compiled ms |", "| of bound |", "### 1-step sampling",
                 "### Peak memory above the weights", "| hyena_x 75% |", "- compiled: baseline: CrossAttention: "
                 "compiled ×4"):
        assert text in printed, text
    assert (tmp_path / "speed.md").read_text().strip() in printed


def test_speed_ups_are_withheld_when_an_expected_kernel_is_missing(tmp_path, monkeypatch):
    """As on a GPU without causal_conv1d / xformers: every module that ran the pure path is named, the timings are
    kept, the speed-ups are not printed and the command fails, unless --allow-missing-kernels."""
    monkeypatch.setattr(speed, "missing_kernels",
                        lambda model, device: sorted(p for p, b in backends(model).items() if b == "torch"))
    args = ["--dry-run", "--no-compile", "--repeats", "1", "--sampling-repeats", "0", "--no-train-memory",
            "--ratios", "0.5"]
    with pytest.raises(SystemExit, match="speed-ups withheld.*eager: hyena_x 50%: 6 modules"):
        speed.main([*args, "--out", str(tmp_path / "refused")])
    text = (tmp_path / "refused" / "speed.md").read_text()
    assert "**Speed-ups withheld:**" in text and "blocks.1.attn.short_filter" in text
    assert "| withheld |" in text and "× (" not in text  # no speed-up with its range anywhere
    report = speed.main([*args, "--allow-missing-kernels", "--out", str(tmp_path / "allowed")])
    assert report["withheld"] is False and report["missing_kernels"]["eager: hyena_x 50%"]
    assert "**Missing kernels (speed-ups printed on request):**" in (tmp_path / "allowed" / "speed.md").read_text()


def test_speed_loads_baseline_and_grafted_checkpoints(tmp_path, monkeypatch):
    """`--ckpt` (a diffusers folder) and `--grafted-ckpt` (an export folder with graft.yaml) on a tiny "full" model."""
    monkeypatch.setattr(speed, "FULL_PRESET", "tiny")
    baseline = PixArtSigma(PixArtSigma.make_config("tiny")).eval()
    baseline.save_diffusers(tmp_path / "base")
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_y", "config": {},
                                     "layers": {"indexes": [0]}}]}).apply(baseline)
    baseline.save_pretrained(tmp_path / "grafted")
    report = speed.main(["--model", "full", "--device", "cpu", "--ckpt", str(tmp_path / "base"), "--grafted-ckpt",
                         str(tmp_path / "grafted"), "--repeats", "1", "--warmup", "0", "--sampling-repeats", "0",
                         "--no-train-memory", "--out", str(tmp_path / "out")])
    assert [row["name"] for row in report["rows"]] == ["baseline", "grafted"]
    assert report["rows"][1]["graft"]["grafts"][0]["name"] == "hyena_y"
    assert report["rows"][1]["eager"]["sampling"] is None
    with pytest.raises(SystemExit, match="CPU proxy"):
        speed.main(["--model", "proxy", "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "x")])


def test_a_grafted_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch):
    """FLOPs and inputs come from the baseline's config, so the grafted export must share it."""
    monkeypatch.setattr(speed, "FULL_PRESET", "tiny")
    deeper = PixArtSigma(PixArtSigma.make_config("tiny", depth=3)).eval()
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_y", "config": {},
                                     "layers": {"indexes": [0]}}]}).apply(deeper)
    deeper.save_pretrained(tmp_path / "grafted")
    with pytest.raises(SystemExit, match="depth: 2 vs 3"):
        speed.main(["--model", "full", "--device", "cpu", "--grafted-ckpt", str(tmp_path / "grafted"),
                    "--repeats", "1", "--warmup", "0", "--sampling-repeats", "0", "--out", str(tmp_path / "out")])


def test_parallel_pairs_compare_sequential_and_halved_depth(tmp_path, monkeypatch, capsys):
    """`--parallel-pairs` on a small DiT proxy: 4 blocks in sequence against 2 fused pairs and their unfused twin,
    the same function to fp32 precision, FLOPs that differ only by the merge projections (2 · tokens · 2d · d)."""
    monkeypatch.setattr(speed_pairs, "PROXY", dict(hidden_size=64, num_heads=4))
    report = speed.main(["--parallel-pairs", "--device", "cpu", "--arch", "depth=4", "input_size=8", "--batch", "1",
                         "3", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert "CPU PROXY — not DiT-XL-2-256x256" in capsys.readouterr().out
    saved = json.loads((tmp_path / "parallel_pairs.json").read_text())
    assert saved == json.loads(json.dumps(report)) and not (tmp_path / "speed.json").exists()
    s = saved["setup"]
    assert (s["family"], s["depth"], s["hidden_size"], s["tokens"]) == ("dit", 4, 64, 16)
    assert s["fused_vs_unfused_max_rel_diff"] < 1e-5
    rows = {(r["batch"], r["name"]): r for r in saved["rows"]}
    assert sorted(rows) == [(b, n) for b in (1, 3) for n in ("parallel", "parallel, unfused", "sequential")]
    for batch in (1, 3):
        sequential, parallel = rows[batch, "sequential"], rows[batch, "parallel"]
        assert (sequential["sequential_blocks"], parallel["sequential_blocks"]) == (4, 2)
        merges = 2 * batch * 16 * (2 * 64) * 64 * 2  # 2 pairs
        assert parallel["forward_flops"] - sequential["forward_flops"] == merges
        assert rows[batch, "parallel, unfused"]["forward_flops"] == parallel["forward_flops"]
        assert parallel["params"] - sequential["params"] == 2 * (2 * 64 * 64 + 64)
        assert len(parallel["forward_s"]) == 2 and sequential["speedup"] == 1
    assert "| 3 | parallel | 2 |" in (tmp_path / "parallel_pairs.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--parallel-pairs", "--graft", "g.yaml"], "--graft: not with --parallel-pairs"),
    (["--family", "dit"], "--family: only with --parallel-pairs"),
    (["--batch", "1", "2"], "--batch takes one size here"),
])
def test_options_of_the_other_comparison_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cpu_clock_reports_process_cpu_time_and_the_wall_clock_below(tmp_path):
    speed.main(["--dry-run", "--no-compile", "--clock", "cpu", "--repeats", "2", "--sampling-repeats", "1",
                "--steps", "1", "--no-train-memory", "--ratios", "0.5", "--profile", "--out", str(tmp_path)])
    text = (tmp_path / "speed.md").read_text()
    assert "**Times are process CPU time**" in text
    assert "spends its time (CPU ms per op" in text and "| `grafting::shifted_causal_conv` | 0.0 |" in text
    assert text.count("The same rounds in wall-clock time: eager hyena_x 50% ") == 2  # forward and sampling
    saved = json.loads((tmp_path / "speed.json").read_text())
    cpu = saved["rows"][0]["eager"]["forward"]["cpu"]
    assert f"| baseline | 0.000154 | 1.000× | {sum(cpu) * 500:.1f} |" in text  # the median of 2 rounds, in ms
