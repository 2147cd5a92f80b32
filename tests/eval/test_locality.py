"""Attention locality: the measure on constructed attention with hand-derived shares, the hooks on a model whose
attention is made local on purpose, the suggested graft, and both command lines."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from eval.locality import LocalityMeter, local_mass, main, region_mass, suggest_graft, uniform_shares
from models.dit import DiT
from models.graft import GraftSpec

GRID = (4, 4)  # 16 tokens, row-major


def test_uniform_shares_count_the_region_sizes():
    """band-1 covers 2 keys at the sequence ends and 3 elsewhere: (2·2 + 14·3) / 16²; band-3 covers 4, 5, 6 keys
    near the ends and 7 in between: (2·4 + 2·5 + 2·6 + 10·7) / 16²; window-1 covers 4 keys at the corners, 6 on
    the edges and 9 inside: (4·4 + 8·6 + 4·9) / 16²."""
    shares = uniform_shares(GRID, [0, 1, 3, 15])
    assert shares["band"] == pytest.approx([1 / 16, 46 / 256, 100 / 256, 1.0])
    assert shares["window"] == pytest.approx([1 / 16, 100 / 256, 1.0, 1.0])


def test_band_and_window_differ_across_row_ends():
    """Each query attends evenly to its sequence neighbours i−1, i, i+1. All of it lies in band-1; in window-1
    only what stays on the query's row or wraps onto a grid neighbour: queries 3, 4, 7, 8, 11, 12 lose the 1/3
    that jumps a row end (|Δcol| = 3), so window-1 = (10 + 6·2/3) / 16 = 0.875; band-0 = window-0 = E[1/count]."""
    n = 16
    i = torch.arange(n)
    near = ((i[:, None] - i[None]).abs() <= 1).double()
    probs = near / near.sum(1, keepdim=True)
    shares = {m: (v / n).tolist() for m, v in region_mass(probs, i, GRID, [0, 1]).items()}
    self_share = (2 * (1 / 2) + 14 * (1 / 3)) / 16
    assert shares["band"] == pytest.approx([self_share, 1.0])
    assert shares["window"] == pytest.approx([self_share, 0.875])


def test_local_mass_of_diagonal_attention():
    """q_i = α (i, 1), k_j = (2j, −j²): logits α(2ij − j²) = −α(i − j)² + const: a spike on the diagonal."""
    n = 16
    pos = torch.arange(n, dtype=torch.float32)
    q = (50.0 * torch.stack([pos, torch.ones(n)], 1)).reshape(1, n, 1, 2).repeat(2, 1, 3, 1)  # 2 rows, 3 heads
    k = torch.stack([2 * pos, -pos**2], 1).reshape(1, n, 1, 2).repeat(2, 1, 3, 1)
    mass = local_mass(q, k, 1.0, GRID, [0, 2])
    assert (mass["band"] / (2 * 3 * n)).tolist() == pytest.approx([1.0, 1.0])
    assert (mass["window"] / (2 * 3 * n)).tolist() == pytest.approx([1.0, 1.0])


def local_dit() -> DiT:
    """A tiny single-head DiT: block 0 attends to itself only (q = 1000·x, k = x on LayerNorm'd tokens, whose
    norms are equal, so the self-similarity is the largest logit), block 1 uniformly (q = 0), block 3 grafted."""
    torch.manual_seed(0)
    model = DiT(DiT.make_config("tiny", num_heads=1)).eval()
    d = model.config.hidden_size
    with torch.no_grad():
        for i, alpha in ((0, 1000.0), (1, 0.0)):
            block = model.blocks[i]
            block.adaLN_modulation[1].weight.zero_()  # no shift / scale: the attention input is LayerNorm(x)
            block.adaLN_modulation[1].bias.zero_()
            block.attn.qkv.weight[:d] = alpha * torch.eye(d)
            block.attn.qkv.weight[d:2 * d] = torch.eye(d)
            block.attn.qkv.bias.zero_()
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_x", "config": {},
                                     "layers": {"indexes": [3]}}]}).apply(model)
    return model


def test_hooks_measure_a_model_with_known_attention():
    model = local_dit()
    meter = LocalityMeter([0, 1]).attach(model)
    with torch.no_grad():
        model(torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3]))
    meter.detach()
    shares = meter.shares()
    assert meter.skipped == [3] and sorted(shares) == [0, 1, 2] and meter.grid == GRID
    assert shares[0]["band"][0] > 0.999 and shares[0]["window"][0] > 0.999  # all mass on the query itself
    chance = uniform_shares(GRID, [0, 1])
    assert shares[1]["band"] == pytest.approx(chance["band"]) and shares[1]["window"] == pytest.approx(chance["window"])

    spec, ranked = suggest_graft(shares, [0, 1], depth=4, ratio=0.25, measure="band", k=1, operator="hyena_x")
    assert ranked[0] == 0 and spec.grafts[0].layers.indexes == [0]
    with pytest.raises(ValueError, match="--rank-k 4"):
        suggest_graft(shares, [0, 1], depth=4, ratio=0.25, measure="band", k=4, operator="hyena_x")


def test_dit_command_line_writes_table_plot_and_spec(tmp_path):
    local_dit().save_pretrained(tmp_path / "model")
    result = main(["dit", "--ckpt", str(tmp_path / "model"), "--classes", "1", "2", "--steps", "2",
                   "--k", "0", "1", "--rank-k", "1", "--ratio", "0.5", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert result["skipped_layers"] == [3] and result["ranking"][0] == 0 and result["suggested_layers"][0] == 0
    saved = json.loads((tmp_path / "o" / "locality.json").read_text())
    assert saved["uniform"]["window"][1] == pytest.approx(100 / 256)
    assert "| 0 * |" in (tmp_path / "o" / "locality.md").read_text()
    assert (tmp_path / "o" / "locality.png").stat().st_size > 1000
    spec = GraftSpec.from_yaml(tmp_path / "o" / "suggested_graft.yaml")
    assert len(spec.grafts[0].layers.indexes) == 2  # 50% of 4 blocks
    assert yaml.safe_load((tmp_path / "o" / "suggested_graft.yaml").read_text())["grafts"][0]["name"] == "hyena_x"


def test_pixart_command_line(tiny_pipeline, tmp_path):
    result = main(["pixart", "--pipeline", str(tiny_pipeline), "--prompt", "a red circle", "--prompt", "two cats",
                   "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert result["grid"] == [4, 4] and sorted(result["layers"]) == ["0", "1"]
    assert all(0 <= v <= 1 for layer in result["layers"].values() for v in layer["band"] + layer["window"])
    assert len(result["suggested_layers"]) == 1  # 50% of 2 blocks
