"""The speed tool: analytic FLOPs against torch's meta-device counter (the paper's 2K numbers), and a tiny run."""
from __future__ import annotations

import json

import pytest

from eval import speed
from eval.flops import meta_forward_flops, pixart_forward_flops
from models.graft import GraftSpec
from models.pixart import PixArtSigma

HALF_HYENA_X = GraftSpec.from_settings(*speed.DEFAULT_GRAFT)


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


def test_speed_runs_end_to_end_on_a_tiny_proxy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, "PROXY_OVERRIDES", dict(hidden_size=64, num_heads=4, depth=2, sample_size=16,
                                                       caption_channels=32))
    report = speed.main(["--device", "cpu", "--repeats", "2", "--warmup", "1", "--sampling-repeats", "1",
                         "--steps", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "CPU PROXY" in printed and "| grafted |" in printed
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["setup"]["model"] == "proxy" and saved["setup"]["tokens"] == 64
    assert [r["name"] for r in saved["rows"]] == ["baseline", "grafted"]
    assert all(len(r["forward_s"]) == 2 and len(r["sampling_s"]) == 1 for r in saved["rows"])
    assert saved["setup"]["graft"]["grafts"][0]["layers"] == {"indexes": [1]}
    assert report["flop_bound_speedup"] > 1
    baseline, grafted = saved["rows"]  # CPU: every module with a kernel ran the pure path, and says so
    assert baseline["backends"] == {f"blocks.{i}.cross_attn": "torch" for i in range(2)}
    assert grafted["backends"] == {**baseline["backends"], "blocks.1.attn.short_filter": "torch"}
    assert "grafted: CausalDepthwiseConv1d: torch ×1; CrossAttention: torch ×2" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.md").read_text().startswith("**CPU PROXY")


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
                         "--out", str(tmp_path / "out")])
    assert report["setup"]["graft"]["grafts"][0]["name"] == "hyena_y"
    assert report["rows"][1]["sampling_median_s"] is None
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
