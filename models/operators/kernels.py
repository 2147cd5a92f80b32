"""Optional CUDA kernels (flash_attn, xformers, mamba_ssm, causal_conv1d): used when they work, never dropped
silently.

A kernel is imported the first time a CUDA tensor could use it. A package that is not installed is normal: one
info line, then the pure-PyTorch path. A package that is installed but fails to import (a CUDA extension built for
another torch), or fails on its first call, is broken: one warning naming it and the error, then the pure path for
the rest of the process. Every module that can use a kernel records the path it took in `backend`, so reports and
logs say what actually ran (`backends`, `backend_summary`, `log_backends_once`).

Inside `torch.compile`d code nothing is imported or tried for the first time: a kernel runs there only if it is
loaded already (`load_all`, which `models.compile.compile_model` calls) and is marked `under_compile`; otherwise
the pure path runs and the compiler fuses it with its neighbours (backend `compiled`).
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)

PURE = "torch"  # the backend name of every pure-PyTorch path
COMPILED = "compiled"  # the pure-PyTorch path inside torch.compile'd code (fused by the compiler)
T = TypeVar("T")


def eligible(tensors: tuple[torch.Tensor, ...], half_only: bool) -> bool:
    """Whether a CUDA kernel could take these tensors: all on CUDA, and fp16 / bf16 if the kernel needs it."""
    if not all(t.is_cuda for t in tensors):
        return False
    return not half_only or tensors[0].dtype in (torch.float16, torch.bfloat16)


def compiling() -> bool:
    """Whether this code is being traced by torch.compile (then it must not import, try, or branch on data)."""
    return torch.compiler.is_compiling()


def pure_backend() -> str:
    """The backend name of a pure-PyTorch path run now: `compiled` under torch.compile, else `torch`."""
    return COMPILED if compiling() else PURE


class OptionalKernel:
    """One optional package (`module` is the import path of the part we call), loaded once per process.

    `under_compile`: call it from torch.compile'd code too (when already loaded); False for kernels the compiler
    cannot trace or beats by fusing the pure path with what surrounds it.
    """

    def __init__(self, name: str, module: str, half_only: bool = False, under_compile: bool = True):
        self.name, self.module, self.half_only, self.under_compile = name, module, half_only, under_compile
        self._loaded: ModuleType | None = None
        self._state = "unloaded"  # → ready → proven (its first call worked); or missing / broken

    def load(self) -> ModuleType | None:
        """The imported package, or None when it is missing or broken (said once, when first found)."""
        if self._state == "unloaded":
            try:
                self._loaded = importlib.import_module(self.module)
                self._state = "ready"
            except ModuleNotFoundError as err:
                if err.name != self.module.split(".")[0]:  # installed, but something it needs is not
                    self._broken("import", err)
                else:
                    self._state = "missing"
                    log.info("optional kernel %s is not installed; its operators use the pure PyTorch path",
                             self.name)
            except Exception as err:  # noqa: BLE001  a broken CUDA extension raises more than ImportError
                self._broken("import", err)
        return self._loaded if self._state in ("ready", "proven") else None

    def run(self, kernel: Callable[[ModuleType], T], pure: Callable[[], T], *tensors: torch.Tensor
            ) -> tuple[T, str]:
        """`kernel(package)` when the tensors can use it and the package works, else `pure()`; and the backend
        that ran. A failure on the kernel's first call marks it broken and falls back; later failures raise."""
        if not eligible(tensors, self.half_only):
            return pure(), pure_backend()
        if compiling():
            if self.under_compile and self._state in ("ready", "proven"):
                return kernel(self._loaded), self.name
            return pure(), COMPILED
        package = self.load()
        if package is None:
            return pure(), PURE
        if self._state == "proven":
            return kernel(package), self.name
        try:
            out = kernel(package)
        except torch.cuda.OutOfMemoryError:
            raise  # a real limit of this run, not a broken install
        except Exception as err:  # noqa: BLE001
            self._broken("first call", err)
            return pure(), PURE
        self._state = "proven"
        return out, self.name

    def _broken(self, when: str, err: BaseException) -> None:
        self._state, self._loaded = "broken", None
        log.warning("optional kernel %s is installed but broken (%s failed: %s: %s); its operators use the pure "
                    "PyTorch path instead, which is slower. Reinstall it for this torch / CUDA, or uninstall it",
                    self.name, when, type(err).__name__, err)


FLASH_ATTN = OptionalKernel("flash_attn", "flash_attn", half_only=True)  # sliding-window attention
# PixArt's masked cross-attention; its block-diagonal mask needs the caption lengths on the host, which would cut
# a compiled graph, so compiled code uses SDPA with the boolean mask instead.
XFORMERS = OptionalKernel("xformers", "xformers.ops", half_only=True, under_compile=False)
MAMBA_SSM = OptionalKernel("mamba_ssm", "mamba_ssm.ops.triton.ssd_combined")  # Mamba-2's chunked scan
# Hyena and Mamba-2 short convolutions; compiled code fuses the pure path's multiply-adds with the gates instead.
CAUSAL_CONV1D = OptionalKernel("causal_conv1d", "causal_conv1d", under_compile=False)
KERNELS = (FLASH_ATTN, XFORMERS, MAMBA_SSM, CAUSAL_CONV1D)


def load_all() -> None:
    """Import every optional kernel now (missing / broken ones say so once), so compiled code can call them."""
    for kernel in KERNELS:
        kernel.load()


class UsesKernel:
    """Mixin of modules with an optional kernel: `backend` is what their last forward ran (None before one)."""

    backend: str | None = None


def backends(model: nn.Module) -> dict[str, str]:
    """Module path → backend, for every kernel-capable module of `model` that has run."""
    return {name: m.backend for name, m in model.named_modules() if isinstance(m, UsesKernel) and m.backend}


def backend_summary(model: nn.Module) -> str:
    """One line: per kind of module, how many ran on which backend, e.g. `CausalDepthwiseConv1d: torch ×14`."""
    counts = Counter((type(m).__name__, m.backend) for m in model.modules() if isinstance(m, UsesKernel) and m.backend)
    if not counts:
        return "no module with an optional kernel has run"
    return "; ".join(f"{kind}: {backend} ×{n}" for (kind, backend), n in sorted(counts.items()))


def log_backends_once(model: nn.Module, label: str) -> None:
    """After `model`'s first forward, log which backend its kernel-capable modules ran on (one line)."""

    def report(module: nn.Module, args, output) -> None:
        handle.remove()
        log.info("%s ran on: %s", label, backend_summary(module))

    handle = model.register_forward_hook(report)
