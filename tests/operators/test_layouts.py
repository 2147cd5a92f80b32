"""State-dict keys and shapes equal the layouts of the paper's released checkpoints (timm, flash-attn,
mamba_ssm and the paper's Hyena classes), for modules built from the paper's YAMLs unchanged."""
from __future__ import annotations

import pytest
import torch

from models.operators import build

SMALL_WIDTH = 64


def official_layout(name: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """The key → shape map a checkpoint of the original implementation has for this config."""
    if name == "mha":  # timm Attention
        d = cfg["dim"]
        return {"qkv.weight": (3 * d, d), "qkv.bias": (3 * d,), "proj.weight": (d, d), "proj.bias": (d,)}
    if name == "swa":  # flash_attn.modules.mha.MHA
        d = cfg["embed_dim"]
        return {"Wqkv.weight": (3 * d, d), "Wqkv.bias": (3 * d,), "out_proj.weight": (d, d), "out_proj.bias": (d,)}
    if name == "mlp":  # timm Mlp
        d, hidden = cfg["d_model"], int(cfg["d_model"] * cfg["expansion_ratio"])
        return {"fc1.weight": (hidden, d), "fc1.bias": (hidden,), "fc2.weight": (d, hidden), "fc2.bias": (d,)}
    if name == "mlp_hyena_x":
        d, hidden, k = cfg["d_model"], cfg["d_model"] * cfg["expansion_ratio"], cfg["short_filter_order"]
        return {"in_proj.weight": (3 * hidden, d), "in_proj.bias": (3 * hidden,),
                "short_filter.weight": (cfg["l_max"], 1, k), "short_filter.bias": (cfg["l_max"],),
                "out_proj.weight": (d, hidden), "out_proj.bias": (d,)}
    if name.startswith("hyena"):
        d = cfg["d_model"]
        layout = {"in_proj.weight": (3 * d, d), "in_proj.bias": (3 * d,), "out_proj.weight": (d, d),
                  "out_proj.bias": (d,)}
        if name in ("hyena_se", "hyena_x"):
            layout |= {"short_filter.weight": (3 * d, 1, cfg["short_filter_order"]), "short_filter.bias": (3 * d,)}
        if name in ("hyena_se", "hyena_y"):
            layout |= {"inner_filter.weight": (d, 1, cfg["inner_filter_len"]), "inner_filter.bias": (d,)}
        return layout
    if name == "mamba2":  # mamba_ssm.Mamba2, ngroups 1, no biases on the projections
        d, n = cfg["d_model"], cfg["d_state"]
        inner = cfg["expand"] * d
        heads = inner // cfg["headdim"]
        return {"in_proj.weight": (2 * inner + 2 * n + heads, d), "conv1d.weight": (inner + 2 * n, 1, cfg["d_conv"]),
                "conv1d.bias": (inner + 2 * n,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,),
                "norm.weight": (inner,), "out_proj.weight": (d, inner)}
    raise KeyError(name)


def layout_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def with_width(name: str, cfg: dict, width: int) -> dict:
    key = {"mha": "dim", "swa": "embed_dim"}.get(name, "d_model")
    heads = {"num_heads": 4} if name in ("mha", "swa") else {}
    return cfg | {key: width} | heads


NAMES = ["mha", "swa", "hyena_se", "hyena_x", "hyena_y", "mamba2", "mlp", "mlp_hyena_x"]


@pytest.mark.parametrize("name", NAMES)
def test_small_layout_matches_official(name, paper_config):
    cfg = with_width(name, paper_config(name), SMALL_WIDTH)
    assert layout_of(build(name, **cfg)) == official_layout(name, cfg)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_layout_matches_official(name, paper_config):
    """The paper's configs unchanged (d=1152), built on the meta device so no memory is allocated."""
    cfg = paper_config(name)
    with torch.device("meta"):
        module = build(name, **cfg)
    assert layout_of(module) == official_layout(name, cfg)


#: Hand-computed shapes of the released DiT-XL/2 checkpoints (d = 1152, 256 tokens).
FULL_SIZE_SPOT_CHECKS = {
    "mamba2": {"in_proj.weight": (4880, 1152), "conv1d.weight": (2432, 1, 4), "A_log": (144,),
               "norm.weight": (2304,), "out_proj.weight": (1152, 2304)},
    "hyena_se": {"in_proj.weight": (3456, 1152), "short_filter.weight": (3456, 1, 4),
                 "inner_filter.weight": (1152, 1, 4)},
    "mlp_hyena_x": {"in_proj.weight": (6912, 1152), "short_filter.weight": (256, 1, 4),
                    "out_proj.weight": (1152, 2304)},
    "mlp": {"fc1.weight": (3456, 1152)},
    "swa": {"Wqkv.weight": (3456, 1152)},
}


@pytest.mark.parametrize("name", FULL_SIZE_SPOT_CHECKS)
def test_full_size_spot_checks(name, paper_config):
    with torch.device("meta"):
        layout = layout_of(build(name, **paper_config(name)))
    assert {key: layout[key] for key in FULL_SIZE_SPOT_CHECKS[name]} == FULL_SIZE_SPOT_CHECKS[name]


def test_swa_keys(paper_config):
    module = build("swa", **(paper_config("swa") | {"embed_dim": 64, "num_heads": 4}))
    assert set(module.state_dict()) == {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}


def test_mha_keys(paper_config):
    module = build("mha", **(paper_config("mha") | {"dim": 64, "num_heads": 4}))
    assert set(module.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
