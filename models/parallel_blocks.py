"""Depth-to-width restructuring (the paper's §7 case study): two consecutive transformer blocks a and b = a + 1
become one parallel block; restructuring every pair halves the depth (DiT-XL/2: 28 → 14 sequential blocks).

    out = x + merge(concat(u_a, u_b)),    u_a = block_a(x) − x,    u_b = block_b(x) − x

Both branches read the same input x. `merge` is a learnable Linear(2d → d) initialised to [I, I] with zero bias, so
a fresh pair computes x + u_a + u_b: the only change from the two sequential blocks is that block b now sees x instead
of block a's output. Each branch keeps its own modulation (PixArt-Sigma's `scale_shift_table` on the shared
adaLN-single vector, DiT's own adaLN of the conditioning vector).

The two branches run as one wider computation:
- a projection whose input both branches share (DiT's adaLN of c, PixArt's cross-attention keys and values of the
  caption) is one GEMM over the two branches' weights concatenated along the output dimension;
- a projection of per-branch inputs (q/k/v, the output projections, the MLP) is one batched GEMM over the branches
  (`torch.baddbmm` on (2, tokens, d));
- attention is one SDPA call whose batch holds both branches (2·B samples, H heads each).
`UnfusedPair` computes the same function with the two original blocks one after the other (the tests' reference
and the speed benchmark's "unfused" row).

State-dict layout of the pair of blocks a, a + 1, stored at `blocks.{a}` (index a + 1 is absent from the model's
blocks): the parameters of the two blocks under the blocks' own names, stacked on a new leading dimension of size 2
(index 0 = block a, 1 = block a + 1), plus the merge:

    PixArt-Sigma  scale_shift_table (2, 6, d); attn.qkv.{weight (2, 3d, d), bias (2, 3d)}; attn.proj (2, d, d);
                  cross_attn.q_linear (2, d, d); cross_attn.kv_linear (2, 2d, d); cross_attn.proj (2, d, d);
                  mlp.fc1 (2, 4d, d); mlp.fc2 (2, d, 4d); merge.weight (d, 2d), merge.bias (d)
    DiT           adaLN_modulation.1 (2, 6d, d); attn.qkv, attn.proj, mlp.fc1, mlp.fc2 as above; merge

so `pair.attn.qkv.weight[k]` is block (a + k)'s `attn.qkv.weight`, and a pair is built from two teacher blocks by
stacking their tensors (`pair_from_blocks`).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError
from models.dit import DiTBlock
from models.layers import linear_flops, modulate
from models.operators.attention import MultiHeadAttention
from models.operators.attention_core import attention, masked_key_attention
from models.operators.kernels import PURE, UsesKernel
from models.pixart import PixArtBlock, PixArtSelfAttention

BRANCHES = 2


class StackedLinear(nn.Module):
    """The same linear layer of the two branches: weight (2, out, in), bias (2, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape[1:]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @classmethod
    def from_linears(cls, layers: tuple[nn.Linear, nn.Linear]) -> StackedLinear:
        """The two layers' tensors, copied and stacked."""
        if any(layer.bias is None for layer in layers) != all(layer.bias is None for layer in layers):
            raise ConfigError("parallel pair: one branch's layer has a bias and the other's has none")
        bias = None if layers[0].bias is None else torch.stack([layer.bias.detach() for layer in layers]).clone()
        return cls(torch.stack([layer.weight.detach() for layer in layers]).clone(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-branch inputs (2, ..., in) → (2, ..., out): one batched GEMM."""
        rows = x.reshape(BRANCHES, -1, self.in_features)
        weight = self.weight.transpose(1, 2)
        out = torch.bmm(rows, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), rows, weight)
        return out.reshape(*x.shape[:-1], self.out_features)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """One input both branches read (..., in) → (2, ..., out): one GEMM with the weights side by side."""
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = F.linear(x, self.weight.reshape(-1, self.in_features), bias)
        return out.unflatten(-1, (BRANCHES, self.out_features)).movedim(-2, 0)

    def flops(self, rows: int) -> int:
        """Forward FLOPs of both branches on `rows` rows each (2 · MACs)."""
        return BRANCHES * 2 * rows * self.in_features * self.out_features


class StackedMlp(nn.Module):
    """The two branches' MLPs (`fc1`, tanh-GELU, `fc2`)."""

    def __init__(self, mlps: tuple[nn.Module, nn.Module]):
        super().__init__()
        self.fc1 = StackedLinear.from_linears((mlps[0].fc1, mlps[1].fc1))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = StackedLinear.from_linears((mlps[0].fc2, mlps[1].fc2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward_flops(self, tokens: int) -> int:
        """Analytic forward FLOPs per sample, both branches."""
        return self.fc1.flops(tokens) + self.fc2.flops(tokens)


class StackedSelfAttention(nn.Module):
    """The two branches' self-attention: stacked q/k/v and output projections, one attention call over 2·B."""

    def __init__(self, attns: tuple[MultiHeadAttention, MultiHeadAttention]):
        super().__init__()
        for attn in attns:
            _check_plain_attention(attn)
        self.num_heads, self.head_dim, self.scale = attns[0].num_heads, attns[0].head_dim, attns[0].scale
        self.qkv = StackedLinear.from_linears((attns[0].qkv, attns[1].qkv))
        self.proj = StackedLinear.from_linears((attns[0].proj, attns[1].proj))

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        two, b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(two * b, n, 3, self.num_heads, self.head_dim).unbind(2)
        return self.proj(attention(q, k, v, scale=self.scale).reshape(two, b, n, d))

    def forward_flops(self, tokens: int) -> int:
        """Both branches: projections and the core's two products (4 · N² · D each), as `MultiHeadAttention`."""
        core = 4 * tokens * tokens * self.num_heads * self.head_dim
        return self.qkv.flops(tokens) + BRANCHES * core + self.proj.flops(tokens)


class StackedCrossAttention(UsesKernel, nn.Module):
    """The two branches' cross-attention (PixArt-Sigma): queries from each branch, keys and values of the shared
    caption in one GEMM, one attention call over 2·B with the caption mask repeated."""

    def __init__(self, crosses: tuple[nn.Module, nn.Module]):
        super().__init__()
        self.num_heads, self.head_dim = crosses[0].num_heads, crosses[0].head_dim
        self.q_linear = StackedLinear.from_linears((crosses[0].q_linear, crosses[1].q_linear))
        self.kv_linear = StackedLinear.from_linears((crosses[0].kv_linear, crosses[1].kv_linear))
        self.proj = StackedLinear.from_linears((crosses[0].proj, crosses[1].proj))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        two, b, n, d = x.shape
        q = self.q_linear(x).reshape(two * b, n, self.num_heads, self.head_dim)
        k, v = self.kv_linear.shared(y).reshape(two * b, y.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        if y_mask is None:
            out, self.backend = attention(q, k, v), PURE
        else:
            out, self.backend = masked_key_attention(q, k, v, y_mask.repeat(two, 1))
        return self.proj(out.reshape(two, b, n, d))


def sum_merge(hidden_size: int) -> nn.Linear:
    """Linear(2d → d) with weight [I, I] and zero bias: the sum of the two updates."""
    merge = nn.Linear(2 * hidden_size, hidden_size)
    with torch.no_grad():
        eye = torch.eye(hidden_size, device=merge.weight.device, dtype=merge.weight.dtype)
        merge.weight.copy_(torch.cat([eye, eye], dim=1))
        merge.bias.zero_()
    return merge


class ParallelPair(nn.Module):
    """Two blocks side by side, their residual updates merged by `merge` (Linear(2d → d), [I, I] at the start)."""

    merge: nn.Linear

    def branch_updates(self, x: torch.Tensor, *args) -> torch.Tensor:
        """(B, N, d) → the two branches' residual updates (2, B, N, d)."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, *args) -> torch.Tensor:
        """The pair's residual update merge(concat(u_a, u_b)) (B, N, d): what stage 1 regresses."""
        u = self.branch_updates(x, *args)
        return self.merge(torch.cat([u[0], u[1]], dim=-1))

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """Called like the blocks it replaces."""
        return x + self.update(x, *args)

    def merge_flops(self, tokens: int) -> int:
        return linear_flops(self.merge, tokens)


class ParallelPixArtPair(ParallelPair):
    """Two PixArt-Sigma blocks in parallel: gated self-attention, cross-attention and gated MLP per branch."""

    def __init__(self, blocks: tuple[PixArtBlock, PixArtBlock]):
        super().__init__()
        a = blocks[0]
        self.norm1 = nn.LayerNorm(a.norm1.normalized_shape, elementwise_affine=False, eps=a.norm1.eps)
        self.attn = StackedSelfAttention((blocks[0].attn, blocks[1].attn))
        self.cross_attn = StackedCrossAttention((blocks[0].cross_attn, blocks[1].cross_attn))
        self.norm2 = nn.LayerNorm(a.norm2.normalized_shape, elementwise_affine=False, eps=a.norm2.eps)
        self.mlp = StackedMlp((blocks[0].mlp, blocks[1].mlp))
        self.scale_shift_table = nn.Parameter(torch.stack([b.scale_shift_table.detach() for b in blocks]).clone())
        self.merge = sum_merge(self.scale_shift_table.shape[-1])

    def branch_updates(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None, t0: torch.Tensor,
                       hw: tuple[int, int]) -> torch.Tensor:
        mod = self.scale_shift_table[:, None] + t0.reshape(x.shape[0], 6, -1)[None]  # (2, B, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        attn = gate_msa * self.attn(modulate(self.norm1(x)[None], shift_msa, scale_msa), hw)
        x1 = x + attn
        cross = self.cross_attn(x1, y, y_mask)
        x2 = x1 + cross
        return attn + cross + gate_mlp * self.mlp(modulate(self.norm2(x2), shift_mlp, scale_mlp))


class ParallelDiTPair(ParallelPair):
    """Two DiT blocks in parallel: each branch's adaLN-Zero modulation from c (one GEMM for both), gated attention
    and gated MLP."""

    def __init__(self, blocks: tuple[DiTBlock, DiTBlock]):
        super().__init__()
        a = blocks[0]
        self.norm1 = nn.LayerNorm(a.norm1.normalized_shape, elementwise_affine=False, eps=a.norm1.eps)
        self.attn = StackedSelfAttention((blocks[0].attn, blocks[1].attn))
        self.norm2 = nn.LayerNorm(a.norm2.normalized_shape, elementwise_affine=False, eps=a.norm2.eps)
        self.mlp = StackedMlp((blocks[0].mlp, blocks[1].mlp))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), StackedLinear.from_linears(
            (blocks[0].adaLN_modulation[1], blocks[1].adaLN_modulation[1])))
        self.merge = sum_merge(self.norm1.normalized_shape[0])

    def branch_updates(self, x: torch.Tensor, c: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        mod = self.adaLN_modulation[1].shared(self.adaLN_modulation[0](c))[:, :, None]  # (2, B, 1, 6d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=3)
        attn = gate_msa * self.attn(modulate(self.norm1(x)[None], shift_msa, scale_msa), hw)
        return attn + gate_mlp * self.mlp(modulate(self.norm2(x + attn), shift_mlp, scale_mlp))


class UnfusedPair(nn.Module):
    """The reference computation of a pair: the two original blocks one after the other, each on x, merged."""

    def __init__(self, blocks: tuple[nn.Module, nn.Module], merge: nn.Linear):
        super().__init__()
        self.branches = nn.ModuleList(blocks)
        self.merge = merge

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return x + self.merge(torch.cat([block(x, *args) - x for block in self.branches], dim=-1))


def pair_from_blocks(a: nn.Module, b: nn.Module) -> ParallelPair:
    """The fused parallel block of two consecutive blocks, holding copies of their weights; merge = sum."""
    if type(a) is not type(b):
        raise ConfigError(f"parallel pair: blocks of different kinds ({type(a).__name__}, {type(b).__name__}); "
                          "is one of them grafted already?")
    kinds = {PixArtBlock: ParallelPixArtPair, DiTBlock: ParallelDiTPair}
    if type(a) not in kinds:
        raise ConfigError(f"parallel pair: no parallel form of {type(a).__name__} blocks (known: "
                          f"{sorted(k.__name__ for k in kinds)})")
    if a.norm2.eps != b.norm2.eps or a.norm1.eps != b.norm1.eps:
        raise ConfigError("parallel pair: the two blocks' LayerNorm eps differ")
    return kinds[type(a)]((a, b))


def _check_plain_attention(attn: nn.Module) -> None:
    """The fused form covers the released models' self-attention: timm layout, no qk-norm, no KV compression."""
    if type(attn) not in (MultiHeadAttention, PixArtSelfAttention):
        raise ConfigError(f"parallel pair: self-attention {type(attn).__name__} has no fused parallel form; graft "
                          "operators in other blocks than the pairs")
    if not isinstance(attn.q_norm, nn.Identity) or getattr(attn, "sr_ratio", 1) > 1 or attn.attn_drop:
        raise ConfigError("parallel pair: self-attention with qk-norm, KV compression or attention dropout has no "
                          "fused parallel form (no released PixArt-Sigma or DiT uses them)")


class BlockStack(nn.ModuleDict):
    """A model's blocks once pairs are restructured, keyed by their original index: a pair sits at its first block's
    index (`blocks.4` holds blocks 4 and 5), every other block keeps its own. Iterates over its blocks in order and
    indexes by int, as the ModuleList it replaces."""

    @classmethod
    def from_blocks(cls, blocks: Iterable[nn.Module]) -> BlockStack:
        return cls({str(i): block for i, block in enumerate(blocks)})

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: int | str) -> nn.Module:
        return self._modules[str(index)]

    def indexes(self) -> list[int]:
        """The original index of each entry, in order."""
        return [int(key) for key in self._modules]

    def merge_pair(self, first: int, pair: nn.Module) -> nn.ModuleList:
        """Put `pair` in place of blocks `first` and `first + 1`; returns the two blocks it replaces."""
        keys = (str(first), str(first + 1))
        missing = [k for k in keys if k not in self._modules]
        if missing:
            raise ConfigError(f"cannot pair blocks {first} and {first + 1}: block(s) {missing} are already part of "
                              "another pair")
        replaced = nn.ModuleList([self._modules[k] for k in keys])
        self._modules[keys[0]] = pair
        del self._modules[keys[1]]
        return replaced


def unfused_pairs(model: nn.Module, restructured: nn.Module) -> nn.Module:
    """A copy of `model` (unrestructured) whose blocks are paired as in `restructured`, each pair computed by
    `UnfusedPair` from `model`'s own two blocks and a copy of the restructured pair's merge: the function of
    `restructured` when its pairs hold `model`'s blocks, evaluated branch by branch."""
    reference = copy.deepcopy(model)
    blocks = BlockStack.from_blocks(reference.blocks)
    for first, block in zip(restructured.blocks.indexes(), restructured.blocks):
        if isinstance(block, ParallelPair):
            blocks.merge_pair(first, UnfusedPair((blocks[first], blocks[first + 1]), copy.deepcopy(block.merge)))
    reference.blocks = blocks
    return reference


def pair_paths(path: str) -> tuple[str, str] | None:
    """For a pair's module path `blocks.{a}`: the teacher blocks whose input and output it regresses
    (`blocks.{a}`, `blocks.{a + 1}`); None for an operator path (`blocks.{i}.attn`)."""
    parts = path.split(".")
    if len(parts) != 2:
        return None
    return path, f"{parts[0]}.{int(parts[1]) + 1}"
