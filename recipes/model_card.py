"""Model cards for export folders: README.md with the Hub's YAML front matter, the graft, the recipe, the data, the
steps, and evaluation results taken from the reports our eval commands write. Upload stays the user's call.

    python -m recipes.model_card runs/x/export --hub-id me/pixart-sigma-2k-hyena-x \\
        --geneval runs/geneval_graft --speed runs/speed          # PixArt-Sigma
    python -m recipes.model_card runs/y/export --fid runs/fid/y/fid_results.json                 # DiT
    hf upload me/pixart-sigma-2k-hyena-x runs/x/export .

Every number in a card is read from a file in the export folder: the model files, recipe.yaml, and the reports
copied into its `card/` folder (GenEval scores.json, FID fid_results.json + sampling.json, speed.json), so the
evidence travels with the upload. A report for another model is refused: FID's by the weights' sha256, speed's by
its graft and architecture. `card/card.json` keeps --hub-id and the other names, so a later run (e.g. after a new
evaluation) needs only the new report.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData
from safetensors import safe_open

from common.config import ConfigError, from_dict
from common.files import read_json_object, save_json, save_text
from common.hub import RepoRef, local_path
from common.runtime import setup_logging
from common.tables import markdown_table
from data.shard_writer import DATASET_INFO
from eval.fid.sampling import SETTINGS_FILE as FID_SETTINGS
from models.dit import DiT
from models.graft import BLOCKS, Graft, GraftSpec, target_paths
from models.pixart import PixArtSigma
from models.pretrained import GRAFT_FILE, NATIVE_WEIGHTS, PretrainedModel, model_sha256, read_config
from recipes.config import Recipe

log = logging.getLogger(__name__)

CARD_DIR = "card"  # a subfolder: model_sha256 hashes only the export's top-level files
OPTIONS_FILE = "card.json"
REPORTS = {"geneval": "geneval_scores.json", "fid": "fid_results.json", "fid_sampling": "fid_sampling.json",
           "speed": "speed.json"}
PAPER = "Exploring Diffusion Transformer Designs via Grafting (Chandrasegaran, Poli et al., arXiv 2506.05340)"
OPERATED = {"mha": "self-attention", "mlp": "MLP", BLOCKS: "blocks, as parallel pairs"}
# numerics, text length and training-only settings: equal architectures may differ in them
NON_ARCHITECTURE = {"model_max_length", "timestep_freq_shift", "mlp_norm_eps", "class_dropout_prob"}


@dataclass(frozen=True)
class Family:
    """What a card says about one model family."""

    model: type[PretrainedModel]
    title: str
    tag: str
    pipeline_tag: str
    license: str
    released: dict[str, str]  # preset of a released checkpoint → its Hub repo
    pipeline_class: str
    wrapper_class: str
    base_pipeline: str  # where the pipeline's other components come from, when the base model is unknown
    example_call: str


FAMILIES = {
    "PixArtSigma": Family(
        PixArtSigma, "PixArt-Σ", "pixart-sigma", "text-to-image", "openrail++",
        {f"PixArt-Sigma-XL-2-{s}": f"PixArt-alpha/PixArt-Sigma-XL-2-{s}" for s in ("256x256", "512-MS", "1024-MS",
                                                                                   "2K-MS")},
        "PixArtSigmaPipeline", "GraftedPixArtTransformer2DModel", "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
        'pipe("a small cactus with a happy face in the Sahara desert").images[0].save("sample.png")'),
    "DiT": Family(
        DiT, "DiT", "dit", "unconditional-image-generation", "cc-by-nc-4.0",
        {"DiT-XL-2-256x256": "facebook/DiT-XL-2-256", "DiT-XL-2-512x512": "facebook/DiT-XL-2-512"},
        "DiTPipeline", "GraftedDiTTransformer2DModel", "facebook/DiT-XL-2-256",
        'pipe(class_labels=[207], num_inference_steps=50).images[0].save("sample.png")'),
}


@dataclass
class CardOptions:
    """Names a card cannot read from the export; kept in card/card.json between runs."""

    hub_id: str | None = None
    base_model: str | None = None
    license: str | None = None
    code_url: str | None = None


# ---- reports -------------------------------------------------------------------------------------------------
def _report_file(path: Path, name: str, flag: str) -> Path:
    """The report file itself, or `name` inside the output folder a command wrote."""
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no {name} there (give the file, or the folder the command wrote)")
    return file


def _require(data: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: not a {what} (missing {missing})")


def check_geneval(report: dict[str, Any], path: Path, folder: Path) -> None:
    """scores.json of `python eval/geneval.py`; the checkpoint it names should be this export."""
    _require(report, ("overall", "tags", "images", "run"), path, "GenEval scores.json")
    ckpt = (report["run"].get("generation") or {}).get("ckpt")
    if ckpt is None or Path(ckpt).resolve() != folder.resolve():
        log.warning("%s scored images of %s, not of %s: the card says so", path, ckpt, folder)


def check_fid(results: dict[str, Any], sampling: dict[str, Any], path: Path, folder: Path) -> None:
    """fid_results.json of `python -m eval.fid score` and its samples' sampling.json: made from these weights."""
    _require(results, ("metrics", "num_samples"), path, "FID fid_results.json")
    _require(sampling, ("checkpoint_sha256", "steps", "cfg_scale"), path, "FID sampling.json")
    ours = model_sha256(folder, "transformer")
    if sampling["checkpoint_sha256"] != ours:
        raise ConfigError(f"{path}: its samples come from {sampling.get('checkpoint')} (sha256 "
                          f"{sampling['checkpoint_sha256'][:12]}…), not from {folder} ({ours[:12]}…)")


def check_speed(report: dict[str, Any], path: Path, model_config: Any, graft: GraftSpec | None) -> None:
    """speed.json of `python eval/speed.py`: the full-size model with this graft among its rows, this architecture,
    and speed-ups that were not withheld for a missing kernel."""
    _require(report, ("setup", "modes", "rows", "speedups"), path, "speed.json")
    setup = report["setup"]
    if setup.get("model") != "full":
        raise ConfigError(f"{path}: a {setup.get('model')!r} measurement (a CPU stand-in of another width), not "
                          "this model's speed; measure with `python eval/speed.py --grafted-ckpt EXPORT` on a GPU")
    ours = graft.to_dict() if graft else None
    arch = {k: setup.get(k) for k in ("hidden_size", "depth")}
    expected = {k: getattr(model_config, k) for k in arch}
    measured = [row.get("graft") for row in report["rows"] if row.get("graft") is not None]
    if ours not in measured or arch != expected:
        raise ConfigError(f"{path}: measured grafts {measured} on {arch}, but this export has {ours} on {expected}")
    if report.get("withheld"):
        raise ConfigError(f"{path}: its speed-ups were withheld, kernels were missing: {report['missing_kernels']}")


def store_reports(folder: Path, geneval: Path | None = None, fid: Path | None = None,
                  speed: Path | None = None) -> None:
    """Check the given reports against the export and copy them into its card/ folder."""
    card = folder / CARD_DIR
    config, graft = _model_files(folder)[1:]
    copies: dict[str, Path] = {}
    if geneval is not None:
        copies["geneval"] = _report_file(geneval, "scores.json", "--geneval")
        check_geneval(read_json_object(copies["geneval"]), copies["geneval"], folder)
    if fid is not None:
        copies["fid"] = _report_file(fid, "fid_results.json", "--fid")
        results = read_json_object(copies["fid"])
        # beside the samples it names (a path relative to where `score` ran), or beside the results (the default)
        places = [Path(results.get("samples", copies["fid"])).parent, copies["fid"].parent]
        found = [p / FID_SETTINGS for p in places if (p / FID_SETTINGS).is_file()]
        if not found:
            raise FileNotFoundError(f"{copies['fid']}: its samples' {FID_SETTINGS} is not in {places[0]} or "
                                    f"{places[1]}; the card needs it to know which weights drew the samples")
        copies["fid_sampling"] = found[0]
        check_fid(results, read_json_object(copies["fid_sampling"]), copies["fid"], folder)
    if speed is not None:
        copies["speed"] = _report_file(speed, "speed.json", "--speed")
        check_speed(read_json_object(copies["speed"]), copies["speed"], config, graft)
    for key, source in copies.items():
        save_text(source.read_text(encoding="utf-8"), card / REPORTS[key])


def _stored(folder: Path, key: str) -> dict[str, Any] | None:
    path = folder / CARD_DIR / REPORTS[key]
    return read_json_object(path) if path.is_file() else None


# ---- reading the export ----------------------------------------------------------------------------------------
def _model_files(folder: Path) -> tuple[Family, Any, GraftSpec | None]:
    """The family, architecture and graft of an export folder (config.json + graft.yaml)."""
    raw = read_config(folder) if (folder / "config.json").is_file() else {}
    family = FAMILIES.get(raw.get("_class_name"))
    if family is None or not (folder / NATIVE_WEIGHTS).is_file():
        raise ConfigError(f"{folder}: not an export folder (config.json with _class_name one of {sorted(FAMILIES)} "
                          f"and {NATIVE_WEIGHTS})")
    config = from_dict(family.model.config_class, {k: v for k, v in raw.items() if not k.startswith("_")},
                       where=str(folder / "config.json"))
    graft = GraftSpec.from_yaml(folder / GRAFT_FILE) if (folder / GRAFT_FILE).is_file() else None
    return family, config, graft


def _recipe(folder: Path) -> Recipe | None:
    path = folder / "recipe.yaml"
    return from_dict(Recipe, yaml.safe_load(path.read_text()), where=str(path)) if path.is_file() else None


def parameter_counts(folder: Path, graft: GraftSpec | None) -> tuple[int, int]:
    """(all parameters, those of the grafted operators), from model.safetensors' header."""
    replaced = {f"{path}." for path in target_paths(graft)} if graft else set()
    total = grafted = 0
    with safe_open(str(folder / NATIVE_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
            grafted += n if any(key.startswith(p) for p in replaced) else 0
    return total, grafted


def base_model(family: Family, config: Any, recipe: Recipe | None) -> tuple[str | None, str]:
    """The Hub repo the graft started from, and how that was found."""
    teacher = recipe.model.pretrained if recipe else None
    if teacher:
        parts = Path(teacher).parts
        for i, part in enumerate(parts):  # a local path inside a Hugging Face cache: models--org--name/snapshots/…
            if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
                return part.removeprefix("models--").replace("--", "/"), "the recipe's teacher"
        ref = RepoRef.parse(teacher)
        if ref is not None and not Path(teacher).exists():  # not a path here: a Hub id if the cache has it
            try:
                local_path(teacher)
                return ref.repo_id, "the recipe's teacher"
            except FileNotFoundError:
                pass
    for preset, repo in family.released.items():
        preset_config = family.model.make_config(preset)
        keys = [f.name for f in fields(preset_config) if f.name not in NON_ARCHITECTURE]
        if all(getattr(preset_config, k) == getattr(config, k) for k in keys):
            return repo, "the architecture, which is that released checkpoint's; --base-model sets another"
    return None, "pass --base-model to name it"


# ---- rendering -------------------------------------------------------------------------------------------------
def _blocks(indexes: list[int]) -> str:
    if len(indexes) > 2 and all(b - a == indexes[1] - indexes[0] for a, b in zip(indexes, indexes[1:])):
        return f"{indexes[0]}, {indexes[1]}, …, {indexes[-1]}"
    return ", ".join(map(str, indexes))


def graft_section(config: Any, graft: GraftSpec | None, counts: tuple[int, int]) -> list[str]:
    total, grafted = counts
    lines = ["## Graft", ""]
    if graft is None:
        return lines + ["None: this export holds the unmodified architecture.", ""]
    rows = [[OPERATED[g.type], f"`{g.name}`", _blocks(g.layers.indexes),
             f"{len(g.layers.indexes)} / {config.depth} ({len(g.layers.indexes) / config.depth:.0%})"]
            for g in graft.grafts]
    lines += [markdown_table(["replaced", "operator", "blocks (0-based)", "fraction of blocks"], rows, "llll"), ""]
    lines += [f"- `{g.name}` settings: `{json.dumps(g.config, sort_keys=True)}`" for g in graft.grafts]
    pairs = sum(len(g.layers.indexes) // 2 for g in graft.grafts if g.type == BLOCKS)
    if pairs:
        lines.append(f"- Depth: {config.depth} → {config.depth - pairs} sequential blocks ({pairs} parallel pairs: "
                     "both blocks of a pair read the same input, their residual updates merged by a learned "
                     "linear projection).")
    origin = ("each pair's branches started as the base model's two blocks (merged as their sum), the other blocks "
              "are the base model's; all finetuned" if pairs else "the other blocks are the base model's, finetuned")
    lines += [f"- Parameters: {total:,} ({grafted:,} in the grafted operators), counted in `{NATIVE_WEIGHTS}`.",
              f"- `{GRAFT_FILE}` is the full spec; {origin}.", ""]
    return lines


def _optim(o) -> str:
    text = f"lr {o.lr:g}, {o.schedule}" + (f" to {o.min_lr:g}" if o.schedule == "cosine" else "")
    return text + (f", warm-up {o.warmup_steps}" if o.warmup_steps else "") + f", clip {o.grad_clip:g}"


def _data(pattern: str | None) -> str:
    """A shard pattern and, when its dataset.json is on this machine, what the shards hold."""
    if not pattern:
        return "–"
    text = f"`{pattern}`"
    info = Path(pattern.split("*")[0].split("{")[0])
    info = (info if info.is_dir() else info.parent) / DATASET_INFO
    if info.is_file():
        d = read_json_object(info)
        if "num_prompts" in d:
            text += (f": {d['num_prompts']:,} prompts drawn by the teacher at {d['width']}×{d['height']}, "
                     f"{d['steps']} steps, CFG {d['cfg']:g}")
        elif "items" in d:
            text += f": {d['items']:,} {d.get('source', '')} images at {d.get('resolution')} px"
    return text


def training_section(recipe: Recipe | None, graft: GraftSpec | None) -> list[str]:
    lines = ["## How it was made", ""]
    if recipe is None:
        return lines + ["No recipe.yaml in this folder: the training is not recorded.", ""]
    s1, s2, data = recipe.stage1, recipe.stage2, recipe.data
    grafted = {g.type for g in graft.grafts} if graft else set()
    kinds = (("replaced operator", grafted - {BLOCKS}), ("parallel pair", BLOCKS in grafted))
    students = " and each ".join(kind for kind, present in kinds if present) or "replaced operator"
    teacher = f"`{recipe.model.pretrained}`" if recipe.model.pretrained else \
        f"a random `{recipe.model.preset}` model (a test recipe)"
    synthetic = data.source == "synthetic"
    stage2_mode = f"LoRA rank {s2.lora.rank} (α {s2.lora.alpha}), new operators in full" if s2.mode == "lora" \
        else "full finetuning"
    rows = [
        ["steps", s1.steps, s2.steps],
        ["batch per GPU", recipe.batch_size("stage1"), recipe.batch_size("stage2")],
        ["data", "synthetic stream (no real data)" if synthetic else _data(s1.shards or data.train),
         "synthetic stream (no real data)" if synthetic else _data(s2.shards or data.train)],
        ["objective", f"regress each {students}'s output from the teacher's input ("
         + ", ".join(f"{OPERATED[k]}: {v.upper()}" for k, v in s1.loss.items() if k in grafted) + ")",
         "ε MSE + VLB (learned σ)"],
        ["optimizer", _optim(s1.optim), _optim(s2.optim)],
        ["training", f"students {s1.mode.replace('_', '-')}", stage2_mode
         + (f", EMA {s2.ema_decay:g}" if s2.ema_decay else "")],
    ]
    lines += [f"Recipe `{recipe.name}` (`recipe.yaml` in this folder, as run). Teacher: {teacher}.", "",
              markdown_table(["", "stage 1: activation distillation", "stage 2: finetuning"], rows, "lll"), "",
              f"- Gradient accumulation {recipe.deepspeed.gradient_accumulation}, DeepSpeed "
              f"ZeRO-{recipe.deepspeed.zero_stage}, precision {recipe.deepspeed.precision}, seed {recipe.seed}."]
    if recipe.model.family == "pixart":
        dropout = (f"dropped with probability {data.caption_dropout:g} in stage 2 (keeps the unconditional branch "
                   "for CFG)" if data.caption_dropout else "never dropped")
        lines.append(f"- Captions: {data.reader.caption_tokens} T5 tokens, {dropout}.")
    if data.val and not synthetic:
        lines.append(f"- Held-out shards for stage-1 layer selection: {_data(data.val)}.")
    return lines + [""]


def evaluation_section(folder: Path, family: Family, graft: GraftSpec | None) -> tuple[list[str], list[EvalResult]]:
    lines, results = ["## Evaluation", ""], []
    geneval, fid, speed = _stored(folder, "geneval"), _stored(folder, "fid"), _stored(folder, "speed")
    if geneval:
        gen = geneval["run"].get("generation") or {}
        settings = [f"{gen['width']}×{gen['height']}" if gen.get("width") else None,
                    f"{gen['steps']} steps" if gen.get("steps") else None,
                    f"CFG {gen['cfg_scale']:g}" if gen.get("cfg_scale") else None,
                    f"{gen['samples_per_prompt']} per prompt" if gen.get("samples_per_prompt") else None,
                    f"checkpoint `{gen['ckpt']}`" if gen.get("ckpt") else "generation settings not recorded"]
        rows = [[tag, t["images"], f"{t['score']:.4f}"] for tag, t in geneval["tags"].items()]
        lines += [f"**GenEval: {geneval['overall']:.4f}** over {geneval['images']:,} images "
                  f"({', '.join(x for x in settings if x)}).", "",
                  markdown_table(["task", "images", "score"], rows, "lrr"), "",
                  f"`card/{REPORTS['geneval']}`, written by `python eval/geneval.py {geneval['run'].get('command')}`.",
                  ""]
        results.append(EvalResult(task_type="text-to-image", dataset_type="geneval", dataset_name="GenEval",
                                  metric_type="geneval", metric_value=round(geneval["overall"], 5),
                                  metric_name="GenEval overall"))
    if fid:
        sampling = _stored(folder, "fid_sampling")
        names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Precision",
                 "recall": "Recall"}
        shown = [k for k in names if k in fid["metrics"]]
        lines += [f"**FID** of {fid['num_samples']:,} samples ({sampling['steps']} DDPM steps, CFG "
                  f"{sampling['cfg_scale']:g} on {sampling['guidance_channels'] or 'all'} channels, "
                  f"{sampling['image_size']} px) against `{Path(fid['reference']).name}`:", "",
                  markdown_table([names[k] for k in shown], [[f"{fid['metrics'][k]:.3f}" for k in shown]],
                                 "r" * len(shown)), "",
                  f"`card/{REPORTS['fid']}` and `card/{REPORTS['fid_sampling']}` (`python -m eval.fid sample` then "
                  "`score`); the samples' weights hash to this folder's.", ""]
        results.append(EvalResult(task_type="unconditional-image-generation", dataset_type="imagenet-1k",
                                  dataset_name=f"ImageNet {sampling['image_size']}×{sampling['image_size']}",
                                  metric_type="fid", metric_value=round(fid["metrics"]["fid"], 4),
                                  metric_name=f"FID ({fid['num_samples']} samples)"))
    if speed:
        lines += speed_section(speed, graft)
    if not (geneval or fid or speed):
        command = ("`python eval/geneval.py --ckpt EXPORT ...` and `python eval/speed.py --grafted-ckpt EXPORT ...`"
                   if family.model is PixArtSigma else "`python -m eval.fid sample --ckpt EXPORT ...` then `score`")
        lines += [f"Not evaluated yet. Run {command}, then `python -m recipes.model_card EXPORT --geneval/--fid/"
                  "--speed REPORT` to add the results here.", ""]
    return lines, results


def usage_section(family: Family, name: str, on_hub: bool, base: str | None, code_url: str | None,
                  counts: tuple[int, int]) -> list[str]:
    """How to load it: `name` is the Hub id when there is one (`on_hub`), else the export folder's path."""
    pipeline_repo = base if family.model is DiT and base else family.base_pipeline
    code = f"[the grafting repository]({code_url})" if code_url else "the grafting repository (`grafting-dit`)"
    return [
        "## Use it with diffusers", "",
        f"The transformer drops into diffusers' `{family.pipeline_class}`; the text encoder, VAE and scheduler come "
        f"from `{pipeline_repo}`. The grafted transformer's `from_pretrained` reads a local folder or the local "
        "Hugging Face cache and never downloads"
        + (f": `hf download {name}` first." if on_hub else f", here the export folder `{name}`."), "",
        "```python",
        "import torch",
        f"from diffusers import {family.pipeline_class}",
        f"from models.diffusers_transformers import {family.wrapper_class}",
        "",
        f'transformer = {family.wrapper_class}.from_pretrained("{name}", torch_dtype=torch.bfloat16)',
        f'pipe = {family.pipeline_class}.from_pretrained("{pipeline_repo}", transformer=transformer, '
        'torch_dtype=torch.bfloat16).to("cuda")',
        family.example_call,
        "```", "",
        "`pipe.save_pretrained(folder)` writes a pipeline folder that loads again, graft included.", "",
        "## What needs the grafting code", "",
        f"The files are plain formats any reader opens: `{NATIVE_WEIGHTS}` (safetensors, the original "
        f"{family.title} key layout, {counts[0]:,} parameters), `config.json` (the architecture), `{GRAFT_FILE}` "
        "(which operator replaces what, where) and `recipe.yaml`. Running the model needs the grafted operators' "
        f"code, which diffusers does not have: install {code} (`pip install -e .` in a clone) so that `models` "
        "imports. The ungrafted blocks are standard; a pipeline folder saved from it names "
        "`models.diffusers_transformers` in its model_index.json for the same reason.", ""]


def _change_words(g: Graft, depth: int) -> str:
    n = len(g.layers.indexes)
    if g.type == BLOCKS:
        return f"{n} of its {depth} blocks run as {n // 2} parallel pairs (`{g.name}`)"
    return f"{n} of its {depth} {OPERATED[g.type]} layers replaced by `{g.name}`"


def speed_section(speed: dict[str, Any], graft: GraftSpec | None) -> list[str]:
    """The baseline and this export's row of a speed.json (checked by `check_speed`), in every mode it measured:
    median latencies and the paired speed-ups with their lowest and highest round."""
    s = speed["setup"]
    ours = graft.to_dict() if graft else None
    rows = []
    for row in speed["rows"]:
        if row["graft"] is not None and row["graft"] != ours:
            continue
        for mode in speed["modes"]:
            up = speed["speedups"][mode][row["name"]]
            cells = [row["name"], mode]
            for what, scale, digits in (("forward", 1e3, 1), ("sampling", 1, 2)):
                times, ratio = row[mode][what], up[what]
                cells += [f"{statistics.median(times['wall']) * scale:.{digits}f}" if times else "–",
                          f"{ratio['median']:.2f}× ({ratio['low']:.2f}–{ratio['high']:.2f})" if ratio else "–"]
            rows.append(cells)
    bound = next(row["flop_bound"] for row in speed["rows"] if row["graft"] == ours)
    return [f"**Speed** on {s['device']} ({s['dtype'].removeprefix('torch.')}, batch {s['batch']}, "
            f"{s['tokens']:,} tokens (latent {s['latent_side']}²), {s['steps']}-step sampling with CFG "
            f"{s['cfg']}):", "",
            markdown_table(["model", "mode", "forward ms", "speed-up", "sampling s", "speed-up"], rows, "llrrrr"),
            "", f"FLOP-bound speed-up {bound:.2f}×. Speed-ups are medians of per-round ratios to the baseline of "
            f"the same mode (lowest–highest round). `card/{REPORTS['speed']}` (`python eval/speed.py`).", ""]


def render_card(folder: Path, options: CardOptions) -> str:
    """README.md for an export folder: front matter, graft, training, evaluation, usage."""
    family, config, graft = _model_files(folder)
    recipe = _recipe(folder)
    base, base_source = (options.base_model, "given") if options.base_model else base_model(family, config,
                                                                                             recipe)
    name = options.hub_id or str(folder)
    title = (options.hub_id or (recipe.name if recipe else folder.name)).split("/")[-1]
    counts = parameter_counts(folder, graft)
    evaluation, results = evaluation_section(folder, family, graft)
    operators = sorted({g.name for g in graft.grafts}) if graft else []
    card = ModelCardData(
        base_model=base, base_model_relation="finetune" if base else None,
        license=options.license or (family.license if base else None), library_name="diffusers",
        pipeline_tag=family.pipeline_tag, tags=["grafting", "diffusion-transformer", family.tag, *operators],
        model_name=name if results else None, eval_results=results or None)
    replaced = " and ".join(_change_words(g, config.depth) for g in graft.grafts) if graft else "no operator replaced"
    intro = [f"# {title}", "",
             f"{family.title} ({f'`{base}`' if base else 'base model not recorded'}) with {replaced}, made by "
             f"grafting: {PAPER}. Stage 1 distils each new operator from the layer it replaces"
             + ("" if graft is None or all(g.type != BLOCKS for g in graft.grafts) else
                " and each parallel pair from the residual update of the two blocks it replaces")
             + "; stage 2 finetunes the whole model.", "",
             f"- Base model: {f'`{base}`' if base else 'not recorded'} ({base_source}).",
             f"- License: {card.license or 'not set (--license)'}"
             + (" (the base model's)" if card.license and not options.license else "") + ".", ""]
    body = intro + graft_section(config, graft, counts) + training_section(recipe, graft) + evaluation + usage_section(
        family, name, options.hub_id is not None, base, options.code_url, counts)
    return f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def card_options(folder: Path, given: CardOptions | None = None) -> CardOptions:
    """The options stored in card/card.json, updated with the given ones that are set."""
    stored = folder / CARD_DIR / OPTIONS_FILE
    previous = asdict(from_dict(CardOptions, read_json_object(stored), where=str(stored))) if stored.is_file() else {}
    return CardOptions(**{**previous, **{k: v for k, v in asdict(given or CardOptions()).items() if v is not None}})


def write_model_card(folder: str | Path, options: CardOptions | None = None, geneval: Path | None = None,
                     fid: Path | None = None, speed: Path | None = None, new_weights: bool = False) -> Path:
    """Store the given reports and options in the export's card/ folder, then (re)write its README.md.
    `new_weights` (a fresh export) drops stored reports first: they measured the weights that were replaced."""
    folder = Path(folder)
    if new_weights:
        for name in REPORTS.values():
            (folder / CARD_DIR / name).unlink(missing_ok=True)
    options = card_options(folder, options)
    store_reports(folder, geneval, fid, speed)
    readme = folder / "README.md"
    save_text(render_card(folder, options), readme)
    if options != CardOptions():
        save_json(asdict(options), folder / CARD_DIR / OPTIONS_FILE)
    return readme


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="an export folder (config.json, model.safetensors, graft.yaml)")
    parser.add_argument("--hub-id", help="the Hub repo it will be uploaded to, e.g. me/pixart-sigma-2k-hyena-x")
    parser.add_argument("--base-model", help="Hub id of the model it was grafted from (default: from the recipe's "
                        "teacher or the released checkpoint of the same architecture)")
    parser.add_argument("--license", help="license id (default: the base model's)")
    parser.add_argument("--code-url", help="where users get the grafting code, linked from the card")
    parser.add_argument("--geneval", type=Path, help="GenEval output folder or its scores.json")
    parser.add_argument("--fid", type=Path, help="FID fid_results.json (its samples' sampling.json is read too)")
    parser.add_argument("--speed", type=Path, help="eval/speed.py output folder or its speed.json")
    args = parser.parse_args(argv)
    setup_logging()
    options = CardOptions(args.hub_id, args.base_model, args.license, args.code_url)
    try:
        readme = write_model_card(args.export, options, args.geneval, args.fid, args.speed)
    except (ConfigError, FileNotFoundError) as err:  # bad input: the message says what to fix, nothing was written
        raise SystemExit(f"model card: {err}") from None
    hub_id = card_options(args.export).hub_id or "YOUR-NAME/MODEL-NAME"
    log.info("wrote %s; to publish it (your call): hf upload %s %s .", readme, hub_id, args.export)
    return readme


if __name__ == "__main__":
    main()
