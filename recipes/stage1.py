"""Stage 1, activation distillation: one frozen-teacher forward per batch feeds every student.

Hooks on the targeted teacher operators record each operator's input (the teacher's own activations: teacher
forcing) and output (for attention, the output before the residual gate). Each student regresses its operator's
output from that input. All students learn from the same forward pass, and no activation is stored on disk.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.files import save_json, save_text
from common.runtime import compute_dtype, pick_device
from common.tables import markdown_table
from models.diffusion import GaussianDiffusion
from models.graft import Graft, GraftSpec
from models.weights import read_state_dict, save_safetensors
from recipes import loop
from recipes.batches import call_model, noise_batch, to_device
from recipes.builders import build_diffusion, build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe
from recipes.distributed import barrier
from recipes.engine import LocalEngine, deepspeed_engine, full_state_dict
from recipes.reporting import RunLog, read_metrics

log = logging.getLogger(__name__)
VAL_SEED = 987_654_321


def module_name(path: str) -> str:
    """`blocks.3.attn` → `blocks_3_attn` (ModuleDict keys cannot contain dots)."""
    return path.replace(".", "_")


class ActivationTap:
    """Forward hooks that record (input, token grid, output) of the targeted teacher operators."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.records: dict[str, tuple[torch.Tensor, tuple | None, torch.Tensor]] = {}
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str):
        def record(module, args, output):
            hw = args[1] if len(args) > 1 else None
            self.records[path] = (args[0].detach(), hw, output.detach())
        return record

    def take(self) -> dict[str, tuple[torch.Tensor, tuple | None, torch.Tensor]]:
        records, self.records = self.records, {}
        return records


class StudentBank(nn.Module):
    """The students as one module (one optimizer, one DeepSpeed engine); forward runs each on its input."""

    def __init__(self, students: dict[str, nn.Module], grafts: dict[str, Graft]):
        super().__init__()
        self.paths = sorted(students)
        self.kinds = {p: grafts[p].type for p in self.paths}
        self.students = nn.ModuleDict({module_name(p): students[p] for p in self.paths})

    def forward(self, inputs: dict[str, tuple[torch.Tensor, tuple | None]]) -> dict[str, torch.Tensor]:
        outputs = {}
        for path in self.paths:
            x, hw = inputs[path]
            student = self.students[module_name(path)]
            outputs[path] = student(x, hw) if self.kinds[path] == "mha" else student(x)
        return outputs

    def student_state(self, full: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
        prefix = f"students.{module_name(path)}."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def regression_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """L1 (robust to the outliers of deep attention layers), L2, or Huber, in fp32."""
    prediction, target = prediction.float(), target.float()
    if kind == "l1":
        return F.l1_loss(prediction, target)
    if kind == "l2":
        return F.mse_loss(prediction, target)
    return F.huber_loss(prediction, target, delta=delta)


def teacher_records(teacher: nn.Module, tap: ActivationTap, diffusion: GaussianDiffusion, batch: dict,
                    generator: torch.Generator, dev: torch.device, dtype: torch.dtype) -> dict:
    """One frozen-teacher forward on noised latents; the tapped operators' (input, grid, output)."""
    batch = to_device(batch, dev, dtype)
    x_t, t, _ = noise_batch(diffusion, batch, generator)
    with torch.no_grad():
        call_model(teacher, x_t, t, batch)
    return tap.take()


def student_losses(engine, records: dict, losses: dict[str, str], delta: float
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every student on its teacher input: (loss per layer, output per layer)."""
    outputs = engine({p: (records[p][0], records[p][1]) for p in losses})
    return {p: regression_loss(kind, outputs[p], records[p][2], delta) for p, kind in losses.items()}, outputs


def best_dir(recipe: Recipe) -> Path:
    return recipe.out / "stage1" / "best"


def run_stage1(recipe: Recipe, rank: int, world_size: int, resume: str | None) -> Path:
    """Distil every targeted layer; returns the folder of the best student per layer (`<path>.safetensors`)."""
    out = recipe.out / "stage1"
    cfg = recipe.stage1
    dev, dtype = pick_device(), compute_dtype(recipe.deepspeed.precision)
    teacher = build_teacher(recipe).to(dev, dtype).requires_grad_(False)
    spec = GraftSpec.from_dict(recipe.graft, where="recipe graft")
    grafts = spec.targets(teacher)
    split = cfg.mode == "split"
    mine = sorted(grafts)[rank::world_size] if split else sorted(grafts)
    if not mine:
        raise ValueError(f"stage 1 split mode: rank {rank} has no student ({len(grafts)} students, "
                         f"{world_size} ranks); use fewer ranks or data_parallel mode")
    torch.manual_seed(recipe.seed)  # the same student initialisation on every rank
    students = {p: op.float() for p, op in spec.build_operators(teacher).items() if p in mine}
    bank = StudentBank(students, grafts).to(dev)
    if split:
        engine = LocalEngine(bank, cfg.optim, cfg.steps, recipe.deepspeed.gradient_accumulation, rank,
                             dtype == torch.bfloat16)
    else:
        engine = deepspeed_engine(bank, recipe, cfg.optim, cfg.steps, world_size)
    tap = ActivationTap(teacher, mine)
    diffusion = build_diffusion(recipe)
    shard_rank, shard_world = (0, 1) if split else (rank, world_size)
    source = build_source(recipe, teacher, shard_rank, shard_world, "train", cfg.shards)
    losses = {p: cfg.loss[grafts[p].type] for p in mine}
    best = {p: {"rel_err": float("inf"), "step": 0} for p in mine}
    writes_best = split or rank == 0

    def micro_step(batch: dict, generator: torch.Generator):
        records = teacher_records(teacher, tap, diffusion, batch, generator, dev, dtype)
        per_layer, _ = student_losses(engine, records, losses, cfg.huber_delta)
        total = torch.stack(list(per_layer.values())).sum()
        metrics = {f"train/{p}": v.item() for p, v in per_layer.items()}
        metrics["train/loss"] = total.item() / len(mine)
        return total, metrics

    def evaluate(step: int) -> dict[str, float]:
        if step % cfg.eval_every and step != cfg.steps:
            return {}
        val = iter(build_source(recipe, teacher, shard_rank, shard_world, "val", cfg.shards))
        sq_err = {p: torch.zeros((), dtype=torch.float64, device=dev) for p in mine}
        sq_ref = {p: torch.zeros((), dtype=torch.float64, device=dev) for p in mine}
        bank.eval()
        with torch.no_grad():
            for i in range(cfg.eval_batches):
                records = teacher_records(teacher, tap, diffusion, next(val),
                                          torch.Generator().manual_seed(VAL_SEED + i), dev, dtype)
                _, outputs = student_losses(engine, records, losses, cfg.huber_delta)
                for p in mine:
                    sq_err[p] += (outputs[p].double() - records[p][2].double()).square().sum()
                    sq_ref[p] += records[p][2].double().square().sum()
        bank.train()
        if not split:
            for p in mine:
                torch.distributed.all_reduce(sq_err[p])
                torch.distributed.all_reduce(sq_ref[p])
        rel = {p: (sq_err[p] / sq_ref[p].clamp(min=1e-30)).sqrt().item() for p in mine}
        improved = [p for p in mine if rel[p] < best[p]["rel_err"]]
        if improved:
            state = full_state_dict(bank)  # collective under ZeRO-3: every rank takes part
            for p in improved:
                best[p] = {"rel_err": rel[p], "step": step}
                if writes_best:
                    save_safetensors(bank.student_state(state, p), best_dir(recipe) / f"{p}.safetensors")
                    save_json({"path": p, "operator": grafts[p].name, "type": grafts[p].type,
                               "loss": losses[p], **best[p]}, best_dir(recipe) / f"{p}.json")
        return {f"val/rel_err/{p}": v for p, v in rel.items()}

    def state() -> dict:
        return {"best": {p: [b["rel_err"], b["step"]] for p, b in best.items()}}

    def load_state(saved: dict) -> None:
        for p, (rel_err, step) in saved["best"].items():
            best[p] = {"rel_err": float(rel_err), "step": int(step)}

    runlog = RunLog(out / (f"rank{rank}" if split and rank else ""), enabled=writes_best)
    stage = loop.Stage("stage1", engine, source, cfg.steps, cfg.log_every, cfg.checkpoint_every, micro_step,
                       evaluate, state, load_state)
    loop.run(stage, CheckpointManager(out / "checkpoints", recipe.keep_checkpoints, rank), runlog, recipe.seed,
             recipe.deepspeed.gradient_accumulation, rank, resume)
    runlog.close(f"{recipe.name}: stage 1")
    barrier()
    if rank == 0:
        report = layer_table(best_dir(recipe), [out / "metrics.jsonl", *sorted(out.glob("rank*/metrics.jsonl"))])
        save_text(report + "\n", out / "layers.md")
        log.info("stage 1 per-layer results (%s):\n%s", out / "layers.md", report)
    return best_dir(recipe)


def layer_table(folder: Path, metrics: list[Path]) -> str:
    """Markdown: one row per distilled layer with its final train loss and best held-out relative error
    (`metrics`: the metrics files of every rank that trained students)."""
    last: dict = {}
    for file in metrics:
        rows_by_step = read_metrics(file)
        last.update(rows_by_step[-1] if rows_by_step else {})
    rows = []
    for info_file in sorted(folder.glob("*.json"), key=lambda f: int(f.stem.split(".")[1])):
        info = json.loads(info_file.read_text())
        rows.append([info["path"], info["operator"], info["loss"], last.get(f"train/{info['path']}", float("nan")),
                     info["rel_err"], info["step"]])
    return markdown_table(["layer", "operator", "loss", "final train loss", "best val ‖g−f‖/‖f‖", "at step"], rows)


def load_students(folder: Path, spec: GraftSpec, model: nn.Module) -> dict[str, nn.Module]:
    """The best stage-1 students for every target of `spec`, ready for `spec.apply(model, students)`."""
    students = spec.build_operators(model)
    for path, student in students.items():
        file = folder / f"{path}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"no stage-1 student for {path} in {folder}; run stage 1 first")
        student.load_state_dict(read_state_dict(file))
    return students
