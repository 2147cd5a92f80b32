"""Graft surgery: which operator replaces what, in which blocks, applied in place to PixArt-Sigma or DiT.

A graft spec is YAML. Ours (what export folders carry, written with every value resolved):

    grafts:
      - type: mha                 # mha = self-attention (never PixArt's cross-attention); mlp = the MLP
        name: hyena_x             # an operator of models.operators
        config_filepath: ../operators/hyena_x.yaml    # relative to the file that says it; and / or an inline
        config: {short_filter_order: 3}               #   `config`, whose keys override the file's
        layers: {ratio: 0.5, pattern: interleaved}    # or {indexes: [1, 3, 5]}, {every: 4, offset: 3},
                                                      # {ratio: 0.25, pattern: first|last}
      - type: blocks              # restructure whole blocks (models.parallel_blocks), not one operator
        name: parallel_pair       # consecutive blocks (a, a + 1) → one parallel block; no config
        layers: {indexes: [0, 1, 2, 3]}               # the blocks to pair, in order: (0, 1), (2, 3)

A block may be touched by operator grafts (its attention and its MLP by different ones) or by a parallel pair, not
both: the pair's stage-1 student starts from the teacher's two blocks, so an operator swapped inside it would have
no teacher to start from.

The paper's sampling YAMLs (`operator: {type, name, config_filepath}` + `sample_config: {graft_indexes, ...}`)
are read unchanged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from common.config import ConfigError, from_dict, read_yaml
from common.files import save_text
from models.operators import build, check_config, load_settings, operator_info, settings_operator, with_length
from models.weights import load_strict, read_state_dict

TARGETS = {"mha": "attn", "mlp": "mlp"}  # graft type → block attribute it replaces
BLOCKS = "blocks"  # graft type that restructures whole blocks
BLOCK_GRAFTS = ("parallel_pair",)  # its names
GRAFT_TYPES = (*TARGETS, BLOCKS)
PATTERNS = ("interleaved", "first", "last")


@dataclass
class LayerSelection:
    """Blocks to graft: explicit `indexes`, `every` k-th block from `offset`, or a `ratio` with a `pattern`.

    `interleaved` spreads the chosen blocks evenly and ends at the last block: 50% of 28 is the paper's odd
    blocks 1, 3, …, 27; 75% is every block but 0, 4, 8, ….
    """

    indexes: list[int] | None = None
    ratio: float | None = None
    pattern: str = "interleaved"
    every: int | None = None
    offset: int = 0

    def resolve(self, depth: int, where: str = "layers") -> list[int]:
        chosen = [self.indexes is not None, self.ratio is not None, self.every is not None]
        if sum(chosen) != 1:
            raise ConfigError(f"{where}: give exactly one of indexes, ratio or every")
        if self.indexes is not None:
            bad = [i for i in self.indexes if not 0 <= i < depth]
            if bad:
                raise ConfigError(f"{where}: block indexes {bad} are outside 0..{depth - 1} (model depth {depth})")
            if len(set(self.indexes)) != len(self.indexes):
                raise ConfigError(f"{where}: repeated block indexes in {self.indexes}")
            return sorted(self.indexes)
        if self.every is not None:
            if self.every < 1 or not 0 <= self.offset < self.every:
                raise ConfigError(f"{where}: need every >= 1 and 0 <= offset < every")
            return list(range(self.offset, depth, self.every))
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"{where}: ratio must be in (0, 1], got {self.ratio}")
        if self.pattern not in PATTERNS:
            raise ConfigError(f"{where}: unknown pattern {self.pattern!r}; choose one of {PATTERNS}")
        n = round(self.ratio * depth)
        if self.pattern == "first":
            return list(range(n))
        if self.pattern == "last":
            return list(range(depth - n, depth))
        return [i for i in range(depth) if math.floor((i + 1) * n / depth) > math.floor(i * n / depth)]


@dataclass
class Graft:
    """One operator swap: replace `type` (mha / mlp) in the selected blocks by operator `name` with `config`."""

    type: str
    name: str
    config: dict[str, Any]
    layers: LayerSelection
    weights: dict[int, str] = field(default_factory=dict)  # optional per-block operator checkpoints (paper layout)

    def validate(self, where: str) -> None:
        if self.type not in GRAFT_TYPES:
            raise ConfigError(f"{where}: type must be one of {sorted(GRAFT_TYPES)}, got {self.type!r}")
        if self.type == BLOCKS:
            if self.name not in BLOCK_GRAFTS:
                raise ConfigError(f"{where}: type blocks takes name one of {list(BLOCK_GRAFTS)}, got {self.name!r}")
            if self.config or self.weights:
                raise ConfigError(f"{where}: {self.name} takes no config and no per-block weights (its branches are "
                                  "the model's own blocks)")
            return
        try:
            info = operator_info(self.name)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if info.replaces != self.type:
            raise ConfigError(f"{where}: operator {self.name!r} replaces {info.replaces!r}, not {self.type!r}")


@dataclass
class GraftSpec:
    """A list of grafts; resolved against a model's depth and width when applied."""

    grafts: list[Graft]

    # ---- reading / writing -----------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> GraftSpec:
        """Our spec format or a paper sampling YAML; operator `config_filepath`s are resolved near the file."""
        path = Path(path)
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a YAML mapping")
        return cls.from_dict(data, where=str(path), base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "graft spec", base: Path | None = None) -> GraftSpec:
        if "operator" in data:  # the paper's sampling YAML
            data = _from_paper_yaml(data, where)
        unknown = sorted(set(data) - {"grafts"})
        if unknown or not isinstance(data.get("grafts"), list) or not data["grafts"]:
            raise ConfigError(f"{where}: expected a non-empty 'grafts' list" +
                              (f"; unknown keys {unknown}" if unknown else ""))
        grafts = [_graft_from_dict(entry, f"{where}: grafts[{i}]", base) for i, entry in enumerate(data["grafts"])]
        return cls(grafts)

    @classmethod
    def from_settings(cls, settings: str, layers: dict[str, Any]) -> GraftSpec:
        """One graft: the operator of settings file `settings` (`recipes/operators/`), in the blocks `layers`
        selects, replacing what that operator replaces."""
        name = settings_operator(settings)
        return cls.from_dict({"grafts": [{"type": operator_info(name).replaces, "name": name,
                                          "config": load_settings(settings), "layers": layers}]})

    def to_dict(self) -> dict[str, Any]:
        return {"grafts": [{"type": g.type, "name": g.name, "config": dict(g.config),
                            "layers": _layers_dict(g.layers),
                            **({"weights": {int(k): str(v) for k, v in g.weights.items()}} if g.weights else {})}
                           for g in self.grafts]}

    def save_yaml(self, path: str | Path) -> None:
        save_text(yaml.safe_dump(self.to_dict(), sort_keys=False), path)

    # ---- resolving against a model ---------------------------------------------------------------------------
    def resolved(self, model: nn.Module) -> GraftSpec:
        """A copy with explicit block indexes and the operators' width / length filled from the model."""
        depth, width = model.config.depth, model.config.hidden_size  # the architecture's depth, pairs or not
        taken: dict[tuple[str, int], int] = {}
        grafts = []
        for n, graft in enumerate(self.grafts):
            where = f"grafts[{n}]"
            graft.validate(where)
            indexes = graft.layers.resolve(depth, f"{where}.layers")
            for i in indexes:
                if (graft.type, i) in taken:
                    raise ConfigError(f"{where}: block {i} {graft.type} is already grafted by "
                                      f"grafts[{taken[graft.type, i]}]" if graft.type != BLOCKS else
                                      f"{where}: block {i} is already in a parallel pair of "
                                      f"grafts[{taken[graft.type, i]}]")
                taken[graft.type, i] = n
            if graft.type == BLOCKS:
                check_pairs(indexes, depth, f"{where}.layers")
                grafts.append(Graft(graft.type, graft.name, {}, LayerSelection(indexes=indexes)))
                continue
            info = operator_info(graft.name)
            config = dict(graft.config)
            if config.setdefault(info.width_key, width) != width:
                raise ConfigError(f"{where}: operator {graft.name!r} has {info.width_key}={config[info.width_key]} "
                                  f"but the model's hidden size is {width}")
            config = with_length(graft.name, config, model.config.num_tokens)
            bad_weights = sorted(set(graft.weights) - set(indexes))
            if bad_weights:
                raise ConfigError(f"{where}: weights given for blocks {bad_weights} that are not grafted")
            grafts.append(Graft(graft.type, graft.name, config, LayerSelection(indexes=indexes), dict(graft.weights)))
        paired = {i: n for (kind, i), n in taken.items() if kind == BLOCKS}
        for (kind, i), n in taken.items():
            if kind != BLOCKS and i in paired:
                raise ConfigError(f"grafts[{n}]: block {i} is in a parallel pair of grafts[{paired[i]}]; operator "
                                  "grafts and parallel pairs must touch different blocks (a pair starts from the "
                                  "teacher's own two blocks)")
        return GraftSpec(grafts)

    def with_width(self, width: int) -> GraftSpec:
        """A copy whose operators take `width` (for running a full-size spec on a smaller architecture)."""
        spec = copy.deepcopy(self)
        for graft in spec.grafts:
            if graft.type != BLOCKS:
                graft.config[operator_info(graft.name).width_key] = width
        return spec

    def targets(self, model: nn.Module) -> dict[str, Graft]:
        """Module path of every replaced operator (e.g. `blocks.3.attn`) or parallel pair (`blocks.2`, blocks 2 and
        3) → the graft that replaces it."""
        return target_paths(self.resolved(model))

    def build_operators(self, model: nn.Module) -> dict[str, nn.Module]:
        """Fresh replacement operators for every target, on the model's device and dtype (students for stage 1);
        a parallel pair starts from copies of the model's two blocks."""
        param = next(model.parameters())
        operators = {}
        for path, graft in self.targets(model).items():
            block = int(path.split(".")[1])
            if graft.type == BLOCKS:
                from models.parallel_blocks import pair_from_blocks  # imports the model families, which import us

                pair = pair_from_blocks(model.blocks[block], model.blocks[block + 1])
                operators[path] = pair.to(device=param.device, dtype=param.dtype)
                continue
            operator = build(graft.name, **graft.config)
            if block in graft.weights:
                load_strict(operator, read_state_dict(graft.weights[block], key="model"), graft.weights[block])
            operators[path] = operator.to(device=param.device, dtype=param.dtype)
        return operators

    def apply(self, model: nn.Module, operators: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
        """Swap the operators into `model` in place (fresh ones unless given); returns the replaced originals."""
        spec = self.resolved(model)
        operators = operators if operators is not None else spec.build_operators(model)
        expected = set(spec.targets(model))
        if set(operators) != expected:
            raise ConfigError(f"operators given for {sorted(set(operators) ^ expected)} do not match the spec")
        replaced = {}
        pairs = {}
        for path, operator in operators.items():
            _, index, *attr = path.split(".")
            if not attr:
                pairs[path] = operator
                continue
            block = model.blocks[int(index)]
            replaced[path] = getattr(block, attr[0])
            setattr(block, attr[0], operator)
        if pairs:
            from models.parallel_blocks import BlockStack

            blocks = model.blocks if isinstance(model.blocks, BlockStack) else BlockStack.from_blocks(model.blocks)
            for path, pair in pairs.items():
                replaced[path] = blocks.merge_pair(int(path.split(".")[1]), pair)
            model.blocks = blocks
        model.graft = spec
        return replaced


def target_paths(spec: GraftSpec) -> dict[str, Graft]:
    """Module paths of a resolved spec's targets: `blocks.{i}.{attn|mlp}` per operator, `blocks.{a}` per pair."""
    paths = {}
    for g in spec.grafts:
        if g.type == BLOCKS:
            paths.update({f"blocks.{a}": g for a in g.layers.indexes[0::2]})
        else:
            paths.update({f"blocks.{i}.{TARGETS[g.type]}": g for i in g.layers.indexes})
    return paths


def check_pairs(indexes: list[int], depth: int, where: str) -> None:
    """Sorted block indexes that split, in order, into pairs of consecutive blocks (a, a + 1)."""
    if len(indexes) % 2:
        hint = (f" (the model's depth {depth} is odd: list the blocks to pair with indexes)"
                if len(indexes) == depth else "")
        raise ConfigError(f"{where}: {len(indexes)} blocks selected; parallel pairs need an even number{hint}")
    for a, b in zip(indexes[0::2], indexes[1::2]):
        if b != a + 1:
            raise ConfigError(f"{where}: blocks {a} and {b} would be paired but are not consecutive; the selected "
                              f"blocks {indexes} are paired in order, each pair (a, a + 1)")


def _graft_from_dict(entry: Any, where: str, base: Path | None) -> Graft:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping")
    known = {"type", "name", "config", "config_filepath", "layers", "weights"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [k for k in ("type", "name", "layers") if k not in entry]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")
    structural = entry["type"] == BLOCKS and "config" not in entry and "config_filepath" not in entry
    config = {} if structural else operator_config(entry, base, where)
    layers = entry["layers"]
    if not isinstance(layers, dict):
        raise ConfigError(f"{where}.layers: expected a mapping")
    unknown = sorted(set(layers) - {"indexes", "ratio", "pattern", "every", "offset"})
    if unknown:
        raise ConfigError(f"{where}.layers: unknown keys {unknown}")
    weights = entry.get("weights") or {}
    if not isinstance(weights, dict) or not all(isinstance(k, int) or str(k).isdigit() for k in weights):
        raise ConfigError(f"{where}.weights: expected a mapping of block index → checkpoint path, got {weights!r}")
    graft = Graft(entry["type"], entry["name"], dict(config), from_dict(LayerSelection, layers, f"{where}.layers"),
                  {int(k): str(v) for k, v in weights.items()})
    graft.validate(where)
    if graft.type == BLOCKS:
        return graft
    try:
        check_config(graft.name, graft.config, partial=True)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return graft


def operator_config(entry: dict[str, Any], base: Path | None, where: str) -> dict[str, Any]:
    """A graft entry's operator config: the `config_filepath` file's keys (the path relative to `base`, the folder
    of the file that names it), overridden by an inline `config`; at least one of the two."""
    file = entry.get("config_filepath")
    if file is None and "config" not in entry:
        raise ConfigError(f"{where}: give config, config_filepath, or both (config overrides the file)")
    config = {}
    if file is not None:
        if not isinstance(file, str):
            raise ConfigError(f"{where}: config_filepath must be a path, got {file!r}")
        path = find_config_file(file, base)
        config = read_yaml(path) or {}
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: an operator config must be a YAML mapping")
    inline = entry.get("config") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{where}: operator config must be a mapping")
    return {**config, **inline}


def inline_config_files(graft: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    """A graft spec (our format) with every `config_filepath`, resolved from `base`, replaced by its keys: a spec
    that no longer depends on where it is read from (recipes are resolved like this when loaded)."""
    grafts = graft.get("grafts") if isinstance(graft, dict) else None
    if not isinstance(grafts, list):
        return graft
    entries = []
    for i, entry in enumerate(grafts):
        if isinstance(entry, dict) and "config_filepath" in entry:
            config = operator_config(entry, base, f"{where}: grafts[{i}]")
            entry = {k: v for k, v in entry.items() if k != "config_filepath"} | {"config": config}
        entries.append(entry)
    return {**graft, "grafts": entries}


def _from_paper_yaml(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The paper's `operator` + `sample_config.graft_indexes` / `graft_weights` → our `grafts` list."""
    operator = data["operator"]
    sample = data.get("sample_config") or {}
    indexes = sample.get("graft_indexes")
    if not indexes:
        raise ConfigError(f"{where}: sample_config.graft_indexes is empty")
    return {"grafts": [{"type": operator.get("type"), "name": operator.get("name"),
                        "config_filepath": operator.get("config_filepath"), "layers": {"indexes": list(indexes)},
                        "weights": sample.get("graft_weights") or {}}]}


def find_config_file(name: str, base: Path | None) -> Path:
    """An operator YAML path as written in a spec: relative to the spec's folder `base`, else under one of its
    parents (the paper's files say `configs/sequence_mixers/x.yaml` relative to its repository root), else as
    given (absolute, or relative to the working directory)."""
    candidate = Path(name)
    if base is not None and not candidate.is_absolute():
        parts = candidate.parts
        for folder in [base, *base.parents]:
            for tail in (parts, parts[1:]):
                if tail and (folder.joinpath(*tail)).is_file():
                    return folder.joinpath(*tail)
    if candidate.is_file():
        return candidate
    raise ConfigError(f"operator config file {name!r} not found (looked under {base} and its parents, and as given)")


def _layers_dict(layers: LayerSelection) -> dict[str, Any]:
    if layers.indexes is not None:
        return {"indexes": list(layers.indexes)}
    if layers.every is not None:
        return {"every": layers.every, "offset": layers.offset}
    return {"ratio": layers.ratio, "pattern": layers.pattern}

