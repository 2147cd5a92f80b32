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
from models.operators.kernels import MAMBA_SSM, UsesKernel


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


def decay_matrix(log_decay_cumsum: torch.Tensor) -> torch.Tensor:
    """(..., T) cumulative log-decays → (..., T, T): [i, j] = exp(cum_i − cum_j), the decay from step j to i
    (0 for j > i)."""
    t = log_decay_cumsum.shape[-1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=log_decay_cumsum.device))
    diff = log_decay_cumsum[..., :, None] - log_decay_cumsum[..., None, :]
    return torch.exp(diff.masked_fill(~causal, -math.inf))


def ssd_chunk_scan(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                   chunk_size: int) -> torch.Tensor:
    """Chunked SSD: y_t = Σ_{s≤t} (C_t · B_s) exp(a_{s+1} + … + a_t) x_s, memory O(L · chunk) instead of O(L²).

    x (batch, L, heads, p) is the input already scaled by dt, a (batch, L, heads) the log-decay dt·A,
    b and c (batch, L, heads, n). Lengths that are not a multiple of the chunk are zero-padded at the end,
    which the causal scan never lets reach the real positions; a sequence shorter than `chunk_size` is one
    chunk of its own length (the result does not depend on the chunking).
    """
    length = x.shape[1]
    chunk = min(chunk_size, length)
    pad = -length % chunk
    x, a, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, a, b, c))
    batch, _, heads, p = x.shape
    x, b, c = (t.reshape(batch, -1, chunk, heads, t.shape[-1]) for t in (x, b, c))  # (b, chunk, l, h, ·)
    a_cum = a.reshape(batch, -1, chunk, heads).cumsum(dim=2)  # (b, chunk, l, h), log-decay from chunk start
    a_cum_t = a_cum.permute(0, 3, 1, 2)  # (b, h, chunk, l)

    # Within each chunk: a masked, decayed "attention" C·Bᵀ.
    scores = torch.einsum("bclhn,bcshn->bhcls", c, b) * decay_matrix(a_cum_t)
    y_intra = torch.einsum("bhcls,bcshp->bclhp", scores, x)

    # State each chunk adds by its end, then the recurrence that carries states across chunks.
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)[..., None]  # (b, chunk, l, h, 1)
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", b * to_end, x)
    chunk_states = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)
    across = decay_matrix(F.pad(a_cum_t[..., -1], (1, 0)).cumsum(dim=-1))  # (b, h, chunk+1, chunk+1)
    states_in = torch.einsum("bhzc,bchpn->bzhpn", across, chunk_states)[:, :-1]  # state entering each chunk

    # What the incoming state contributes at every position of its chunk.
    y_inter = torch.einsum("bclhn,bchpn->bclhp", c * torch.exp(a_cum)[..., None], states_in)
    return (y_intra + y_inter).reshape(batch, -1, heads, p)[:, :length]


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
        heads_per_group = self.nheads // self.ngroups
        b, c = (t.float().repeat_interleave(heads_per_group, dim=2) for t in (b, c))
        y = ssd_chunk_scan(x.float() * dt[..., None], dt * a, b, c, self.chunk_size)
        return (y + x.float() * d.float()).to(x.dtype)
