"""A small T5 encoder pretrained to put each word's context into its features, for worlds with a tiny vocabulary.

PixArt-Sigma's cross-attention has no positions over text tokens: it relies on T5 having mixed each word's context
into its feature. A randomly initialised T5 barely does (swapping the colours of "a red circle and a blue square"
changes the circle's feature by about 2%), so "which colour goes with which shape" and "which shape is left" would
be nearly invisible. This pretraining fixes that with a plain language-modelling objective: from each token's
feature, linear heads predict the token itself and its neighbours at the given offsets. The encoder is then saved
as an ordinary `T5EncoderModel` and kept frozen, as PixArt-Sigma keeps T5.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerFast, T5EncoderModel

OFFSETS = (-3, -2, -1, 0, 1, 2, 3)


def neighbour_loss(features: torch.Tensor, heads: nn.Linear, ids: torch.Tensor, mask: torch.Tensor,
                   offsets: Sequence[int], vocab_size: int) -> torch.Tensor:
    """Mean over offsets of the cross-entropy of predicting the token at position i + offset from feature i, over
    the pairs where both positions are real tokens."""
    logits = heads(features).view(*features.shape[:2], len(offsets), vocab_size)
    positions = torch.arange(ids.shape[1], device=ids.device)
    total = features.new_zeros(())
    for k, offset in enumerate(offsets):
        source = positions + offset
        inside = (source >= 0) & (source < ids.shape[1])
        target = ids[:, source.clamp(0, ids.shape[1] - 1)]
        valid = mask.bool() & mask[:, source.clamp(0, ids.shape[1] - 1)].bool() & inside
        total = total + F.cross_entropy(logits[:, :, k][valid], target[valid])
    return total / len(offsets)


def pretrain_context(model: T5EncoderModel, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str],
                     steps: int = 400, lr: float = 3e-3, offsets: Sequence[int] = OFFSETS, seed: int = 0,
                     max_length: int = 16) -> list[float]:
    """Train `model` in place on full batches of `texts` (AdamW); returns the loss per step. Deterministic for a
    given machine and thread count."""
    torch.manual_seed(seed)
    vocab_size = len(tokenizer)
    heads = nn.Linear(model.config.d_model, vocab_size * len(offsets))
    tokens = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        features = model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        loss = neighbour_loss(features, heads, tokens.input_ids, tokens.attention_mask, offsets, vocab_size)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return losses
