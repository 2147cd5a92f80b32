"""Every operator compiles as one graph (no graph break) and trains compiled exactly as it does eagerly."""
from __future__ import annotations

import copy

import pytest
import torch

from models import compile as compiling
from tests.operators.test_operators_common import GRID, SMALL, TOKENS, WIDTH, apply, make


@pytest.mark.parametrize("case", SMALL)
def test_operator_has_no_graph_break(case):
    op, token_mixer = make(case)
    x = torch.randn(2, TOKENS, WIDTH)
    breaks, reasons = compiling.graph_breaks(op, x, GRID) if token_mixer else compiling.graph_breaks(op, x)
    assert breaks == 0, reasons


@pytest.mark.parametrize("case", ["hyena_x", "hyena_se", "mamba2", "mlp_hyena_x"])
def test_compiled_training_step_equals_eager(case, monkeypatch):
    """Forward and backward traced by torch.compile (dynamo + AOTAutograd; no code generation, to stay quick):
    the pure paths the compiler sees (the causal conv as plain multiply-adds, Mamba-2's segment-sum form) give the
    eager outputs and gradients."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    eager, token_mixer = make(case)
    compiled = compiling.for_training(copy.deepcopy(eager))
    x = torch.randn(2, TOKENS, WIDTH)
    grad = torch.randn(2, TOKENS, WIDTH)
    for op in (eager, compiled):
        apply(op, token_mixer, x).backward(grad)
    assert compiling.is_compiled(compiled) and not compiling.is_compiled(eager)
    torch.testing.assert_close(apply(compiled, token_mixer, x), apply(eager, token_mixer, x), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
