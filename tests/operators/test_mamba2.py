"""Mamba-2: the chunked SSD scan equals the plain sequential recurrence (values and gradients), for every chunking
and both forms of the within-chunk decay."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.operators import kernels, mamba2
from models.operators.kernels import MAMBA_SSM
from models.operators.mamba2 import Mamba2, ssd_chunk_scan

# Large time steps (dt in [0.05, 0.5]) so that the scan, not the D skip, dominates the output.
SMALL = dict(d_model=32, headdim=8, d_state=16, chunk_size=8, dt_min=0.05, dt_max=0.5)
L = 37  # not a multiple of the chunk size


def mamba2_reference(op: Mamba2, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba2 forward in float64, one time step at a time, from the module's parameters only."""
    p = {key: value.double() for key, value in op.state_dict().items()}
    x = x.double()
    batch, length, _ = x.shape
    inner, n, groups, heads, hdim = op.d_inner, op.d_state, op.ngroups, op.nheads, op.headdim
    zxbcdt = torch.einsum("bli,oi->blo", x, p["in_proj.weight"])
    z, xbc, dt = zxbcdt[..., :inner], zxbcdt[..., inner:2 * inner + 2 * groups * n], zxbcdt[..., -heads:]

    taps = p["conv1d.weight"][:, 0]  # (channels, K); tap j multiplies the input K-1-j steps back
    k = taps.shape[-1]
    conv = p["conv1d.bias"].expand_as(xbc).clone()
    for j in range(k):
        back = k - 1 - j
        conv[:, back:] += taps[:, j] * xbc[:, :length - back]
    xbc = F.silu(conv)
    xs = xbc[..., :inner].reshape(batch, length, heads, hdim)
    b = xbc[..., inner:inner + groups * n].reshape(batch, length, groups, n)
    c = xbc[..., inner + groups * n:].reshape(batch, length, groups, n)
    group_of_head = torch.arange(heads) // (heads // groups)

    dt = F.softplus(dt + p["dt_bias"]).clamp(*op.dt_limit)  # (B, L, H)
    a = -torch.exp(p["A_log"])
    d = p["D"].reshape(heads, -1)
    state = torch.zeros(batch, heads, hdim, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        b_t, c_t = b[:, t, group_of_head], c[:, t, group_of_head]  # (B, H, N)
        decay = torch.exp(dt[:, t] * a)[..., None, None]
        state = decay * state + dt[:, t, :, None, None] * xs[:, t, :, :, None] * b_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c_t) + d * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, length, inner)

    gate = F.silu(z)
    if op.norm is None:
        y = y * gate
    else:
        y = y if op.norm.norm_before_gate else y * gate
        grouped = y.reshape(batch, length, groups, inner // groups)
        y = (grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(batch, length, inner)
        y = y * p["norm.weight"]
        y = y * gate if op.norm.norm_before_gate else y
    return torch.einsum("bli,oi->blo", y, p["out_proj.weight"])


def make(**overrides) -> Mamba2:
    torch.manual_seed(0)
    op = Mamba2(**(SMALL | overrides))
    with torch.no_grad():  # move D and the norm weight off their all-ones init so both terms are tested
        op.D.normal_()
        if op.norm is not None:
            op.norm.weight.add_(0.3 * torch.randn_like(op.norm.weight))
    return op


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


VARIANTS = {
    "default": {},
    "groups_hdim_norm_first": dict(ngroups=2, D_has_hdim=True, norm_before_gate=True),
    "no_norm_dt_limit": dict(rmsnorm=False, dt_limit=(0.01, 0.05)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 8, L, 64])
def test_mamba2_matches_sequential_recurrence(variant, chunk_size, monkeypatch):
    monkeypatch.setattr(mamba2, "PURE_CHUNK_SIZE", chunk_size)
    op = make(**VARIANTS[variant])
    x = torch.randn(2, L, SMALL["d_model"])
    with torch.no_grad():
        assert relative_error(op(x), mamba2_reference(op, x)) < 1e-5


def scan_reference(x, a, b, c):
    """y_t = Σ_{s≤t} (C_t · B_s) exp(a_{s+1} + … + a_t) x_s, one step at a time in float64."""
    x, a, b, c = (t.double() for t in (x, a, b, c))
    per_group = x.shape[2] // b.shape[2]
    b, c = b.repeat_interleave(per_group, 2), c.repeat_interleave(per_group, 2)
    state = torch.zeros(x.shape[0], x.shape[2], x.shape[3], b.shape[3], dtype=torch.float64)
    ys = []
    for t in range(x.shape[1]):
        state = state * torch.exp(a[:, t])[..., None, None] + x[:, t, :, :, None] * b[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, c[:, t]))
    return torch.stack(ys, dim=1)


def scan_inputs(length: int, groups: int, decay: float, dtype=torch.float32):
    """x (2, L, 4 heads, 3), log-decays a in [-decay, 0], b and c per group."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, length, 4, 3, generator=g, dtype=dtype), -decay * torch.rand(2, length, 4, generator=g,
                                                                                         dtype=dtype),
            torch.randn(2, length, groups, 5, generator=g, dtype=dtype),
            torch.randn(2, length, groups, 5, generator=g, dtype=dtype))


# slow decay: every chunk in the factored form; fast: a chunk of 16 decays by 64 on average, beyond the factored
# form's 60, so some heads take the segment-sum form; compiled: the segment-sum form everywhere (what
# torch.compile traces).
FORMS = {"slow": (0.3, False), "fast": (8.0, False), "compiled": (0.3, True)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 77, 128])
def test_chunked_scan_matches_sequential_recurrence(form, groups, chunk_size, monkeypatch):
    decay, compiled = FORMS[form]
    monkeypatch.setattr(mamba2, "compiling", lambda: compiled)
    inputs = scan_inputs(77, groups, decay)  # 77: not a multiple of the chunk
    expected = scan_reference(*inputs)
    assert relative_error(ssd_chunk_scan(*inputs, chunk_size), expected) < 1e-5


def test_fast_decay_takes_the_segment_sum_form_for_some_heads_only(monkeypatch):
    calls = []
    segment_sum = mamba2.segment_sum_scan
    monkeypatch.setattr(mamba2, "segment_sum_scan", lambda x, *rest: calls.append(x.shape) or segment_sum(x, *rest))
    ssd_chunk_scan(*scan_inputs(64, 1, 0.3), 16)
    assert calls == []
    ssd_chunk_scan(*scan_inputs(64, 1, 8.0), 16)
    (shape,) = calls
    assert 0 < shape[0] < 2 * 4 * 4 and shape[1:] == (16, 3)  # some of the (batch, chunk, head)s, not all


@pytest.mark.parametrize("form", FORMS)
def test_chunked_scan_gradients_match_the_recurrence(form, monkeypatch):
    """Backpropagated through the chunked scan and through the step-by-step recurrence, in float64."""
    decay, compiled = FORMS[form]
    monkeypatch.setattr(mamba2, "compiling", lambda: compiled)
    inputs = [t.requires_grad_() for t in scan_inputs(37, 2, decay, dtype=torch.float64)]
    cotangent = torch.randn(2, 37, 4, 3, dtype=torch.float64)
    chunked = torch.autograd.grad(ssd_chunk_scan(*inputs, 16), inputs, cotangent)
    expected = torch.autograd.grad(scan_reference(*inputs), inputs, cotangent)
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chunking_does_not_change_the_output(monkeypatch):
    op = make()
    x = torch.randn(2, L, SMALL["d_model"])
    with torch.no_grad():
        chunked = op(x)
        monkeypatch.setattr(mamba2, "PURE_CHUNK_SIZE", L)
        torch.testing.assert_close(op(x), chunked, rtol=1e-5, atol=1e-5)


def test_init_follows_mamba_ssm():
    op = Mamba2(d_model=64, headdim=8, d_state=16, dt_min=0.001, dt_max=0.1, A_init_range=(1, 16))
    dt = F.softplus(op.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-4)).all() and (dt <= 0.1 * (1 + 1e-4)).all()
    assert (op.A_log.exp() >= 1).all() and (op.A_log.exp() <= 16).all()
    assert torch.equal(op.D, torch.ones(op.nheads))
    assert torch.equal(op.norm.weight, torch.ones(op.d_inner))


@pytest.mark.parametrize("overrides, message", [
    (dict(d_ssm=16), "d_ssm=16"),
    (dict(process_group=object()), "process_group"),
    (dict(headdim=12), "not divisible by headdim 12"),
    (dict(ngroups=3), "not divisible by ngroups 3"),
])
def test_unsupported_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Mamba2(**(SMALL | overrides))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or MAMBA_SSM.load() is None,
                    reason="needs CUDA and a working mamba_ssm package")
def test_mamba_ssm_kernel_matches_pure_path(monkeypatch):
    """bf16 Triton scan vs the bf16 pure-PyTorch chunked scan on the same GPU: relative max error < 3e-2."""
    torch.manual_seed(0)
    op = Mamba2(d_model=64, d_state=64, headdim=16).cuda().bfloat16()
    x = torch.randn(2, 300, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = op(x)
        assert op.backend == "mamba_ssm"
        monkeypatch.setattr(kernels, "eligible", lambda tensors, half_only: False)  # every kernel off
        pure = op(x).double()
        assert op.backend == "torch"
    assert relative_error(fast, pure) < 3e-2
