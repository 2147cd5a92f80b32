"""The context pretraining of the small T5 encoder: its objective, and what it changes in the features."""
from __future__ import annotations

import torch

from data.shapes import split_prompts, vocabulary
from models.context_t5 import neighbour_loss, pretrain_context
from models.tiny import build_t5, build_tokenizer

SWAPPED = ["a photo of a red circle and a blue square", "a photo of a blue circle and a red square"]


def circle_feature_change(model, tokenizer) -> float:
    """How much the feature of "circle" changes when the two colours swap places (relative)."""
    tokens = tokenizer(SWAPPED, return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    a, b = features[0, 5], features[1, 5]
    return float((a - b).norm() / a.norm())


def test_neighbour_loss_is_the_cross_entropy_of_the_right_pairs():
    torch.manual_seed(0)
    heads = torch.nn.Linear(4, 5 * 2)
    ids, mask = torch.tensor([[3, 4, 2, 0]]), torch.tensor([[1, 1, 1, 0]])
    features = torch.randn(1, 4, 4)
    logits = heads(features).view(1, 4, 2, 5)
    expected = (torch.nn.functional.cross_entropy(logits[0, [0, 1], 0], ids[0, [1, 2]])  # offset +1: 2 pairs
                + torch.nn.functional.cross_entropy(logits[0, [0, 1, 2], 1], ids[0, [0, 1, 2]])) / 2  # offset 0
    assert torch.allclose(neighbour_loss(features, heads, ids, mask, (1, 0), 5), expected)


def test_pretraining_puts_context_into_each_words_feature():
    tokenizer = build_tokenizer(vocabulary())
    model = build_t5(len(tokenizer), d_model=32, seed=0)
    before = circle_feature_change(model, tokenizer)
    texts = [r["prompt"] for r in split_prompts("train")][::3]
    losses = pretrain_context(model, tokenizer, texts, steps=60, lr=1e-2)
    assert losses[-1] < losses[0] / 3
    after = circle_feature_change(model, tokenizer)
    assert before < 0.1 and after > 2 * before, (before, after)  # the shipped encoder: test_shapes_teacher.py
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
