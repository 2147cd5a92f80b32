"""Numeric precision of a training run: the dtype of the weights, of the optimizer's master weights, of compute.

- `bf16-mixed` (`auto` on a GPU): fp32 parameters and master weights, bf16 compute under `torch.autocast`, as the
  official grafting code (accelerate) and PixArt-Sigma's training code run. The residual stream, the norms and
  small state such as Mamba-2's `A_log` / `dt_bias` / `D` stay in fp32; matmuls and convolutions run in bf16.
- `bf16`: the module itself in bf16 (DeepSpeed's bf16 mode keeps fp32 master weights in the optimizer).
- `fp32` (`auto` on the CPU): everything in fp32, what the exact-resume tests run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

PrecisionSetting = Literal["auto", "bf16-mixed", "bf16", "fp32"]


@dataclass(frozen=True)
class Precision:
    mode: Literal["bf16-mixed", "bf16", "fp32"]

    @classmethod
    def resolve(cls, setting: str) -> Precision:
        """A recipe's setting; `auto` is bf16-mixed on CUDA and fp32 on the CPU."""
        if setting == "auto":
            return cls("bf16-mixed" if torch.cuda.is_available() else "fp32")
        if setting not in ("bf16-mixed", "bf16", "fp32"):
            raise ValueError(f"unknown precision {setting!r}; choose auto, bf16-mixed, bf16 or fp32")
        return cls(setting)  # type: ignore[arg-type]

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the module's parameters, and of the floating inputs it is given."""
        return torch.bfloat16 if self.mode == "bf16" else torch.float32

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Where a forward pass runs: bf16 autocast for `bf16-mixed`, as is otherwise."""
        if self.mode == "bf16-mixed":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def deepspeed(self) -> dict[str, Any]:
        """The DeepSpeed config entries: DeepSpeed's own torch autocast for `bf16-mixed`, its bf16 mode for `bf16`.

        Autocast lists no lower-precision-safe module, so gradients are reduced and ZeRO-3 gathers parameters in
        fp32, like the official code's DDP; list modules under `deepspeed.overrides.torch_autocast` to
        communicate them in bf16 instead."""
        return {"bf16": {"enabled": self.mode == "bf16"},
                "torch_autocast": {"enabled": self.mode == "bf16-mixed", "dtype": "bfloat16",
                                   "lower_precision_safe_modules": []}}
