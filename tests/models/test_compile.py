"""Whole models under torch.compile: grafted PixArt-Sigma and DiT trace as one graph, and the compiled, weight-frozen
inference path (what sampling and the speed report run) gives the eager outputs."""
from __future__ import annotations

import copy

import pytest
import torch

from models import compile as compiling
from models.dit import DiT
from models.graft import GraftSpec
from models.operators.kernels import backends
from models.pixart import PixArtSigma

HYENA_X = {"grafts": [{"type": "mha", "name": "hyena_x", "config": {}, "layers": {"indexes": [1, 3]}}]}


def grafted_pixart() -> tuple[PixArtSigma, tuple]:
    torch.manual_seed(0)
    model = PixArtSigma(PixArtSigma.make_config("tiny", depth=4)).eval()
    GraftSpec.from_dict(HYENA_X).with_width(model.config.hidden_size).apply(model)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 9:] = 0  # a padded caption
    return model, (torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.randn(2, 16, 32), mask)


def test_grafted_pixart_and_dit_have_no_graph_break():
    model, inputs = grafted_pixart()
    breaks, reasons = compiling.graph_breaks(model, *inputs)
    assert breaks == 0, reasons
    torch.manual_seed(0)
    dit = DiT(DiT.make_config("tiny")).eval()
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "mamba2", "config": {"headdim": 8, "d_state": 16},
                                     "layers": {"indexes": [0]}}]}).with_width(dit.config.hidden_size).apply(dit)
    side = dit.config.input_size
    breaks, reasons = compiling.graph_breaks(dit, torch.randn(2, 4, side, side), torch.tensor([10, 500]),
                                             torch.tensor([1, 2]))
    assert breaks == 0, reasons


@pytest.mark.slow
def test_compiled_inference_equals_eager():
    """Inductor with frozen weights (the default backend; about a minute of compiling on 2 CPU cores)."""
    eager, inputs = grafted_pixart()
    compiled = compiling.for_inference(copy.deepcopy(eager))
    with torch.inference_mode():
        expected = eager(*inputs)
        torch.testing.assert_close(compiled(*inputs), expected, rtol=1e-4, atol=1e-4)
    assert set(backends(compiled).values()) == {"compiled"} and set(backends(eager).values()) == {"torch"}
