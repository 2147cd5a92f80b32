"""The recipe schema: one typed config for a whole grafting run, loaded from YAML with `base:` inheritance and
`--set a.b=c` overrides. The DeepSpeed config and the graft spec are derived from it, never kept separately."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.config import ConfigError, deep_merge, from_dict, parse_assignments, read_yaml, to_dict
from data.reader import ReaderConfig
from models.graft import GRAFT_TYPES, GraftSpec, inline_config_files
from recipes.precision import PrecisionSetting
from recipes.validation import Sources, check_values


@dataclass
class ModelSection:
    """The teacher: a pretrained checkpoint, or a random preset (tiny CPU recipes)."""

    family: Literal["pixart", "dit"]
    pretrained: str | None = None  # diffusers folder, original .pth/.pt, or export folder
    preset: str | None = None
    ema: bool = False  # take the EMA weights of an original checkpoint
    arch: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    init_seed: int = 0  # random teacher (no `pretrained`)


#: shard patterns: folders (their *.tar), globs, brace lists ("a-{000..009}.tar") or tar paths, one or a list
ShardPatterns = str | list[str] | None
#: the reader settings a recipe fills in itself, and where they come from
RECIPE_READER_FIELDS = {"shards": "data.train, data.val and stage1/stage2.shards", "seed": "the recipe's `seed`",
                        "epochs": "stage1/stage2.steps (training reads endless epochs)"}
FAMILY_KIND = {"pixart": "text", "dit": "class"}  # the reader's `kind` of each model family's data


@dataclass
class DataSection:
    """Where batches come from: webdataset shards, or a deterministic synthetic stream (tests, benchmarks). Both
    batch as `reader` says: the shard reader's own config (data/reader.py), every option of it."""

    source: Literal["shards", "synthetic"] = "shards"
    train: ShardPatterns = None
    val: ShardPatterns = None  # held-out shards for stage 1's relative errors (default: the training shards)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    caption_dropout: float = 0.0  # stage 2: replace captions by the null caption with this probability
    null_caption: str | None = None  # safetensors with `embedding` (L, C) and `mask` (L,): T5("")
    # the mask a dropped caption gets: `own`, T5("")'s own (what the sampler's unconditional branch feeds, as in
    # diffusers); `prompt`, the dropped prompt's (PixArt-Sigma's training code swaps the features only)
    null_caption_mask: Literal["own", "prompt"] = "own"
    synthetic_samples: int = 512  # synthetic: samples per epoch (train); val uses a disjoint seed range
    synthetic_val_samples: int = 64


@dataclass
class PlateauSection:
    """ReduceLROnPlateau on a stage-1 student's held-out error (each student on its own): its lr × `factor` after
    more than `patience` evaluations without a relative improvement of `threshold`, never below optim.min_lr."""

    factor: float = 0.5
    patience: int = 1
    threshold: float = 1e-4


@dataclass
class DiffusionSection:
    """The training objective. Unset schedule keys come from the teacher's pipeline folder (its
    `scheduler/scheduler_config.json`, e.g. the shapes teacher's v-prediction on the cosine schedule), else they
    are PixArt-Sigma's and DiT's own: ε (+ VLB for a learned σ) on the linear β schedule."""

    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al. 2023); None: unweighted


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    # after the warm-up: constant; cosine to min_lr; multistep: × gamma at each of `milestones`
    schedule: Literal["constant", "cosine", "multistep"] = "constant"
    milestones: list[float] = field(default_factory=list)
    milestone_unit: Literal["steps", "epochs"] = "steps"  # epochs: of this stage's training data, per rank
    gamma: float = 0.5
    min_lr: float = 0.0
    grad_clip: float = 10.0  # stage 1: each student clipped on its own gradient norm
    plateau: PlateauSection | None = None  # stage 1 only


@dataclass
class Stage1Section:
    """Activation distillation: every student regresses its teacher operator from the teacher's own inputs."""

    steps: int = 1000
    shards: ShardPatterns = None  # this stage's training shards (default: data.train)
    batch_size: int | None = None  # per rank (default: data.reader.batch_size)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=5e-4))
    # l1 / l2 / huber per graft type; `blocks` (a parallel pair's update carries its attention's outliers): ours
    loss: dict[str, str] = field(default_factory=lambda: {"mha": "l1", "mlp": "l2", "blocks": "l1"})
    huber_delta: float = 1.0
    mode: Literal["data_parallel", "split"] = "data_parallel"  # split: students divided across ranks
    teacher_precision: Literal["fp32", "bf16-mixed", "bf16"] = "fp32"  # the precision of the recorded targets
    # where the best students are picked: held-out shards (data.val), or knowingly the training data
    select_on: Literal["held_out", "train"] = "held_out"
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 500
    compile: bool = False  # torch.compile the frozen teacher (for inference) and the students (for training)


@dataclass
class LoraSection:
    rank: int = 64
    alpha: int = 64
    dropout: float = 0.0
    # regexes over module names (peft `target_modules`); grafted operators are trained in full, never adapted
    target_modules: list[str] = field(default_factory=lambda: [
        r".*blocks\.\d+\.attn\.(qkv|proj)", r".*blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)",
        r".*blocks\.\d+\.mlp\.(fc1|fc2)"])


@dataclass
class EvalSection:
    """GenEval every `every` steps of stage 2 on the EMA weights (images split across ranks, scored on rank 0),
    for worlds with an exact detector. Each set is a GenEval metadata file or `WORLD:SPLIT` (e.g. `shapes:val`);
    the checkpoint that scores best on `select` is exported to `stage2/best/`."""

    pipeline: str  # text encoder, tokenizer, codec and scheduler to sample with (a pipeline folder)
    every: int = 500
    world: Literal["shapes"] = "shapes"
    sets: dict[str, str] = field(default_factory=lambda: {"val": "shapes:val"})
    select: str = "val"
    samples_per_prompt: int = 4
    seed: int = 42
    steps: int = 20
    cfg: float = 4.5
    batch_size: int = 32


@dataclass
class Stage2Section:
    """Finetuning of the grafted model with its own diffusion objective, in full or with LoRA; with no graft and no
    pretrained weights, this trains a model from scratch (the shapes teacher)."""

    steps: int = 1000
    shards: ShardPatterns = None  # this stage's training shards (default: data.train)
    batch_size: int | None = None  # per rank (default: data.reader.batch_size)
    optim: OptimSection = field(default_factory=OptimSection)
    mode: Literal["full", "lora"] = "full"
    lora: LoraSection = field(default_factory=LoraSection)
    ema_decay: float | None = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)): for training from scratch
    gradient_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 500
    compile: bool = False  # torch.compile the grafted model (for training)
    eval: EvalSection | None = None


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    gradient_accumulation: int = 1
    precision: PrecisionSetting = "auto"  # auto: bf16-mixed on GPU, fp32 on CPU (recipes/precision.py)
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the derived DeepSpeed JSON


@dataclass
class Recipe:
    name: str
    model: ModelSection
    graft: dict[str, Any] | None  # a graft spec (models.graft), inline; null trains the model as it is
    output_dir: str = "runs/${name}"
    seed: int = 0
    keep_checkpoints: int = 3
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    data: DataSection = field(default_factory=DataSection)
    stage1: Stage1Section = field(default_factory=Stage1Section)
    stage2: Stage2Section = field(default_factory=Stage2Section)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    @property
    def out(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))

    def batch_size(self, stage: Literal["stage1", "stage2"]) -> int:
        """A stage's per-rank batch: its own `batch_size`, else data.reader.batch_size."""
        return getattr(self, stage).batch_size or self.data.reader.batch_size


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe (following `base:` files), apply `a.b=value` overrides, and validate every key."""
    return read_recipe(path, overrides)[0]


def read_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[Recipe, Sources]:
    """`load_recipe`, and where each value came from (errors name the file or the `--set` that set a key)."""
    path = Path(path)
    sources = Sources(path)
    data = _read_with_bases(path, seen=(), sources=sources)
    stages = [("", copy.deepcopy(data))]  # the data before any override, then after each one
    for item in overrides:
        for key, value in parse_assignments([item], "--set", "stage2.optim.lr=5e-5").items():
            _set_dotted(data, key, value, where=f"--set {item!r}")
            sources.record(value, f"--set {item!r}", prefix=key)
        stages.append((f"--set {item!r}", copy.deepcopy(data)))
    recipe = _typed(stages, path)
    validate(recipe, sources)
    check_values(to_dict(recipe), sources)
    return recipe, sources


def _typed(stages: list[tuple[str, dict[str, Any]]], path: Path) -> Recipe:
    """The last stage as a Recipe; an error is blamed on the override that introduced it (or on the file)."""
    try:
        return from_dict(Recipe, _inlined(stages[-1][1]), where=str(path))
    except ConfigError as err:
        message = str(err)
        for origin, data in stages[:-1]:
            try:
                from_dict(Recipe, _inlined(data), where=str(path))
            except ConfigError as earlier:
                if str(earlier) == message:
                    raise _blame(err, origin, path) from None
        raise _blame(err, stages[-1][0], path) from None


def _inlined(data: dict[str, Any]) -> dict[str, Any]:
    """Operator files given with --set are named relative to the working directory."""
    if "graft" in data:
        data = {**data, "graft": inline_config_files(data["graft"], Path.cwd(), "--set graft")}
    return data


def _blame(err: ConfigError, origin: str, path: Path) -> ConfigError:
    if not origin:
        return err
    return ConfigError(f"{origin}: " + str(err).removeprefix(str(path)).lstrip(".: "))


def validate(recipe: Recipe, sources: Sources) -> None:
    """Cross-field checks a type system cannot express."""
    spec = None if recipe.graft is None else GraftSpec.from_dict(recipe.graft, where=f"{sources.of('graft')}: graft")
    evaluation = recipe.stage2.eval
    if evaluation is not None and evaluation.select not in evaluation.sets:
        raise sources.error("stage2.eval.select", f"{evaluation.select!r} is not one of stage2.eval.sets "
                            f"{sorted(evaluation.sets)}")
    bad_losses = {k: v for k, v in recipe.stage1.loss.items() if k not in GRAFT_TYPES or v not in
                  ("l1", "l2", "huber")}
    if bad_losses:
        raise sources.error("stage1.loss", f"{bad_losses}: keys {'/'.join(GRAFT_TYPES)}, values l1/l2/huber")
    unset = sorted({g.type for g in spec.grafts} - set(recipe.stage1.loss)) if spec else []
    if unset:
        raise sources.error("stage1.loss", f"no loss for the graft's {unset} students")
    for stage in ("stage1", "stage2"):
        if recipe.data.source == "shards" and not (getattr(recipe, stage).shards or recipe.data.train):
            raise ConfigError(f"{sources.of('data.source')}: data.source is shards, so {stage}.shards or "
                              "data.train (a shard pattern) is required")
    reader, defaults = recipe.data.reader, ReaderConfig()
    for name, source in RECIPE_READER_FIELDS.items():
        if getattr(reader, name) != getattr(defaults, name):
            raise sources.error(f"data.reader.{name}", f"is set by the recipe, from {source}; remove it")
    if reader.kind not in ("auto", FAMILY_KIND[recipe.model.family]):
        raise sources.error("data.reader.kind", f"{reader.kind!r} does not match a {recipe.model.family} model "
                            f"(its data kind is {FAMILY_KIND[recipe.model.family]!r})")
    if recipe.data.source == "synthetic" and reader.flip:
        raise sources.error("data.reader.flip", "needs shards with flipped latents; the synthetic stream has none")
    if recipe.data.caption_dropout > 0 and recipe.model.family == "pixart" and not recipe.data.null_caption:
        raise sources.error("data.caption_dropout", "needs data.null_caption (T5 features of the empty prompt; "
                            "`python -m recipes.null_caption` writes them)")
    validate_training(recipe, sources)


def validate_training(recipe: Recipe, sources: Sources) -> None:
    """Schedules, precision and stage 1's choice of data to pick its best students on (the ranges of single
    numbers are recipes/validation.py's rules)."""
    if (recipe.graft is not None and recipe.stage1.select_on == "held_out" and recipe.data.source == "shards"
            and not recipe.data.val):
        raise sources.error("data.val", "is not set, so stage 1 would pick its best students on its own training "
                            "data; set data.val to held-out shards, or stage1.select_on=train to select on "
                            "training data knowingly (as the official code's best_train.pt does)")
    for stage in ("stage1", "stage2"):
        optim = getattr(recipe, stage).optim
        if optim.schedule == "multistep" and (not optim.milestones or sorted(optim.milestones) != optim.milestones
                                              or optim.milestones[0] <= 0):
            raise sources.error(f"{stage}.optim.milestones", f"must be increasing positive {optim.milestone_unit} "
                                f"for schedule multistep, got {optim.milestones}")
        if optim.plateau is not None and (stage == "stage2" or not 0 < optim.plateau.factor < 1
                                          or optim.plateau.patience < 0 or optim.plateau.threshold < 0):
            raise sources.error(f"{stage}.optim.plateau", "stage 1 only, with 0 < factor < 1, patience ≥ 0 and "
                                "threshold ≥ 0")
    if "gradient_clipping" in recipe.deepspeed.overrides:
        raise sources.error("deepspeed.overrides.gradient_clipping", "set stage1/stage2.optim.grad_clip instead "
                            "(stage 1 clips each student on its own, so DeepSpeed's global clip stays off there)")
    if recipe.deepspeed.precision == "bf16" and recipe.deepspeed.zero_stage == 0:
        raise sources.error("deepspeed.precision", "bf16 needs deepspeed.zero_stage ≥ 1 (only ZeRO keeps fp32 "
                            "master weights this engine can read); use bf16-mixed for stage 0")


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (written next to every run)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def _read_with_bases(path: Path, seen: tuple[Path, ...], sources: Sources) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular base: chain {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    if "graft" in data:  # operator config files are named relative to the recipe that names them
        data["graft"] = inline_config_files(data["graft"], path.parent, f"{path}: graft")
    base = data.pop("base", None)
    merged = data if base is None else deep_merge(
        _read_with_bases(path.parent / str(base), seen + (path.resolve(),), sources), data)
    sources.record(data, str(path))
    return merged


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
    node[parts[-1]] = value
