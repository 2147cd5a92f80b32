"""Properties every operator must have: shapes, dtypes, gradients, causality / locality, config errors."""
from __future__ import annotations

import pytest
import torch

from models.operators import OPERATORS, build, operator_info

TOKENS, WIDTH = 24, 32
GRID = (4, 6)

#: Small configs (test id → registry name, config) covering every registered operator.
SMALL = {
    "mha": ("mha", dict(dim=WIDTH, num_heads=4, qkv_bias=True)),
    "swa": ("swa", dict(embed_dim=WIDTH, num_heads=4, window_size=(4, 4))),
    "swa_causal": ("swa", dict(embed_dim=WIDTH, num_heads=4, window_size=(4, 4), causal=True)),
    "hyena_se": ("hyena_se", dict(d_model=WIDTH, l_max=64)),
    "hyena_x": ("hyena_x", dict(d_model=WIDTH, l_max=64)),
    "hyena_y": ("hyena_y", dict(d_model=WIDTH, l_max=64)),
    "mamba2": ("mamba2", dict(d_model=WIDTH, headdim=8, d_state=16, chunk_size=8)),
    "mlp": ("mlp", dict(d_model=WIDTH, expansion_ratio=4)),
    "mlp_hyena_x": ("mlp_hyena_x", dict(d_model=WIDTH, l_max=TOKENS)),
}
CAUSAL = ["hyena_se", "hyena_x", "hyena_y", "mamba2", "swa_causal"]


def make(case: str) -> tuple[torch.nn.Module, bool]:
    """Build a small operator; also say whether it is a token mixer (called with the token grid)."""
    name, config = SMALL[case]
    torch.manual_seed(0)
    return build(name, **config), operator_info(name).replaces == "mha"


def apply(op: torch.nn.Module, token_mixer: bool, x: torch.Tensor) -> torch.Tensor:
    return op(x, GRID) if token_mixer else op(x)


def test_every_registered_operator_is_covered():
    assert {name for name, _ in SMALL.values()} == set(OPERATORS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SMALL)
def test_shape_and_dtype(case, dtype):
    op, token_mixer = make(case)
    op = op.to(dtype)
    x = torch.randn(2, TOKENS, WIDTH, dtype=dtype)
    with torch.no_grad():
        y = apply(op, token_mixer, x)
    assert y.shape == x.shape
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("case", SMALL)
def test_gradients_reach_every_parameter(case):
    op, token_mixer = make(case)
    apply(op, token_mixer, torch.randn(2, TOKENS, WIDTH)).square().sum().backward()
    for name, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{case}: no gradient reaches {name}"


@pytest.mark.parametrize("case", CAUSAL)
def test_causal_operators_ignore_the_future(case):
    op, _ = make(case)
    x = torch.randn(2, TOKENS, WIDTH)
    for t in (0, 7, TOKENS - 2):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        with torch.no_grad():
            y, y_changed = op(x, GRID), op(changed, GRID)
        torch.testing.assert_close(y_changed[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(y_changed[:, t + 1:], y[:, t + 1:]), "later outputs should see later inputs"


def test_mlp_hyena_x_is_token_local():
    """Its conv channels are the tokens, so the output of token t depends on token t only."""
    op, _ = make("mlp_hyena_x")
    x = torch.randn(2, TOKENS, WIDTH)
    t = 5
    changed = x.clone()
    changed[:, t] = torch.randn_like(changed[:, t])
    with torch.no_grad():
        diff = (op(changed) - op(x)).abs().amax(dim=(0, 2))
    assert diff[t] > 0
    assert torch.equal(torch.cat([diff[:t], diff[t + 1:]]), torch.zeros(TOKENS - 1))


def test_build_names_unknown_config_keys():
    with pytest.raises(ValueError, match="unknown config keys.*'kernel_size'"):
        build("hyena_x", d_model=WIDTH, l_max=64, kernel_size=3)


def test_build_names_missing_config_keys():
    with pytest.raises(ValueError, match="missing required config keys.*'l_max'"):
        build("hyena_y", d_model=WIDTH)


def test_build_names_unknown_operator():
    with pytest.raises(ValueError, match="unknown operator 'hyena_z'"):
        build("hyena_z", d_model=WIDTH)
