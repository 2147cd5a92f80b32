"""Mamba-2 token mixer (paper §4): `mamba_ssm.Mamba2`'s constructor and state-dict layout, runnable without it.

The selective state-space recurrence, per head h with state S (headdim × d_state):

    S_t = exp(dt_t · A_h) · S_{t-1} + dt_t · x_t ⊗ B_t,        y_t = S_t · C_t + D_h · x_t

runs as `mamba_ssm`'s fused Triton scan on CUDA when it is installed, otherwise as the chunked SSD algorithm in
pure PyTorch (quadratic inside a chunk, a recurrence over chunk states between chunks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import linear_flops
from models.operators.causal_conv import CausalDepthwiseConv1d
from models.operators.kernels import MAMBA_SSM, UsesKernel, compiling


class GatedRMSNorm(nn.Module):
    """mamba_ssm's `RMSNormGated` (key `weight`): RMS-normalise per group of channels, gated by silu(z)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = F.silu(z.float())
        y = x.float() if self.norm_before_gate else x.float() * gate
        groups = y.unflatten(-1, (-1, self.group_size))
        y = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        y = y * self.weight.float()
        if self.norm_before_gate:
            y = y * gate
        return y.to(x.dtype)


#: Chunk length of the pure-PyTorch scan. The result does not depend on it; 64 was fastest on the CPU for
#: fwd+bwd at 256–4,096 tokens (`python -m eval.bench_operators --operators mha mamba2`; docs/benchmarks.md).
#: The CUDA kernel uses the module's own `chunk_size`.
PURE_CHUNK_SIZE = 64
#: Largest log-decay inside one chunk for which the factored form exp(a_t) · exp(-a_s) stays inside float32's
#: normal range (e^±60). The heads of chunks that decay faster take the segment-sum form instead.
FACTORED_DECAY_LIMIT = 60.0


def ssd_chunk_scan(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   chunk_size: int) -> torch.Tensor:
    """Chunked SSD: y_t = Σ_{s≤t} (C_t · B_s) exp(a_{s+1} + … + a_t) x_s, memory O(L · chunk) instead of O(L²).

    x (batch, L, heads, p) is the input already scaled by dt, a (batch, L, heads) the log-decay dt·A, b and c
    (batch, L, groups, n) shared by the heads of a group. Lengths that are not a multiple of the chunk are
    zero-padded at the end, which the causal scan never lets reach the real positions; a sequence shorter than
    `chunk_size` is one chunk of its own length (the result does not depend on the chunking).

    Every product is a batched matmul per (batch, chunk, group) with the group's heads side by side in its width
    (B and C are never repeated per head): the C·Bᵀ scores, the states each chunk adds (B·x), and the output,
    scores · (x · exp(-a)) + C · (incoming state), rescaled by exp(a). Factoring the decay exp(a_t - a_s) that way
    needs no (t, s) matrix per head; heads of chunks whose decay leaves float32's range (`FACTORED_DECAY_LIMIT`)
    are recomputed with that matrix (`segment_sum_scan`), as is everything under torch.compile, which cannot
    branch on the data. The states cross the chunks in a recurrence over the chunks.
    """
    batch, length, heads, p = x.shape
    groups, n = b.shape[2:]
    per_group = heads // groups
    chunk = min(chunk_size, length)
    pad = -length % chunk
    if pad:
        x, a, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, b, c))
    chunks = x.shape[1] // chunk
    # (batch, chunk, group, position, ·): a group's heads sit side by side in the last axis
    xg = x.reshape(batch, chunks, chunk, groups, per_group, p).transpose(2, 3)
    bg, cg = (t.reshape(batch, chunks, chunk, groups, n).transpose(2, 3) for t in (b, c))
    a_cum = a.reshape(batch, chunks, chunk, groups, per_group).transpose(2, 3).cumsum(dim=3)  # from chunk start
    a_end = a_cum[:, :, :, -1]  # (batch, chunk, group, head): each chunk's total log-decay

    # What each chunk adds to the state by its end, then the state entering every chunk.
    added = (xg * torch.exp(a_end[:, :, :, None] - a_cum)[..., None]).flatten(-2).transpose(-1, -2) @ bg
    carried = torch.exp(a_end).repeat_interleave(p, dim=-1)[..., None]  # (batch, chunk, group, heads·p, 1)
    state, entering = torch.zeros_like(added[:, 0]), []
    for added_i, carried_i in zip(added.unbind(1), carried.unbind(1)):
        entering.append(state)
        state = state * carried_i + added_i
    states_in = torch.stack(entering, dim=1).transpose(-1, -2)  # (batch, chunk, group, n, heads·p)

    scores = (cg @ bg.transpose(-1, -2)).tril()  # (batch, chunk, group, t, s): C_t · B_s for s ≤ t
    inter = (cg @ states_in).unflatten(-1, (per_group, p))
    if compiling():
        intra = segment_sum_scan(xg.transpose(3, 4), a_cum.transpose(3, 4), scores[:, :, :, None]).transpose(3, 4)
        return finish(intra + inter * torch.exp(a_cum)[..., None], length)
    bounded = a_cum.clamp(min=-FACTORED_DECAY_LIMIT)  # exact where the decay fits, finite everywhere
    scaled = (xg * torch.exp(-bounded)[..., None]).flatten(-2)
    y = ((scores @ scaled).unflatten(-1, (per_group, p)) + inter) * torch.exp(bounded)[..., None]
    fast = a_end < -FACTORED_DECAY_LIMIT  # (batch, chunk, group, head)
    if bool(fast.any()):
        where = fast.nonzero(as_tuple=True)
        intra = segment_sum_scan(xg.transpose(3, 4)[where], a_cum.transpose(3, 4)[where], scores[where[:3]])
        y = y.transpose(3, 4).index_put(where, intra + inter.transpose(3, 4)[where] * torch.exp(
            a_cum.transpose(3, 4)[where])[..., None]).transpose(3, 4)
    return finish(y, length)


def finish(y: torch.Tensor, length: int) -> torch.Tensor:
    """(batch, chunk, group, t, heads, p) → (batch, length, heads · groups, p), the padding cut off."""
    batch, chunks, groups, chunk, per_group, p = y.shape
    return y.transpose(2, 3).reshape(batch, chunks * chunk, groups * per_group, p)[:, :length]


def segment_sum_scan(x: torch.Tensor, a_cum: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The within-chunk part of one head with its decay as a (t, s) matrix exp(a_t - a_s): any decay rate, at the
    cost of that matrix. x (…, t, p), a_cum (…, t), scores (…, t, s), with leading axes that broadcast."""
    t = a_cum.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=a_cum.device).tril()
    decay = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, -math.inf))
    return (scores * decay) @ x


class Mamba2(UsesKernel, nn.Module):
    """`mamba2`: `mamba_ssm.Mamba2` (keys in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), same init.

    `use_mem_eff_path`, `layer_idx` and `sequence_parallel` select kernels / inference caches / tensor parallelism
    and do not change the output; they are accepted so the paper's YAML loads unchanged. Options that would
    change the layout and that the paper never used (`d_ssm` < d_inner, a `process_group`) are refused.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                 expand: int = 2, headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                 A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = (0.0, float("inf")),
                 bias: bool = False, conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: int | None = None, process_group=None, sequence_parallel: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_inner = expand * d_model
        if d_ssm is not None and d_ssm != d_inner:
            raise ValueError(f"mamba2: d_ssm={d_ssm} (an extra gated-MLP branch) is not supported; leave it unset "
                             f"or equal to expand * d_model = {d_inner}")
        if process_group is not None:
            raise ValueError("mamba2: process_group (tensor parallelism) is not supported; leave it unset")
        if d_inner % headdim:
            raise ValueError(f"mamba2: expand * d_model = {d_inner} is not divisible by headdim {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"mamba2: nheads {nheads} is not divisible by ngroups {ngroups}")
        self.d_inner, self.d_state, self.headdim = d_inner, d_state, headdim
        self.ngroups, self.nheads = ngroups, nheads
        self.chunk_size = chunk_size
        self.dt_limit = tuple(dt_limit)
        self.D_has_hdim = D_has_hdim
        conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **factory)
        self.conv1d = CausalDepthwiseConv1d(conv_dim, d_conv, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        # dt log-uniform in [dt_min, dt_max], stored through the inverse softplus (as mamba_ssm does).
        dt = torch.exp(torch.rand(nheads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        a = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(a).to(dtype=dtype))
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads, device=device))
        self.norm = (GatedRMSNorm(d_inner, d_inner // ngroups, norm_before_gate=norm_before_gate, **factory)
                     if rmsnorm else None)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        groups_width = self.ngroups * self.d_state
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * groups_width, self.nheads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))).transpose(1, 2)
        xs, b, c = xbc.split([self.d_inner, groups_width, groups_width], dim=-1)
        y = self.scan(xs.unflatten(-1, (self.nheads, self.headdim)), dt,
                      b.unflatten(-1, (self.ngroups, self.d_state)), c.unflatten(-1, (self.ngroups, self.d_state)))
        y = y.flatten(-2)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y)

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample: projections, the conv, and the scan in its recurrent form
        (2 · 2 · N · d_inner · d_state: state update and read-out), not the chunked algorithm's extra work."""
        scan = 2 * 2 * tokens * self.d_inner * self.d_state
        return (linear_flops(self.in_proj, tokens) + self.conv1d.forward_flops(tokens) + scan
                + linear_flops(self.out_proj, tokens))

    def scan(self, x: torch.Tensor, dt: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """SSM over the sequence: x (B, L, H, P), raw dt (B, L, H), b/c (B, L, G, N) → (B, L, H, P)."""
        a = -torch.exp(self.A_log.float())
        d = self.D.view(self.nheads, -1)  # (H, P) or (H, 1)
        y, self.backend = MAMBA_SSM.run(
            lambda kernel: kernel.mamba_chunk_scan_combined(x, dt, a, b, c, self.chunk_size,
                                                            D=d if self.D_has_hdim else self.D, dt_bias=self.dt_bias,
                                                            dt_softplus=True, dt_limit=self.dt_limit),
            lambda: self.pure_scan(x, dt, a, b, c, d), x)
        return y

    def pure_scan(self, x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                  d: torch.Tensor) -> torch.Tensor:
        """The chunked SSD in float32: the exact reference of the fused kernel."""
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        y = ssd_chunk_scan(x.float() * dt[..., None], dt * a, b.float(), c.float(), PURE_CHUNK_SIZE)
        return (y + x.float() * d.float()).to(x.dtype)
