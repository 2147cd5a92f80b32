"""LoRA adapters through peft, injected in place; the grafted operators are never adapted (they train in full)."""
from __future__ import annotations

import re

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from recipes.config import LoraSection


def attach_lora(model: nn.Module, settings: LoraSection, grafted_paths: list[str]) -> list[str]:
    """Add adapters to the modules matching `settings.target_modules`; freeze everything but the adapters and
    the grafted operators. Returns the names of the adapted modules."""
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules="|".join(f"(?:{pattern})" for pattern in settings.target_modules),
        exclude_modules="|".join(f"(?:{re.escape(p)}(?:\\..*)?)" for p in grafted_paths) or None)
    inject_adapter_in_model(config, model)
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not adapted:
        raise ValueError(f"LoRA target_modules {settings.target_modules} match no module of the model")
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or any(name.startswith(p + ".") for p in grafted_paths)
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (an export has no peft modules)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
