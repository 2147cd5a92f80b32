"""Range checks for every number of a recipe, and where each value came from, so that an error names the key and
the file or the `--set` that set it. Types are checked when the recipe is read (common.config.from_dict); this
module checks what a type cannot say (steps ≥ 1, 0 ≤ decay < 1, a finite lr > 0, …)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.runtime import DTYPES


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists and scalars are leaves, an empty mapping is a leaf too."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


@dataclass
class Sources:
    """Where each value of a recipe came from: the recipe file, one of its `base:` files, or a `--set`."""

    recipe: Path
    origins: dict[str, str] = field(default_factory=dict)  # dotted key → "FILE" or "--set 'KEY=VALUE'"

    def record(self, tree: Mapping[str, Any], origin: str, prefix: str = "") -> None:
        """Every key of `tree` (under `prefix`) now comes from `origin`; a replaced section forgets its old keys."""
        if prefix:
            for key in [k for k in self.origins if k == prefix or k.startswith(prefix + ".")]:
                del self.origins[key]
            if not isinstance(tree, Mapping) or not tree:
                self.origins[prefix] = origin
                return
        for key in flatten(tree, prefix + "." if prefix else ""):
            self.origins[key] = origin

    def of(self, key: str) -> str:
        """Who set `key` (or the section holding it); the recipe file for a default value."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found is not None:
                return found
        inside = sorted({v for k, v in self.origins.items() if k.startswith(key + ".")})
        if len(inside) == 1:
            return inside[0]
        return f"{self.recipe} (default value)"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {key}: {message}")


@dataclass(frozen=True)
class Rule:
    """Valid values of the keys matching `pattern` (fnmatch over dotted keys), and a value that breaks it (the
    error table in docs/errors.md shows what each rule says about it)."""

    pattern: str
    expected: str
    ok: Callable[[Any], bool]
    bad_example: Any


def _integer(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
            ) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return ok


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _each(check: Callable[[Any], bool], length: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and len(v) == length and all(check(x) for x in v)


COUNT, NON_NEGATIVE = _integer(1), _integer(0)
RULES: tuple[Rule, ...] = (
    Rule("seed", "an integer ≥ 0", NON_NEGATIVE, -1),
    Rule("keep_checkpoints", "an integer ≥ 1", COUNT, 0),
    Rule("model.init_seed", "an integer ≥ 0", NON_NEGATIVE, -1),
    Rule("data.caption_dropout", "a probability in [0, 1]", _number(0, 1), 1.5),
    Rule("data.synthetic_samples", "an integer ≥ 1", COUNT, 0),
    Rule("data.synthetic_val_samples", "an integer ≥ 1", COUNT, 0),
    Rule("data.reader.batch_size", "an integer ≥ 1", COUNT, 0),
    Rule("data.reader.caption_tokens", "an integer ≥ 1", COUNT, 0),
    Rule("data.reader.text_dim", "an integer ≥ 1, or null (any width)", _optional(COUNT), 0),
    Rule("data.reader.latent_channels", "an integer ≥ 1", COUNT, 0),
    Rule("data.reader.latent_size", "two integers ≥ 1 (h, w), or null (the model's size)",
         _optional(_each(COUNT, 2)), [0, 8]),
    Rule("data.reader.shuffle_buffer", "an integer ≥ 0", NON_NEGATIVE, -1),
    Rule("data.reader.num_workers", "an integer ≥ 0", NON_NEGATIVE, -1),
    Rule("data.reader.dtype", f"one of {sorted(DTYPES)}, or null (the stored bf16)",
         lambda v: v is None or v in DTYPES, "fp64"),
    Rule("stage1.steps", "an integer ≥ 1", COUNT, -5),
    Rule("stage2.steps", "an integer ≥ 0 (0: export the stage-1 graft as it is)", NON_NEGATIVE, -5),
    Rule("stage[12].log_every", "an integer ≥ 1", COUNT, 0),
    Rule("stage[12].checkpoint_every", "an integer ≥ 1", COUNT, 0),
    Rule("stage[12].optim.lr", "a finite number > 0", _number(0, low_open=True), -1e-4),
    Rule("stage[12].optim.weight_decay", "a finite number ≥ 0", _number(0), -0.1),
    Rule("stage[12].optim.betas", "two numbers in [0, 1)", _each(_number(0, 1, high_open=True), 2), [0.9, 1.0]),
    Rule("stage[12].optim.warmup_steps", "an integer ≥ 0", NON_NEGATIVE, -1),
    Rule("stage[12].optim.min_lr", "a finite number ≥ 0", _number(0), -1e-6),
    Rule("stage[12].optim.grad_clip", "a finite number ≥ 0 (0: no clipping)", _number(0), -1.0),
    Rule("stage[12].optim.gamma", "a number in (0, 1]", _number(0, 1, low_open=True), 2.0),
    Rule("stage[12].batch_size", "an integer ≥ 1, or null (data.reader.batch_size)", _optional(COUNT), 0),
    Rule("stage1.huber_delta", "a finite number > 0", _number(0, low_open=True), 0),
    Rule("stage1.eval_every", "an integer ≥ 1", COUNT, 0),
    Rule("stage1.eval_batches", "an integer ≥ 1", COUNT, 0),
    Rule("stage2.ema_decay", "a number in [0, 1), or null (no EMA)", _optional(_number(0, 1, high_open=True)), 1.5),
    Rule("stage2.lora.rank", "an integer ≥ 1", COUNT, 0),
    Rule("stage2.lora.alpha", "an integer ≥ 1", COUNT, 0),
    Rule("stage2.lora.dropout", "a probability in [0, 1)", _number(0, 1, high_open=True), 1.0),
    Rule("deepspeed.zero_stage", "one of 0, 1, 2, 3", _integer(0, 3), 5),
    Rule("deepspeed.gradient_accumulation", "an integer ≥ 1", COUNT, 0),
)


def rule_keys(rule: Rule, keys: list[str]) -> Iterator[str]:
    return (k for k in keys if fnmatchcase(k, rule.pattern))


def check_values(values: Mapping[str, Any], sources: Sources) -> None:
    """Every number of a recipe (as a plain dict) in its range; the first violation is an error naming the key,
    its value and who set it."""
    flat = flatten(values)
    for rule in RULES:
        keys = list(rule_keys(rule, list(flat)))
        if not keys:
            raise AssertionError(f"range rule {rule.pattern!r} matches no recipe key")  # the schema moved on
        for key in keys:
            if not rule.ok(flat[key]):
                raise sources.error(key, f"must be {rule.expected}, got {flat[key]!r}")
    for stage in ("stage1", "stage2"):
        lr, min_lr = flat[f"{stage}.optim.lr"], flat[f"{stage}.optim.min_lr"]
        if min_lr > lr:
            raise sources.error(f"{stage}.optim.min_lr", f"must not exceed {stage}.optim.lr ({lr}), got {min_lr}")
