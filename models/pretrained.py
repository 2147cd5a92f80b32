"""Loading and saving for our transformers in the formats users have: diffusers folders, original `.pth`/`.pt`
files, and our own export folders (config + safetensors + optional graft spec)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from common.config import ConfigError, from_dict, to_dict
from common.files import file_sha256, read_json_object, save_json
from common.hub import local_path
from models.graft import GraftSpec
from models.weights import (
    KeyMap,
    StateDict,
    load_strict,
    read_diffusers_weights,
    read_state_dict,
    save_safetensors,
    save_torch,
)

NATIVE_WEIGHTS = "model.safetensors"
GRAFT_FILE = "graft.yaml"


def component_folder(root: Path, name: str) -> Path:
    """A diffusers pipeline keeps each component in a subfolder; a bare component folder is used as is."""
    return root / name if (root / name).is_dir() else root


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json (diffusers or ours), with errors that name the file."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers or export folder)")
    return read_json_object(folder / "config.json")


#: with the weights, these files decide what a model folder computes (tokenizer vocabularies included)
DEFINING_SUFFIXES = {".safetensors", ".bin", ".pth", ".pt", ".json", ".yaml", ".model", ".txt"}


def model_sha256(path: str | Path, *components: str) -> str:
    """Content hash of a model: a checkpoint file itself, or the weight, config, graft and vocabulary files of a
    pipeline's `components` (each its subfolder of `path`, or `path` itself for a bare component folder).
    Recorded next to generated data so a restart with other weights is refused. `path` may be a cached Hub id."""
    path = local_path(path, "model")
    if path.is_file():
        return file_sha256(path)
    files = {p for name in components or ("",) for p in component_folder(path, name).iterdir()
             if p.is_file() and p.suffix in DEFINING_SUFFIXES}
    if not files:
        raise FileNotFoundError(f"{path}: no weight or config files of {' / '.join(components)} to hash")
    return file_sha256(*sorted(files))


def is_grafted(path: str | Path) -> bool:
    """Whether a model folder (or a pipeline folder's transformer/) holds a grafted model: our export folders carry
    graft.yaml, folders diffusers saved through models.diffusers_transformers a `graft` in config.json."""
    path = local_path(path, "model")
    if not path.is_dir():
        return False
    folder = component_folder(path, "transformer")
    return (folder / GRAFT_FILE).is_file() or bool((folder / "config.json").is_file() and
                                                   read_config(folder).get("graft"))


class PretrainedModel(nn.Module):
    """Base for PixArt-Sigma and DiT: format detection, strict loading, and saving in every format."""

    config_class: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]]
    diffusers_class_names: ClassVar[tuple[str, ...]]
    #: `_class_name` of folders saved through our diffusers wrapper (models.diffusers_transformers)
    dropin_class_name: ClassVar[str]
    #: original-format tensors the model recomputes (checked by `check_original_extras`, then dropped)
    original_extras: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.graft = None  # a GraftSpec once operators have been swapped (models.graft)

    # ---- hooks for subclasses ------------------------------------------------------------------------------
    @classmethod
    def key_map(cls, config) -> KeyMap:
        raise NotImplementedError

    @classmethod
    def config_from_diffusers(cls, diffusers_config: dict[str, Any], **overrides):
        raise NotImplementedError

    @classmethod
    def diffusers_config(cls, config) -> dict[str, Any]:
        raise NotImplementedError

    def check_original_extras(self, extras: StateDict, source: str) -> None:
        """Validate recomputed tensors found in an original checkpoint (default: nothing to check)."""

    def original_extra_tensors(self) -> StateDict:
        """Recomputed tensors the original code expects in its checkpoints (default: none)."""
        return {}

    # ---- configs ---------------------------------------------------------------------------------------------
    @classmethod
    def make_config(cls, preset: str | None = None, **overrides):
        """Config from a preset name (see `presets`) and explicit overrides; unknown keys are errors."""
        base: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                raise ConfigError(f"unknown {cls.__name__} preset {preset!r}; presets: {sorted(cls.presets)}")
            base = dict(cls.presets[preset])
        return from_dict(cls.config_class, {**base, **overrides}, where=f"{cls.__name__} config")

    @classmethod
    def preset_from_filename(cls, path: Path) -> str | None:
        """The preset whose name the file name contains (longest match), e.g. `PixArt-Sigma-XL-2-2K-MS.pth`."""
        stem = path.name.lower()
        hits = [name for name in cls.presets if name.lower() in stem]
        return max(hits, key=len) if hits else None

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, preset: str | None = None, ema: bool = False,
                        dtype: torch.dtype | None = None, graft: GraftSpec | str | Path | None = None,
                        **config_overrides):
        """Load a diffusers folder, an original checkpoint file, or one of our export folders; any of them may also
        be given as a Hub repo id already in the local Hugging Face cache (`org/name[/file]`, see common.hub).

        For original files the architecture comes from `preset` (or the file name) plus `config_overrides`;
        `ema=True` picks the EMA weights (`state_dict_ema` / `ema`). `graft` (a GraftSpec or its YAML path) says
        the checkpoint holds a grafted model, e.g. a released grafted DiT `model.pt`; export folders carry their
        own `graft.yaml`. Mismatched tensors raise `CheckpointError`.
        """
        path = local_path(path, f"{cls.__name__} checkpoint")
        if graft is not None and not isinstance(graft, GraftSpec):
            graft = GraftSpec.from_yaml(graft)
        config, layout = cls.config_from_path(path, preset, **config_overrides)
        if layout == "original":
            key = ("state_dict_ema" if path.suffix == ".pth" else "ema") if ema else None
            return cls._instantiate(config, read_state_dict(path, key=key), str(path), dtype, original=True,
                                    graft=graft)
        folder = component_folder(path, "transformer")
        if layout == "diffusers":
            state = cls.key_map(config).to_original(read_diffusers_weights(folder), source=str(folder))
            return cls._instantiate(config, state, str(folder), dtype)
        if layout == "native":
            saved = GraftSpec.from_yaml(folder / GRAFT_FILE) if (folder / GRAFT_FILE).is_file() else None
            state = read_state_dict(folder / NATIVE_WEIGHTS)
        else:  # models.diffusers_transformers: same tensors, diffusers file names
            raw = read_config(folder)
            saved = (GraftSpec.from_dict(raw["graft"], where=f"{folder / 'config.json'}: graft") if raw.get("graft")
                     else None)
            state = read_diffusers_weights(folder)
        return cls._instantiate(config, state, str(folder), dtype, graft=graft or saved)

    @classmethod
    def config_from_path(cls, path: str | Path, preset: str | None = None, **config_overrides) -> tuple[Any, str]:
        """The architecture of the checkpoint at `path`, read without its weights, and its layout: `native` (our
        export folder), `dropin` (a folder diffusers saved from our wrapper), `diffusers` (a diffusers model folder)
        or `original` (a checkpoint file; the architecture from `preset`, or the file name, plus
        `config_overrides`)."""
        path = local_path(path, f"{cls.__name__} checkpoint")
        if not path.is_dir():
            preset = preset or cls.preset_from_filename(path)
            if preset is None and not config_overrides:
                raise ConfigError(f"{path}: original checkpoints carry no architecture; pass preset= one of "
                                  f"{sorted(cls.presets)} or explicit config keys")
            return cls.make_config(preset, **config_overrides), "original"
        folder = component_folder(path, "transformer")
        raw = read_config(folder)
        name, where = raw.get("_class_name"), str(folder / "config.json")
        if name in cls.diffusers_class_names:
            return cls.config_from_diffusers(raw, **config_overrides), "diffusers"
        if name == cls.__name__:
            architecture, layout = {k: v for k, v in raw.items() if not k.startswith("_")}, "native"
        elif name == cls.dropin_class_name:
            architecture, layout = raw.get("architecture") or {}, "dropin"
        else:
            raise ConfigError(f"{where}: _class_name {name!r} is not one of "
                              f"{(cls.__name__, cls.dropin_class_name) + cls.diffusers_class_names}")
        return from_dict(cls.config_class, {**architecture, **config_overrides}, where=where), layout

    @classmethod
    def _instantiate(cls, config, state: StateDict, source: str, dtype, original: bool = False,
                     graft: GraftSpec | None = None):
        with torch.device("meta"):
            model = cls(config)
        if graft is not None:
            with torch.device("meta"):
                graft.apply(model)
        if original:
            extras = {k: state.pop(k) for k in cls.original_extras if k in state}
            model.check_original_extras(extras, source)
        load_strict(model, state, source, assign=True)
        return model.to(dtype or torch.float32).eval()

    # ---- saving ----------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Our export folder: `config.json`, `model.safetensors` (original key layout), `graft.yaml` if grafted."""
        folder = Path(folder)
        save_json({"_class_name": type(self).__name__, **to_dict(self.config)}, folder / "config.json")
        save_safetensors(self.state_dict(), folder / NATIVE_WEIGHTS)
        if self.graft is not None:
            self.graft.save_yaml(folder / GRAFT_FILE)
        return folder

    def save_diffusers(self, folder: str | Path) -> Path:
        """A diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`)."""
        if self.graft is not None:
            raise ValueError("a grafted model has no diffusers equivalent; use save_pretrained()")
        folder = Path(folder)
        state = self.key_map(self.config).to_diffusers(self.state_dict())
        save_safetensors(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        save_json(self.diffusers_config(self.config), folder / "config.json")
        return folder

    def save_original(self, path: str | Path) -> Path:
        """An original-repo checkpoint file (tensors only, loadable with `weights_only=True`)."""
        if self.graft is not None:
            raise ValueError("a grafted model has no original-repo equivalent; use save_pretrained()")
        path = Path(path)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        state.update(self.original_extra_tensors())
        save_torch(self.wrap_original(state), path)
        return path

    @staticmethod
    def wrap_original(state: StateDict) -> dict:
        """How the original repo stores a state dict in its files (default: raw)."""
        return state
