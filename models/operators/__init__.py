"""Operator library: `build(name, **config)` takes the paper's operator YAML keys unchanged.

Token mixers (they replace self-attention, graft type `mha`) are called as `op(x, hw)` with x (B, N, D) and hw the
(h, w) token grid; channel mixers (graft type `mlp`) as `op(x)`. Both return (B, N, D). Every operator also says
what one forward costs: `op.forward_flops(tokens)`, per sample, from its own settings.

The paper's settings of each operator live once, as YAML files in `recipes/operators/` (`settings_file`), which
recipes and benchmarks reference; the model fills in the width (and a length-tied operator's `l_max`).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

#: The paper's operator settings: `<name>.yaml`, named after the operator, with a suffix for variants
#: (`mlp_ratio_3.yaml` is operator `mlp` with expansion ratio 3).
SETTINGS_DIR = Path(__file__).resolve().parents[2] / "recipes" / "operators"


@dataclass(frozen=True)
class OperatorInfo:
    """What the factory knows about an operator: what it replaces, its class, and its width / length keys."""

    name: str
    replaces: str  # "mha" (token mixer) or "mlp" (channel mixer)
    target: str  # "module:attribute"
    width_key: str
    length_key: str | None = None  # sequence-length argument, if the operator is tied to one

    def factory(self):
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


OPERATORS: dict[str, OperatorInfo] = {
    info.name: info
    for info in [
        OperatorInfo("mha", "mha", "models.operators.attention:MultiHeadAttention", "dim"),
        OperatorInfo("swa", "mha", "models.operators.attention:SlidingWindowAttention", "embed_dim"),
        OperatorInfo("hyena_se", "mha", "models.operators.hyena:HyenaSE", "d_model", "l_max"),
        OperatorInfo("hyena_x", "mha", "models.operators.hyena:HyenaX", "d_model", "l_max"),
        OperatorInfo("hyena_y", "mha", "models.operators.hyena:HyenaY", "d_model", "l_max"),
        OperatorInfo("mamba2", "mha", "models.operators.mamba2:Mamba2", "d_model"),
        OperatorInfo("mlp", "mlp", "models.operators.mlp:build_mlp", "d_model"),
        OperatorInfo("mlp_hyena_x", "mlp", "models.operators.mlp:MlpHyenaX", "d_model", "l_max"),
    ]
}


def operator_info(name: str) -> OperatorInfo:
    """Look an operator up by its YAML name; unknown names list the known ones."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ValueError(f"unknown operator {name!r}; known operators: {sorted(OPERATORS)}") from None


def check_config(name: str, config: dict, partial: bool = False) -> None:
    """Unknown keys (and, unless `partial`, missing required ones) are an error that names them."""
    params = inspect.signature(operator_info(name).factory()).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise ValueError(f"operator {name!r}: unknown config keys {unknown}; accepted: {sorted(params)}")
    missing = [key for key, p in params.items() if p.default is inspect.Parameter.empty and key not in config]
    if missing and not partial:
        raise ValueError(f"operator {name!r}: missing required config keys {missing}")


def build(name: str, **config) -> nn.Module:
    """Build operator `name` from its YAML config (the paper's keys, unchanged)."""
    check_config(name, config)
    return operator_info(name).factory()(**config)


#: l_max of a token mixer whose config leaves it out: only a bound on the sequence length (the paper's value).
UNBOUNDED_LENGTH = 1_000_000


def with_length(name: str, config: dict, tokens: int) -> dict:
    """`config` with `l_max` filled in where the operator has one and the config leaves it out: the token count
    for a channel mixer (its conv channels are the tokens), `UNBOUNDED_LENGTH` for a token mixer."""
    info = operator_info(name)
    if not info.length_key or info.length_key in config:
        return dict(config)
    return {**config, info.length_key: tokens if info.replaces == "mlp" else UNBOUNDED_LENGTH}


def settings_names() -> list[str]:
    """Every operator settings file, by name (`hyena_x`, `mlp_ratio_3`, …)."""
    return sorted(p.stem for p in SETTINGS_DIR.glob("*.yaml"))


def settings_file(name: str) -> Path:
    """The YAML of operator settings `name` (an error lists the known ones)."""
    path = SETTINGS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no operator settings {name!r} in {SETTINGS_DIR}; known: {settings_names()}")
    return path


def settings_operator(name: str) -> str:
    """The operator a settings file configures: the longest operator name that the file name starts with."""
    matches = [op for op in OPERATORS if name == op or name.startswith(op + "_")]
    if not matches:
        raise ValueError(f"operator settings {name!r} are not named after an operator; known: {sorted(OPERATORS)}")
    return max(matches, key=len)


def load_settings(name: str) -> dict:
    """The settings in `settings_file(name)`, as a config for `build` (width and l_max still to fill)."""
    config = yaml.safe_load(settings_file(name).read_text()) or {}
    check_config(settings_operator(name), config, partial=True)
    return config
