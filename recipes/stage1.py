"""Stage 1, activation distillation: one frozen-teacher forward per batch feeds every student.

Hooks on the targeted teacher operators record each operator's input (the teacher's own activations: teacher
forcing) and output (for attention, the output before the residual gate). Each student regresses its operator's
output from that input. A parallel pair of blocks (a, a + 1) regresses the two blocks' residual update (block a + 1's
output minus block a's input) from block a's inputs. All students learn from the same forward pass, and no
activation is stored on disk.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.files import save_json, save_text
from common.runtime import pick_device
from common.tables import markdown_table
from models import compile as compiling
from models.diffusion import GaussianDiffusion
from models.graft import BLOCKS, Graft, GraftSpec
from models.operators.kernels import log_backends_once
from models.parallel_blocks import pair_paths
from models.weights import read_state_dict, save_safetensors
from recipes import loop
from recipes.batches import BatchSource, call_model, noise_batch, to_device
from recipes.builders import build_diffusion, build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe
from recipes.distributed import barrier
from recipes.engine import Engine, LocalEngine, deepspeed_engine
from recipes.master import master_state_dict
from recipes.precision import Precision
from recipes.reporting import RunLog, read_metrics
from recipes.schedules import dataset_samples, milestone_steps, steps_per_epoch

log = logging.getLogger(__name__)
VAL_SEED = 987_654_321


def module_name(path: str) -> str:
    """`blocks.3.attn` → `blocks_3_attn` (ModuleDict keys cannot contain dots)."""
    return path.replace(".", "_")


class ActivationTap:
    """Forward hooks that record (input, token grid, output) of the targeted teacher operators; for a parallel pair
    (`blocks.{a}`), (block a's input, its other arguments, the residual update of blocks a and a + 1)."""

    def __init__(self, model: nn.Module, paths: list[str]):
        self.records: dict[str, tuple[torch.Tensor, tuple | None, torch.Tensor]] = {}
        self.pair_inputs: dict[str, tuple] = {}
        self.handles = []
        for p in paths:
            pair = pair_paths(p)
            if pair is None:
                self.handles.append(model.get_submodule(p).register_forward_hook(self._hook(p)))
            else:
                self.handles += [model.get_submodule(pair[0]).register_forward_hook(self._pair_input(p)),
                                 model.get_submodule(pair[1]).register_forward_hook(self._pair_output(p))]

    def _hook(self, path: str):
        def record(module, args, output):
            hw = args[1] if len(args) > 1 else None
            self.records[path] = (args[0].detach(), hw, output.detach())
        return record

    def _pair_input(self, path: str):
        def record(module, args, output):
            self.pair_inputs[path] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return record

    def _pair_output(self, path: str):
        def record(module, args, output):
            x, *rest = self.pair_inputs.pop(path)
            self.records[path] = (x, tuple(rest), output.detach() - x)
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
            kind = self.kinds[path]
            outputs[path] = student(x, hw) if kind == "mha" else student.update(x, *hw) if kind == BLOCKS else \
                student(x)
        return outputs

    def student_state(self, full: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
        prefix = f"students.{module_name(path)}."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Each student's parameters: its own param group, clipped and scheduled on its own."""
        return {p: list(self.students[module_name(p)].parameters()) for p in self.paths}


def regression_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    """L1 (robust to the outliers of deep attention layers), L2, or Huber, in fp32."""
    prediction, target = prediction.float(), target.float()
    if kind == "l1":
        return F.l1_loss(prediction, target)
    if kind == "l2":
        return F.mse_loss(prediction, target)
    return F.huber_loss(prediction, target, delta=delta)


def teacher_records(teacher: nn.Module, tap: ActivationTap, diffusion: GaussianDiffusion, batch: dict,
                    generator: torch.Generator, dev: torch.device, precision: Precision) -> dict:
    """One frozen-teacher forward on noised latents, in the teacher's `precision`; the tapped operators' (input,
    grid, output). With an fp32 teacher the targets are fp32; under bf16 autocast they come out of bf16 matmuls."""
    batch = to_device(batch, dev, precision.param_dtype)
    x_t, t, _ = noise_batch(diffusion, batch, generator)
    with torch.no_grad(), precision.autocast(dev):
        call_model(teacher, x_t, t, batch)
    return tap.take()


def cast(value, dtype: torch.dtype | None):
    """`value` (a tensor, a tuple of a parallel pair's block arguments, a token grid) with its floating-point tensors
    in `dtype`; unchanged if `dtype` is None."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(cast(v, dtype) for v in value)
    return value


def student_losses(engine, records: dict, losses: dict[str, str], delta: float, dtype: torch.dtype | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every student on its teacher input (its floating-point tensors cast to `dtype`, the students' parameter
    dtype, if given): (loss per layer, output per layer)."""
    outputs = engine({p: (cast(records[p][0], dtype), cast(records[p][1], dtype)) for p in losses})
    return {p: regression_loss(kind, outputs[p], records[p][2], delta) for p, kind in losses.items()}, outputs


def best_dir(recipe: Recipe) -> Path:
    return recipe.out / "stage1" / "best"


class BestStudents:
    """Each student's lowest held-out relative error so far and the step it came at; the improved students'
    weights and records (`<path>.safetensors`, `<path>.json`) in `folder`. Part of the stage's resumable state."""

    def __init__(self, folder: Path, grafts: dict[str, Graft], losses: dict[str, str], writes: bool):
        self.folder, self.grafts, self.losses, self.writes = folder, grafts, losses, writes
        self.best = {p: {"rel_err": float("inf"), "step": 0} for p in losses}

    def update(self, step: int, rel_err: dict[str, float]) -> list[str]:
        """Record the students that beat their best at `step`; returns their paths."""
        improved = [p for p in self.best if rel_err[p] < self.best[p]["rel_err"]]
        for p in improved:
            self.best[p] = {"rel_err": rel_err[p], "step": step}
        return improved

    def save(self, engine: Engine, bank: StudentBank, paths: list[str]) -> None:
        """Write the students at `paths` (if this rank writes) from their fp32 master weights; collective under
        DeepSpeed, so every rank that shares the engine calls it."""
        if not paths:
            return
        state = master_state_dict(engine, bank)
        if not self.writes:
            return
        for p in paths:
            save_safetensors(bank.student_state(state, p), self.folder / f"{p}.safetensors")
            save_json({"path": p, "operator": self.grafts[p].name, "type": self.grafts[p].type,
                       "loss": self.losses[p], **self.best[p]}, self.folder / f"{p}.json")

    def state(self) -> dict:
        return {"best": {p: [b["rel_err"], b["step"]] for p, b in self.best.items()}}

    def load_state(self, saved: dict) -> None:
        for p, (rel_err, step) in saved["best"].items():
            self.best[p] = {"rel_err": float(rel_err), "step": int(step)}

    def table(self, metrics: list[Path]) -> str:
        """Markdown: one row per distilled layer of every rank (their records in `folder`) with its final train
        loss and best held-out relative error (`metrics`: the metrics files of every rank that trained students)."""
        last: dict = {}
        for file in metrics:
            rows_by_step = read_metrics(file)
            last.update(rows_by_step[-1] if rows_by_step else {})
        rows = []
        for info_file in sorted(self.folder.glob("*.json"), key=lambda f: int(f.stem.split(".")[1])):
            info = json.loads(info_file.read_text())
            rows.append([info["path"], info["operator"], info["loss"],
                         last.get(f"train/{info['path']}", float("nan")), info["rel_err"], info["step"]])
        return markdown_table(["layer", "operator", "loss", "final train loss", "best val ‖g−f‖/‖f‖", "at step"],
                              rows)


class Distiller:
    """Stage 1 on one rank: the frozen teacher with taps on the targeted operators, this rank's students in their
    engine, and the best student of each layer so far.

    `data_parallel` mode: every rank trains every student on its share of the batches (DeepSpeed). `split` mode:
    each rank trains its own students on all the batches, without communication (`LocalEngine`).
    """

    def __init__(self, recipe: Recipe, rank: int, world_size: int):
        self.recipe, self.cfg = recipe, recipe.stage1
        self.dev = pick_device()
        self.precision = Precision.resolve(recipe.deepspeed.precision)  # the students'
        self.teacher_precision = Precision(self.cfg.teacher_precision)
        self.batch_size = recipe.batch_size("stage1")
        self.teacher = build_teacher(recipe).to(self.dev, self.teacher_precision.param_dtype).requires_grad_(False)
        spec = GraftSpec.from_dict(recipe.graft, where="recipe graft")
        grafts = spec.targets(self.teacher)
        self.split = self.cfg.mode == "split"
        self.paths = sorted(grafts)[rank::world_size] if self.split else sorted(grafts)
        if not self.paths:
            raise ValueError(f"stage 1 split mode: rank {rank} has no student ({len(grafts)} students, "
                             f"{world_size} ranks); use fewer ranks or data_parallel mode")
        torch.manual_seed(recipe.seed)  # the same student initialisation on every rank
        students = {p: op.float() for p, op in spec.build_operators(self.teacher).items() if p in self.paths}
        self.bank = StudentBank(students, grafts).to(self.dev)
        if self.cfg.compile:
            compiling.for_inference(self.teacher)
            for student in self.bank.students.values():
                compiling.for_training(student)
        log_backends_once(self.teacher, "stage 1 teacher")
        log_backends_once(self.bank, "stage 1 students")
        self.data_rank, self.data_world = (0, 1) if self.split else (rank, world_size)
        accumulation = recipe.deepspeed.gradient_accumulation
        milestones = self.milestones(accumulation)
        groups = self.bank.param_groups()
        self.engine: Engine = (
            LocalEngine(self.bank, self.cfg.optim, self.cfg.steps, accumulation, rank, self.precision, groups,
                        milestones) if self.split
            else deepspeed_engine(self.bank, recipe, self.cfg.optim, self.cfg.steps, world_size, self.batch_size,
                                  groups, milestones))
        self.tap = ActivationTap(self.teacher, self.paths)
        self.diffusion = build_diffusion(recipe)
        self.losses = {p: self.cfg.loss[grafts[p].type] for p in self.paths}
        self.writes = self.split or rank == 0  # writes the best students and the logs of its students
        self.best = BestStudents(best_dir(recipe), grafts, self.losses, self.writes)

    def milestones(self, accumulation: int) -> list[int]:
        """The multistep schedule's milestones in optimizer steps (epochs of this rank's share of the data)."""
        optim = self.cfg.optim
        if optim.schedule != "multistep":
            return []
        per_epoch, arithmetic = None, ""
        if optim.milestone_unit == "epochs":
            samples = dataset_samples(self.recipe, self.cfg.shards)
            per_epoch = steps_per_epoch(samples, self.batch_size, self.data_world, accumulation)
            arithmetic = (f" (epochs {optim.milestones}: {samples:,} samples / ({self.batch_size} a batch × "
                          f"{self.data_world} rank(s) × {accumulation}) = {per_epoch:g} steps an epoch)")
        steps = milestone_steps(optim, per_epoch)
        log.info("stage 1 lr × %g at steps %s%s", optim.gamma, steps, arithmetic)
        return steps

    def batches(self, split: str) -> BatchSource:
        return build_source(self.recipe, self.teacher, self.data_rank, self.data_world, split, self.cfg.shards,
                            self.batch_size)

    def micro_step(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One teacher forward; every student's loss on it, summed (the students share no parameters, and each is
        clipped on its own gradient norm)."""
        records = teacher_records(self.teacher, self.tap, self.diffusion, batch, generator, self.dev,
                                  self.teacher_precision)
        per_layer, _ = student_losses(self.engine, records, self.losses, self.cfg.huber_delta,
                                      self.precision.param_dtype)
        total = torch.stack(list(per_layer.values())).sum()
        metrics = {f"train/{p}": v.item() for p, v in per_layer.items()}
        metrics["train/loss"] = total.item() / len(self.paths)
        return total, metrics

    def after_step(self, step: int) -> dict[str, float]:
        """Every `eval_every` steps and at the end: the held-out relative errors; improved students are saved, and
        each student's plateau schedule (if any) steps on its own error."""
        if step % self.cfg.eval_every and step != self.cfg.steps:
            return {}
        rel_err = self.relative_errors()
        self.best.save(self.engine, self.bank, self.best.update(step, rel_err))
        schedule = self.engine.lr_scheduler
        for g in schedule.plateau_step([rel_err[p] ** 2 for p in self.paths]):  # ∝ the held-out MSE
            log.info("stage 1: %s has not improved; its lr is now %.3g", self.paths[g], schedule.get_last_lr()[g])
        norms = schedule.optimizer.norms  # each student's last gradient norm, before its clip
        return {**{f"val/rel_err/{p}": v for p, v in rel_err.items()},
                **{f"lr/{p}": lr for p, lr in zip(self.paths, schedule.get_last_lr())},
                **{f"grad_norm/{p}": float(norms[p]) for p in self.paths if p in norms}}

    def relative_errors(self) -> dict[str, float]:
        """‖g(x) − f(x)‖ / ‖f(x)‖ of every student over `eval_batches` held-out batches, the same batches and noise
        at every evaluation, summed over the ranks that share the students."""
        val = iter(self.batches("val" if self.cfg.select_on == "held_out" else "train_eval"))
        sq_err = {p: torch.zeros((), dtype=torch.float64, device=self.dev) for p in self.paths}
        sq_ref = {p: torch.zeros((), dtype=torch.float64, device=self.dev) for p in self.paths}
        self.bank.eval()
        with torch.no_grad():
            for i in range(self.cfg.eval_batches):
                records = teacher_records(self.teacher, self.tap, self.diffusion, next(val),
                                          torch.Generator().manual_seed(VAL_SEED + i), self.dev,
                                          self.teacher_precision)
                _, outputs = student_losses(self.engine, records, self.losses, self.cfg.huber_delta,
                                            self.precision.param_dtype)
                for p in self.paths:
                    sq_err[p] += (outputs[p].double() - records[p][2].double()).square().sum()
                    sq_ref[p] += records[p][2].double().square().sum()
        self.bank.train()
        if not self.split:
            for p in self.paths:
                torch.distributed.all_reduce(sq_err[p])
                torch.distributed.all_reduce(sq_ref[p])
        return {p: (sq_err[p] / sq_ref[p].clamp(min=1e-30)).sqrt().item() for p in self.paths}


def run_stage1(recipe: Recipe, rank: int, world_size: int, resume: str | None, run_id: str) -> Path:
    """Distil every targeted layer; returns the folder of the best student per layer (`<path>.safetensors`)."""
    out, cfg = recipe.out / "stage1", recipe.stage1
    distiller = Distiller(recipe, rank, world_size)
    runlog = RunLog(out / (f"rank{rank}" if distiller.split and rank else ""), enabled=distiller.writes)
    stage = loop.Stage(name="stage1", engine=distiller.engine, source=distiller.batches("train"),
                       total_steps=cfg.steps, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                       micro_step=distiller.micro_step, after_step=distiller.after_step,
                       state=distiller.best.state, load_state=distiller.best.load_state)
    loop.run(stage=stage, checkpoints=CheckpointManager(out / "checkpoints", recipe.keep_checkpoints, rank, run_id),
             runlog=runlog, seed=recipe.seed, accumulation=recipe.deepspeed.gradient_accumulation, rank=rank,
             resume=resume)
    runlog.close(f"{recipe.name}: stage 1")
    barrier()
    if rank == 0:
        report = distiller.best.table([out / "metrics.jsonl", *sorted(out.glob("rank*/metrics.jsonl"))])
        save_text(report + "\n", out / "layers.md")
        log.info("stage 1 per-layer results (%s):\n%s", out / "layers.md", report)
    return best_dir(recipe)


def load_students(folder: Path, spec: GraftSpec, model: nn.Module) -> dict[str, nn.Module]:
    """The best stage-1 students for every target of `spec`, ready for `spec.apply(model, students)`."""
    students = spec.build_operators(model)
    for path, student in students.items():
        file = folder / f"{path}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"no stage-1 student for {path} in {folder}; run stage 1 first")
        student.load_state_dict(read_state_dict(file))
    return students
