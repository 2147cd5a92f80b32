"""Checks of a recipe against the world before any process starts work: the model's architecture (read from its
config, built on the meta device, so no weights are loaded), the graft against the model's depth, the reader and
LoRA settings against the model, and every input file (shards, null caption, operator weights, students).
Errors name the key and the file or `--set` that set it, not a stack trace an hour into the run."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from common.config import ConfigError
from common.hub import local_path
from data.reader import resolve_shards
from models.graft import Graft, GraftSpec
from models.pretrained import PretrainedModel, component_folder
from models.weights import CheckpointError, check_safetensors, read_state_dict
from recipes.builders import FAMILIES, check_held_out, check_reader_fits, model_latent_size
from recipes.config import Recipe
from recipes.validation import Sources

SHARD_KEYS = ("data.train", "data.val", "stage1.shards", "stage2.shards")


def graft_targets(recipe: Recipe, sources: Sources, model: torch.nn.Module) -> tuple[GraftSpec | None,
                                                                                      dict[str, Graft]]:
    """The graft spec and the modules it replaces (none for a recipe without a graft), checked against the
    model's depth."""
    if recipe.graft is None:
        return None, {}
    try:
        spec = GraftSpec.from_dict(recipe.graft, where="graft")
        return spec, spec.targets(model)
    except ConfigError as err:
        raise ConfigError(f"{sources.of('graft')}: graft: {err}") from None


def check_inputs(recipe: Recipe, sources: Sources, world_size: int, students: Path | None = None) -> None:
    """Everything `train` would find wrong later, now. `students`: the stage-1 students stage 2 starts from, when
    only stage 2 runs (they must all be there)."""
    model = meta_model(recipe, sources)
    spec, targets = graft_targets(recipe, sources, model)
    if recipe.graft is not None and recipe.stage1.mode == "split" and len(targets) < world_size:
        raise sources.error("stage1.mode", f"split gives each rank its own students, but {len(targets)} students "
                                           f"cannot cover {world_size} ranks; use fewer ranks or data_parallel")
    try:
        check_reader_fits(recipe.data.reader, model)
    except ConfigError as err:
        raise ConfigError(f"{sources.of('data.reader')}: {err}") from None
    check_latent_size(recipe, sources, model)
    if recipe.stage2.mode == "lora":
        check_lora_targets(recipe, sources, model, sorted(targets))
    check_shards(recipe, sources, world_size)
    if recipe.graft is not None and recipe.stage1.select_on == "held_out":
        try:
            check_held_out(recipe, recipe.stage1.shards)
        except ConfigError as err:
            raise ConfigError(f"{sources.of('data.val')}: {err}") from None
    if recipe.data.null_caption and recipe.model.family == "pixart":
        check_null_caption(recipe, sources, model.config.caption_channels)
    for i, graft in enumerate(spec.grafts if spec else []):
        for block, file in sorted(graft.weights.items()):
            if not Path(file).is_file():
                raise sources.error("graft", f"grafts[{i}].weights[{block}]: no such file {file}")
    if students is not None:
        for path in sorted(targets):
            file = students / f"{path}.safetensors"
            if not file.is_file():
                raise ConfigError(f"--students {students}: no stage-1 student for {path} ({file.name}); run stage 1 "
                                  "first, or give the folder of a finished stage 1 (its best/)")
            check_safetensors(file)


def meta_model(recipe: Recipe, sources: Sources) -> PretrainedModel:
    """The teacher's architecture on the meta device: its config only, from the preset or the pretrained files."""
    section, cls = recipe.model, FAMILIES[recipe.model.family]
    key = "model.pretrained" if section.pretrained else "model.preset"
    try:
        if section.pretrained:
            path = local_path(section.pretrained, "model")  # a local path, or a Hub id in the local cache
            config, layout = cls.config_from_path(path, section.preset, **section.arch)
            check_weight_headers(path, layout)
        else:
            config = cls.make_config(section.preset, **section.arch)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        raise sources.error(key, str(err)) from None
    with torch.device("meta"):
        return cls(config)


def check_weight_headers(path: Path, layout: str) -> None:
    """The safetensors weights of a pretrained model are whole (their headers read; truncation shows there)."""
    files = [path] if path.is_file() else sorted(component_folder(path, "transformer").glob("*.safetensors"))
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)


def check_latent_size(recipe: Recipe, sources: Sources, model: PretrainedModel) -> None:
    """DiT takes latents of its trained size only; PixArt-Sigma any size (multi-scale), its own by default."""
    size = recipe.data.reader.latent_size
    native = model_latent_size(model)
    if size is not None and recipe.model.family == "dit" and tuple(size) != native:
        raise sources.error("data.reader.latent_size", f"{list(size)}, but the DiT model takes {list(native)} latents")


def check_lora_targets(recipe: Recipe, sources: Sources, model: PretrainedModel, grafted: list[str]) -> None:
    """The LoRA target patterns match some module that is not grafted (peft matches them in full)."""
    names = [n for n, _ in model.named_modules() if not any(n == g or n.startswith(g + ".") for g in grafted)]
    patterns = recipe.stage2.lora.target_modules
    if not any(re.fullmatch(p, n) for p in patterns for n in names):
        raise sources.error("stage2.lora.target_modules", f"{patterns} match no module of the grafted model "
                                                           f"(modules look like {names[1:4]})")


def check_shards(recipe: Recipe, sources: Sources, world_size: int) -> None:
    """Every shard pattern finds its files, enough for every reader slot."""
    if recipe.data.source != "shards":
        return
    workers = max(recipe.data.reader.num_workers, 1)
    for key in SHARD_KEYS:
        section, name = key.split(".")
        patterns = getattr(getattr(recipe, section), name)
        if not patterns:
            continue
        try:
            found = resolve_shards([patterns] if isinstance(patterns, str) else list(patterns))
        except (FileNotFoundError, ValueError) as err:
            raise sources.error(key, f"{err}") from None
        ranks = 1 if key == "stage1.shards" and recipe.stage1.mode == "split" else world_size
        if len(found) < ranks * workers:
            raise sources.error(key, f"has {len(found)} shards, fewer than the {ranks} ranks × {workers} reader "
                                     "workers that each need one per epoch; write smaller shards or use fewer "
                                     "workers (data.reader.num_workers)")


def check_null_caption(recipe: Recipe, sources: Sources, width: int) -> None:
    """The null caption file holds `embedding` (L, width) and `mask` (L,)."""
    file = Path(recipe.data.null_caption)
    if not file.is_file():
        raise sources.error("data.null_caption", f"no such file {file} (`python -m recipes.null_caption` writes it)")
    try:
        state = read_state_dict(file)
    except CheckpointError as err:
        raise sources.error("data.null_caption", str(err)) from None
    emb, mask = state.get("embedding"), state.get("mask")
    if emb is None or mask is None or emb.ndim != 2 or mask.shape != emb.shape[:1] or emb.shape[1] != width:
        shapes = {k: list(v.shape) for k, v in state.items()}
        raise sources.error("data.null_caption", f"{file} holds {shapes}; expected embedding (L, {width}) and mask "
                                                 "(L,) for this model")
