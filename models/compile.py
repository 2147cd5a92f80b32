"""torch.compile, the one way every command uses it: sampling and speed runs (`for_inference`) and training
(`for_training`).

Both compile in place (`nn.Module.compile`), so state-dict keys, attributes and methods such as DiT's
`forward_with_cfg` stay as they were, and every call of the module goes through the compiled code. Optional CUDA
kernels are imported first (`kernels.load_all`): compiled code never imports one itself. Shapes are compiled
static: a sampler calls the model at one batch size, and a new size gets its own graph.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from models.operators import kernels

log = logging.getLogger(__name__)

#: torch.compile backend; tests swap in "eager" or "aot_eager" to check the plumbing without code generation.
BACKEND = "inductor"


def _compile(module: nn.Module, options: dict | None, mode: str | None) -> nn.Module:
    kernels.load_all()
    inductor = BACKEND == "inductor"
    module.compile(backend=BACKEND, dynamic=False, mode=mode if inductor else None,
                   options=options if inductor else None)
    log.info("compiling %s with torch.compile (backend %s%s) on its first call", type(module).__name__, BACKEND,
             f", mode {mode}" if mode and inductor else "")
    return module


def for_inference(module: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile `module` in place for no-grad calls (sampling, speed). Its weights are frozen into the compiled
    code (inductor's `freezing`: on the CPU, matmul weights are prepacked and their bias and activation fused),
    so it must not be trained afterwards; the first call compiles (minutes on a CPU)."""
    return _compile(module, {"freezing": True}, mode)


def for_training(module: nn.Module, mode: str | None = None) -> nn.Module:
    """Compile `module` in place for training: forward and backward graphs, weights left as parameters."""
    return _compile(module, None, mode)


def add_argument(parser) -> None:
    """The `--compile` switch of the sampling commands (an argparse parser or group)."""
    parser.add_argument("--compile", action="store_true",
                        help="run the transformer under torch.compile (pays off over many batches; the first batch, "
                        "and the last if smaller, compile: minutes on a CPU)")


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place."""
    return getattr(module, "_compiled_call_impl", None) is not None


def graph_breaks(module: nn.Module, *args, **kwargs) -> tuple[int, list[str]]:
    """How many times torch.compile would cut `module(*args, **kwargs)` into separate graphs, and why (dynamo's
    explain: tracing only, no code generation, so it is quick on a CPU)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*args, **kwargs)
    return explained.graph_break_count, [str(reason.reason) for reason in explained.break_reasons]
