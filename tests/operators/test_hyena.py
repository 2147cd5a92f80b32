"""Hyena-SE / X / Y, MLP Hyena-X and their causal depthwise conv against independent reference formulas."""
from __future__ import annotations

import pytest
import torch

from models.operators import build, causal_conv
from models.operators.causal_conv import CausalDepthwiseConv1d
from models.operators.hyena import HyenaSE, HyenaX, HyenaY
from models.operators.kernels import CAUSAL_CONV1D
from models.operators.mlp import MlpHyenaX

D, L, K = 16, 21, 4


def causal_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """out[b, c, t] = bias[c] + Σ_j weight[c, 0, j] · x[b, c, t - (K-1) + j], taps before the start read 0."""
    kernel = weight.shape[-1]
    out = bias[None, :, None].expand_as(x).clone()
    for t in range(x.shape[-1]):
        for j in range(kernel):
            source = t - (kernel - 1) + j
            if source >= 0:
                out[:, :, t] += weight[:, 0, j] * x[:, :, source]
    return out


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return torch.einsum("bli,oi->blo", x, layer.weight) + layer.bias


def hyena_reference(op, x: torch.Tensor) -> torch.Tensor:
    """The paper's Hyena forward written out: projection, optional convs along the sequence, two gates."""
    u = linear(x, op.in_proj).transpose(1, 2)  # (B, 3D, L)
    if isinstance(op.short_filter, CausalDepthwiseConv1d):
        u = causal_conv_reference(u, op.short_filter.weight, op.short_filter.bias)
    q, k, v = u[:, :D], u[:, D:2 * D], u[:, 2 * D:]
    v = k * v
    if isinstance(op.inner_filter, CausalDepthwiseConv1d):
        v = causal_conv_reference(v, op.inner_filter.weight, op.inner_filter.bias)
    return linear((q * v).transpose(1, 2), op.out_proj)


def randomise_(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every parameter (identity filters included) so the comparison exercises every term; float64 so
    that the two gates' large products compare at a tight tolerance."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module.double()


def test_causal_conv_matches_reference_and_is_causal():
    torch.manual_seed(0)
    conv = randomise_(CausalDepthwiseConv1d(6, K))
    x = torch.randn(2, 6, L, dtype=torch.float64)
    torch.testing.assert_close(conv(x), causal_conv_reference(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
    changed = x.clone()
    changed[..., 10:] = 0
    torch.testing.assert_close(conv(changed)[..., :10], conv(x)[..., :10], rtol=0, atol=0)


def test_causal_conv_is_a_depthwise_conv1d():
    conv = CausalDepthwiseConv1d(6, K)
    assert isinstance(conv, torch.nn.Conv1d) and conv.groups == 6
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {"weight": (6, 1, K), "bias": (6,)}


def test_identity_init_passes_input_through():
    conv = causal_conv.init_identity_(CausalDepthwiseConv1d(6, K))
    expected = torch.zeros(6, 1, K)
    expected[:, 0, -1] = 1
    assert torch.equal(conv.weight, expected) and torch.equal(conv.bias, torch.zeros(6))
    x = torch.randn(2, 6, L)
    assert torch.equal(conv(x), x)


@pytest.mark.parametrize("cls", [HyenaSE, HyenaY])
def test_inner_filter_starts_as_identity(cls):
    op = cls(D, l_max=64)
    taps = torch.zeros(D, 1, 4)
    taps[:, 0, -1] = 1
    assert torch.equal(op.inner_filter.weight, taps)
    assert torch.equal(op.inner_filter.bias, torch.zeros(D))


@pytest.mark.parametrize("cls", [HyenaSE, HyenaX, HyenaY])
def test_hyena_matches_reference(cls):
    torch.manual_seed(0)
    op = randomise_(cls(D, l_max=64))
    x = torch.randn(2, L, D, dtype=torch.float64)
    torch.testing.assert_close(op(x, (3, 7)), hyena_reference(op, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, short, inner", [(HyenaSE, True, True), (HyenaX, True, False), (HyenaY, False, True)])
def test_hyena_variants_differ_only_in_filters(cls, short, inner):
    op = cls(D, 64)
    assert isinstance(op.short_filter, CausalDepthwiseConv1d) == short
    assert isinstance(op.inner_filter, CausalDepthwiseConv1d) == inner


def test_mlp_hyena_x_matches_reference():
    torch.manual_seed(0)
    ratio = 2
    op = randomise_(MlpHyenaX(D, l_max=L, expansion_ratio=ratio))
    x = torch.randn(2, L, D, dtype=torch.float64)
    u = linear(x, op.in_proj)  # (B, L tokens, 3·r·D features); tokens are the conv channels
    u = causal_conv_reference(u, op.short_filter.weight, op.short_filter.bias)
    h = ratio * D
    q, k, v = u[..., :h], u[..., h:2 * h], u[..., 2 * h:]
    expected = linear(q * (k * v), op.out_proj)
    torch.testing.assert_close(op(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["hyena_se", "hyena_x", "hyena_y", "mlp_hyena_x"])
@pytest.mark.parametrize("key, value", [("order", 3), ("num_heads", 2), ("inner_factor", 2), ("num_blocks", 2)])
def test_unsupported_hyena_settings_are_refused(name, key, value):
    with pytest.raises(ValueError, match=f"{name}: {key}={value}"):
        build(name, d_model=D, l_max=64, **{key: value})


@pytest.mark.parametrize("name", ["hyena_se", "hyena_x", "hyena_y"])
def test_unsupported_activation_is_refused(name):
    with pytest.raises(ValueError, match="activation='gelu'"):
        build(name, d_model=D, l_max=64, activation="gelu")


def test_hyena_se_needs_one_kernel_size():
    with pytest.raises(ValueError, match="inner_filter_len=3 must equal short_filter_order=4"):
        HyenaSE(D, l_max=64, inner_filter_len=3)


@pytest.mark.parametrize("cls", [HyenaSE, HyenaX, HyenaY])
def test_sequence_longer_than_l_max_is_refused(cls):
    op = cls(D, l_max=16)
    op(torch.randn(1, 16, D))
    with pytest.raises(ValueError, match="17 tokens exceeds l_max=16"):
        op(torch.randn(1, 17, D))


def test_mlp_hyena_x_needs_exactly_l_max_tokens():
    op = MlpHyenaX(D, l_max=L)
    with pytest.raises(ValueError, match=f"got {L - 1} tokens but l_max={L}"):
        op(torch.randn(1, L - 1, D))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or CAUSAL_CONV1D.load() is None,
                    reason="needs CUDA and a working causal_conv1d package")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_causal_conv1d_kernel_matches_pure_path(layout):
    """bf16 kernel vs bf16 F.conv1d on the same GPU: equal up to bf16 rounding (rtol 1e-2, atol 1e-2)."""
    torch.manual_seed(0)
    conv = randomise_(CausalDepthwiseConv1d(64, K)).cuda().bfloat16()
    x = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)
    x = x.transpose(1, 2) if layout == "channels_last" else x.transpose(1, 2).contiguous()
    fast = conv(x)
    assert conv.backend == "causal_conv1d"
    torch.testing.assert_close(fast, conv.pure(x), rtol=1e-2, atol=1e-2)
