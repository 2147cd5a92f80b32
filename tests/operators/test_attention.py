"""Sliding-window attention equals dense masked-softmax attention, across the blocked path's block boundary."""
from __future__ import annotations

import pytest
import torch

from models.operators import attention_core, build
from models.operators.attention import SlidingWindowAttention
from models.operators.kernels import FLASH_ATTN

WIDTH, HEADS = 32, 4
N = 1100  # crosses the 512-query blocks of the pure-PyTorch path twice


def dense_window_reference(op: SlidingWindowAttention, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Full N×N scores, -inf outside the band i - left ≤ j ≤ i + right (-1: unbounded), explicit softmax."""
    batch, n, _ = x.shape
    hd, heads, kv_heads = op.head_dim, op.num_heads, op.num_heads_kv
    qkv = torch.einsum("bni,oi->bno", x, op.Wqkv.weight) + op.Wqkv.bias
    q = qkv[..., :heads * hd].reshape(batch, n, heads, hd)
    k = qkv[..., heads * hd:(heads + kv_heads) * hd].reshape(batch, n, kv_heads, hd)
    v = qkv[..., (heads + kv_heads) * hd:].reshape(batch, n, kv_heads, hd)
    kv_head_of = torch.arange(heads) // (heads // kv_heads)  # query head h reads kv head h // (H / H_kv)
    k, v = k[:, :, kv_head_of], v[:, :, kv_head_of]

    scores = torch.einsum("bihd,bjhd->bhij", q, k) * hd**-0.5
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    left, right = window
    allowed = torch.ones(n, n, dtype=torch.bool)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)  # max score is small: no overflow
    out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, n, heads * hd)
    return torch.einsum("bni,oi->bno", out, op.out_proj.weight) + op.out_proj.bias


@pytest.mark.parametrize("window", [(4, 4), (2, 0), (0, 3), (-1, 2)])
@pytest.mark.parametrize("num_heads_kv", [None, 2])
def test_swa_matches_dense_masked_softmax(window, num_heads_kv):
    torch.manual_seed(0)
    op = SlidingWindowAttention(WIDTH, HEADS, num_heads_kv=num_heads_kv, window_size=window)
    x = 0.5 * torch.randn(1, N, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(op(x), dense_window_reference(op, x, window), rtol=1e-5, atol=1e-5)


def test_swa_causal_is_a_left_window():
    op = SlidingWindowAttention(WIDTH, HEADS, window_size=(4, 4), causal=True)
    assert op.window == (4, 0)


def test_swa_refuses_unsupported_options(paper_config):
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        build("swa", **(paper_config("swa") | {"embed_dim": WIDTH, "num_heads": HEADS, "rotary_emb_dim": 8}))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or FLASH_ATTN.load() is None,
                    reason="needs CUDA and a working flash_attn package")
@pytest.mark.parametrize("window", [(4, 4), (-1, 2)])
def test_flash_window_matches_pure_path(window):
    """bf16 flash-attn windowed kernel vs the bf16 blocked SDPA path on the same GPU (rtol 2e-2, atol 2e-2)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, N, HEADS, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fast, backend = attention_core.window_attention(q, k, v, window)
    pure = attention_core.blocked_window_attention(q, k, v, window)
    assert backend == "flash_attn"
    torch.testing.assert_close(fast, pure, rtol=2e-2, atol=2e-2)
