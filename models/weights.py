"""Reading, checking, converting and atomically writing state dicts. Untrusted files are never unpickled."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from common.files import atomic_write

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists the offending tensors."""


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> StateDict:
    """Tensors from a `.safetensors` file or a torch pickle loaded with `weights_only=True`.

    `key` selects a nested state dict (e.g. `state_dict`, `state_dict_ema`, `ema`); without it a raw state dict
    is expected, or one of the usual wrappers is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return _unwrap(load_torch(path, allowed=[argparse.Namespace]), key, path)


def load_torch(path: str | os.PathLike, allowed: Iterable[type] = (), map_location: Any = "cpu") -> Any:
    """A torch file read with `weights_only=True`: tensors, containers, plain values and the `allowed` record
    types. Anything else (a crafted pickle, a file of arbitrary objects) is refused before any of it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise CheckpointError(f"{path}: refused: it holds Python objects beyond tensors ({detail}). Nothing in it "
                              "was unpickled; only tensors and plain values are read. Re-save its tensors (a state "
                              "dict) with torch.save or as safetensors.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable torch file ({type(err).__name__}: {err}); it may be "
                              "truncated or not a checkpoint") from None


def read_safetensors(path: str | os.PathLike) -> StateDict:
    """A safetensors file's tensors; a truncated or corrupt file is an error that names it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _unreadable_safetensors(path, err) from None


def check_safetensors(path: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file, from its header only (cheap, whatever the file's size); a truncated
    or corrupt file is an error that names it."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise _unreadable_safetensors(path, err) from None


def _unreadable_safetensors(path: str | os.PathLike, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({err}); it may be truncated (an interrupted "
                           "copy or download): copy it again")


def _unwrap(obj, key: str | None, path: Path) -> StateDict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{path}: no {key!r} entry; top-level keys: {sorted(obj)[:20]}")
        obj = obj[key]
    else:
        for wrapper in ("state_dict", "ema", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(obj)[:20]})")
    return tensors


def read_diffusers_weights(folder: Path) -> StateDict:
    """The transformer weights of a diffusers model folder: single or sharded safetensors, or a legacy `.bin`."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    legacy = folder / "diffusion_pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: StateDict = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    if legacy.is_file():
        return read_state_dict(legacy)
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors (single, sharded) or .bin")


def check_state_dict(expected: dict[str, torch.Size], given: StateDict, source: str) -> None:
    """Raise one error naming every missing, unexpected and wrong-shape tensor."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"{source} does not match the model"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = "\n    ".join(items[:25]) + (f"\n    ... {len(items) - 25} more" if len(items) > 25 else "")
                parts.append(f"  {name} ({len(items)}):\n    {shown}")
        raise CheckpointError("\n".join(parts))


def load_strict(module: nn.Module, state: StateDict, source: str, assign: bool = False) -> None:
    """Load `state` into `module` after checking names and shapes (errors name the tensors)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state, source)
    module.load_state_dict(state, strict=True, assign=assign)


@dataclass(frozen=True)
class KeyRule:
    """One original tensor ↔ one or more diffusers tensors: `split` along dim 0, or `replicate` identical copies."""

    original: str
    diffusers: tuple[str, ...]
    mode: str = "split"


class KeyMap:
    """A bidirectional, exhaustive name map between an original-layout and a diffusers-layout state dict."""

    def __init__(self, rules: Iterable[KeyRule], ignored_original: Iterable[str] = (),
                 ignored_diffusers: Iterable[str] = ()):
        self.rules = list(rules)
        self.ignored_original = set(ignored_original)
        self.ignored_diffusers = set(ignored_diffusers)

    def to_diffusers(self, state: StateDict, source: str = "state dict") -> StateDict:
        self._check_complete(state, {r.original for r in self.rules}, self.ignored_original, source)
        out: StateDict = {}
        for rule in self.rules:
            tensor = state[rule.original]
            if rule.mode == "split":
                parts = tensor.chunk(len(rule.diffusers), dim=0) if len(rule.diffusers) > 1 else (tensor,)
            else:
                parts = (tensor,) * len(rule.diffusers)
            out.update({name: part.clone() for name, part in zip(rule.diffusers, parts)})
        return out

    def to_original(self, state: StateDict, source: str = "state dict") -> StateDict:
        names = {n for r in self.rules for n in r.diffusers}
        self._check_complete(state, names, self.ignored_diffusers, source)
        out: StateDict = {}
        for rule in self.rules:
            parts = [state[n] for n in rule.diffusers]
            if rule.mode == "split":
                out[rule.original] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            else:
                differing = [n for n, p in zip(rule.diffusers, parts) if not torch.equal(p, parts[0])]
                if differing:
                    raise CheckpointError(f"{source}: copies of {rule.original} differ ({differing[:3]}...); "
                                          "this model shares one embedder across blocks")
                out[rule.original] = parts[0]
        return out

    @staticmethod
    def _check_complete(state: StateDict, names: set[str], ignored: set[str], source: str) -> None:
        missing = sorted(names - set(state))
        unexpected = sorted(set(state) - names - ignored)
        if missing or unexpected:
            raise CheckpointError(f"{source}: cannot convert; missing {missing[:25]} ({len(missing)}), "
                                  f"unexpected {unexpected[:25]} ({len(unexpected)})")


def save_safetensors(state: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write contiguous tensors as safetensors."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch(obj, path: str | os.PathLike) -> None:
    """Atomically `torch.save` a tensors-only object (readable with `weights_only=True`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
