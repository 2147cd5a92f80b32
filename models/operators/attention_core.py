"""One attention core with backends: torch SDPA (everywhere), flash-attn (CUDA windows), xformers (CUDA text masks).

Every public function takes q, k, v as (B, N, H, Dh) and returns (B, N, H, Dh); the two with an optional kernel
also return the backend that ran (`models.operators.kernels`). The pure-PyTorch paths are exact references for
the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.operators.kernels import FLASH_ATTN, XFORMERS, compiling, pure_backend

#: Queries per block in the pure-PyTorch sliding-window path: memory O(N · (block + window)), not O(N²).
WINDOW_BLOCK = 512


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         scale: float | None = None, dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """torch scaled_dot_product_attention on (B, N, H, Dh); `mask` is boolean, True = attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """Full attention; SDPA picks flash / memory-efficient kernels on CUDA by itself."""
    return sdpa(q, k, v, scale=scale, dropout_p=dropout_p, causal=causal)


def masked_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                         scale: float | None = None, dropout_p: float = 0.0) -> tuple[torch.Tensor, str]:
    """Attention where each sample sees only its valid keys (PixArt's text mask), key_mask (B, L) bool.

    Masked keys are excluded exactly, as PixArt's xformers block-diagonal mask does (diffusers' -10000 bias
    is equal up to float rounding). A sample with no valid key is an error, not a silent average over padding.
    """
    key_mask = key_mask.to(torch.bool)
    lens = key_mask.sum(dim=1)
    if compiling():  # checked on the device, without cutting the compiled graph
        torch._assert_async((lens > 0).all(), "encoder attention mask has no valid token for a batch row; pass at "
                            "least one (T5 always emits an end-of-sequence token)")
    elif bool((lens == 0).any()):
        bad = torch.nonzero(lens == 0).flatten().tolist()
        raise ValueError(f"encoder attention mask has no valid token for batch rows {bad}; "
                         "pass at least one (T5 always emits an end-of-sequence token)")

    def pure() -> torch.Tensor:
        return sdpa(q, k, v, mask=key_mask[:, None, None, :], scale=scale, dropout_p=dropout_p)

    if dropout_p:  # xformers' path here has no dropout
        return pure(), pure_backend()
    return XFORMERS.run(lambda xops: _xformers_masked_key_attention(xops, q, k, v, key_mask, lens, scale), pure,
                        q, k, v)


def _xformers_masked_key_attention(xops, q, k, v, key_mask, lens, scale):
    b, n, h, d = q.shape
    bias = xops.fmha.BlockDiagonalMask.from_seqlens([n] * b, lens.tolist())
    q = q.reshape(1, b * n, h, d)
    k = k[key_mask].unsqueeze(0)
    v = v[key_mask].unsqueeze(0)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
    return out.reshape(b, n, h, d)


def window_mask(n_q: int, n_k: int, window: tuple[int, int], q_offset: int = 0, k_offset: int = 0,
                device: torch.device | None = None) -> torch.Tensor:
    """Boolean band mask: query i sees key j iff i - left <= j <= i + right (flash-attn's window_size)."""
    left, right = window
    qi = torch.arange(n_q, device=device)[:, None] + q_offset
    kj = torch.arange(n_k, device=device)[None, :] + k_offset
    ok = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= kj >= qi - left
    if right >= 0:
        ok &= kj <= qi + right
    return ok


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int],
                     scale: float | None = None, dropout_p: float = 0.0) -> tuple[torch.Tensor, str]:
    """Sliding-window attention over the flattened sequence; -1 in `window` means unbounded on that side.

    flash-attn on CUDA half precision; otherwise a blocked SDPA: each block of queries attends only to the key
    span its window can reach, so memory grows linearly with the sequence length.
    """
    return FLASH_ATTN.run(lambda flash: flash.flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale,
                                                              causal=False, window_size=tuple(window)),
                          lambda: blocked_window_attention(q, k, v, window, scale, dropout_p), q, k, v)


def blocked_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: tuple[int, int],
                             scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The pure path of `window_attention`: SDPA over blocks of queries and the key span each block can reach."""
    left, right = window
    n = q.shape[1]
    outs = []
    for start in range(0, n, WINDOW_BLOCK):
        stop = min(start + WINDOW_BLOCK, n)
        k_lo = 0 if left < 0 else max(0, start - left)
        k_hi = n if right < 0 else min(n, stop + right)
        mask = window_mask(stop - start, k_hi - k_lo, window, start, k_lo, device=q.device)
        outs.append(sdpa(q[:, start:stop], k[:, k_lo:k_hi], v[:, k_lo:k_hi], mask=mask, scale=scale,
                         dropout_p=dropout_p))
    return torch.cat(outs, dim=1)
