"""Stage 2: finetune the grafted model with its own diffusion objective (PixArt-Sigma's ε MSE + VLB, or the
teacher's), in full or with LoRA, then export a folder the model loaders accept (graft.yaml, config.json,
model.safetensors). A recipe without a graft trains the model as it is: from random weights, that is how the
shapes teacher is made. Optionally GenEval runs every few steps and the best checkpoint is kept."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from common.files import save_text
from common.runtime import compute_dtype, pick_device
from models import compile as compiling
from models.graft import GraftSpec
from models.operators.kernels import log_backends_once
from models.pretrained import PretrainedModel
from models.weights import load_strict, read_state_dict
from recipes import loop
from recipes.batches import BatchSource, call_model, noise_batch, to_device
from recipes.builders import build_diffusion, build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe, dump_recipe
from recipes.distributed import barrier, broadcast_tensors
from recipes.ema import EMA
from recipes.engine import deepspeed_engine, full_state_dict
from recipes.evaluation import PeriodicGenEval
from recipes.lora import attach_lora, merge_lora
from recipes.model_card import write_model_card
from recipes.reporting import RunLog
from recipes.run_identity import RUN_FILE
from recipes.stage1 import load_students

log = logging.getLogger(__name__)


def grafted_model(recipe: Recipe, students_dir: Path | None) -> PretrainedModel:
    """The teacher with its targeted operators replaced: by the stage-1 students, or fresh if none are given (the
    teacher itself when the recipe has no graft)."""
    model = build_teacher(recipe)
    # fresh operators and LoRA weights: the same in every run (torch seeds its default generator at random), with
    # or without stage 1 earlier in the process
    torch.manual_seed(recipe.seed)
    targets: list[str] = []
    if recipe.graft is not None:
        spec = GraftSpec.from_dict(recipe.graft, where="recipe graft")
        students = load_students(students_dir, spec, model) if students_dir is not None else None
        spec.apply(model, students)
        targets = sorted(spec.targets(model))
    if recipe.stage2.mode == "lora":
        attach_lora(model, recipe.stage2.lora, targets)
    return model


def null_caption(recipe: Recipe, dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features of the empty prompt, padded or cut to the recipe's caption length."""
    state = read_state_dict(recipe.data.null_caption)
    emb, mask = state["embedding"], state["mask"]
    length = recipe.data.reader.caption_tokens
    if emb.shape[0] < length:
        emb = torch.cat([emb, emb.new_zeros(length - emb.shape[0], emb.shape[1])])
        mask = torch.cat([mask, mask.new_zeros(length - mask.shape[0])])
    return emb[:length].to(dev, dtype), mask[:length].to(dev)


class Finetuner:
    """Stage 2 on one rank: the grafted model in its engine, its EMA, and caption dropout toward the null caption
    (which keeps the unconditional branch that classifier-free guidance needs)."""

    def __init__(self, recipe: Recipe, rank: int, world_size: int, students_dir: Path | None):
        self.recipe, self.cfg = recipe, recipe.stage2
        self.dev, self.dtype = pick_device(), compute_dtype(recipe.deepspeed.precision)
        self.model = grafted_model(recipe, students_dir)
        log_backends_once(self.model, "stage 2 model")
        self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        self.model.train()
        if self.cfg.compile:
            compiling.for_training(self.model)
        self.ema = (EMA(self.model, self.cfg.ema_decay, keep=rank == 0, warmup=self.cfg.ema_warmup)
                    if self.cfg.ema_decay else None)
        self.engine = deepspeed_engine(self.model.to(self.dev), recipe, self.cfg.optim, self.cfg.steps, world_size)
        self.diffusion = build_diffusion(recipe)
        self.rank, self.world_size = rank, world_size
        self.evaluation = (PeriodicGenEval(recipe, self.diffusion.schedule, rank, world_size) if self.cfg.eval
                           else None)
        self.caption_dropout = recipe.data.caption_dropout if recipe.model.family == "pixart" else 0.0
        self.null = null_caption(recipe, self.dev, self.dtype) if self.caption_dropout > 0 else None

    def batches(self) -> BatchSource:
        return build_source(self.recipe, self.model, self.rank, self.world_size, "train", self.cfg.shards)

    def micro_step(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The model's own diffusion loss (the recipe's objective, PixArt-Sigma's ε MSE + VLB by default) on noised
        latents, some captions dropped."""
        batch = to_device(batch, self.dev, self.dtype)
        x_t, t, noise = noise_batch(self.diffusion, batch, generator)
        if self.null is not None:
            null_emb, null_mask = self.null
            drop = (torch.rand(len(t), generator=generator) < self.caption_dropout).to(self.dev)
            batch["text"] = torch.where(drop[:, None, None], null_emb, batch["text"])
            batch["text_mask"] = torch.where(drop[:, None], null_mask, batch["text_mask"])
        output = call_model(self.engine, x_t, t, batch)
        terms = self.diffusion.training_losses(output, batch["latent"], x_t, t, noise)
        loss = terms["loss"].mean()
        return loss, {"train/loss": loss.item(), "train/mse": terms["mse"].mean().item(),
                      "train/vb": terms["vb"].mean().item()}

    def after_step(self, step: int) -> dict[str, float]:
        """The EMA update; GenEval every `eval.every` steps and at the end (collective), when the recipe asks."""
        if self.ema is not None:
            self.ema.update(self.engine.module, step)
        if self.evaluation is None or (step % self.cfg.eval.every and step != self.cfg.steps):
            return {}
        self.model.eval()
        metrics = self.evaluation(step, lambda: final_model(self.recipe, self.engine.module, self.ema, self.rank,
                                                            everywhere=True))
        self.model.train()
        return metrics

    def state(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema else {},
                "eval": self.evaluation.state_dict() if self.evaluation else {}}

    def load_state(self, saved: dict) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        if self.evaluation is not None:
            self.evaluation.load_state_dict(saved.get("eval", {}))


def run_stage2(recipe: Recipe, rank: int, world_size: int, resume: str | None, students_dir: Path | None,
               run_id: str) -> Path:
    """Finetune and export; returns the export folder."""
    out, cfg = recipe.out / "stage2", recipe.stage2
    finetuner = Finetuner(recipe, rank, world_size, students_dir)
    stage = loop.Stage(name="stage2", engine=finetuner.engine, source=finetuner.batches(), total_steps=cfg.steps,
                       log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                       micro_step=finetuner.micro_step, after_step=finetuner.after_step, state=finetuner.state,
                       load_state=finetuner.load_state)
    runlog = RunLog(out, enabled=rank == 0)
    loop.run(stage=stage, checkpoints=CheckpointManager(out / "checkpoints", recipe.keep_checkpoints, rank, run_id),
             runlog=runlog, seed=recipe.seed, accumulation=recipe.deepspeed.gradient_accumulation, rank=rank,
             resume=resume)
    runlog.close(f"{recipe.name}: stage 2")
    if finetuner.evaluation is not None and rank == 0:
        finetuner.evaluation.write_curve(out / "metrics.jsonl")
    return export(recipe, finetuner.engine.module, finetuner.ema, rank)


def final_model(recipe: Recipe, trained: torch.nn.Module, ema: EMA | None, rank: int,
                everywhere: bool) -> PretrainedModel | None:
    """The model an export holds (EMA weights if kept, LoRA merged), on rank 0 or on every rank; collective."""
    state = full_state_dict(trained)
    if ema is not None and everywhere:
        shadow = ema.state_dict() if ema.keep else {n: state[n].clone() for n in ema.names}
        state.update(broadcast_tensors(shadow))  # the EMA lives on rank 0
    elif ema is not None and rank == 0:
        state.update(ema.state_dict())
    if rank != 0 and not everywhere:
        return None
    model = grafted_model(recipe, students_dir=None)
    load_strict(model, state, "trained model")
    if recipe.stage2.mode == "lora":
        merge_lora(model)
    return model.eval()


def export(recipe: Recipe, trained: torch.nn.Module, ema: EMA | None, rank: int) -> Path:
    """Rank 0 writes the final model as an export folder; collective."""
    model = final_model(recipe, trained, ema, rank, everywhere=False)
    folder = recipe.out / "export"
    if rank == 0:
        model.save_pretrained(folder)
        save_text(dump_recipe(recipe), folder / "recipe.yaml")
        if (recipe.out / RUN_FILE).is_file():  # what the run was started with, and every change allowed since
            shutil.copyfile(recipe.out / RUN_FILE, folder / RUN_FILE)
        write_model_card(folder, new_weights=True)
        log.info("exported the %s model to %s", "grafted" if recipe.graft else "trained", folder)
    barrier()
    return folder
