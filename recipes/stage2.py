"""Stage 2: finetune the grafted model with its own diffusion objective (PixArt-Sigma's ε MSE + VLB, or the
teacher's), in full or with LoRA, then export a folder the model loaders accept (graft.yaml, config.json,
model.safetensors). A recipe without a graft trains the model as it is: from random weights, that is how the
shapes teacher is made. Optionally GenEval runs every few steps and the best checkpoint is kept."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.files import save_text
from common.runtime import compute_dtype, pick_device
from models.graft import GraftSpec
from models.pretrained import PretrainedModel
from models.weights import load_strict, read_state_dict
from recipes import loop
from recipes.batches import call_model, noise_batch, to_device
from recipes.builders import build_diffusion, build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe, dump_recipe
from recipes.distributed import barrier, broadcast_tensors
from recipes.ema import EMA
from recipes.engine import deepspeed_engine, full_state_dict
from recipes.evaluation import PeriodicGenEval
from recipes.lora import attach_lora, merge_lora
from recipes.reporting import RunLog
from recipes.stage1 import load_students

log = logging.getLogger(__name__)


def grafted_model(recipe: Recipe, students_dir: Path | None) -> PretrainedModel:
    """The teacher with its targeted operators replaced: by the stage-1 students, or fresh if none are given (the
    teacher itself when the recipe has no graft)."""
    model = build_teacher(recipe)
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
    length = recipe.data.caption_tokens
    if emb.shape[0] < length:
        emb = torch.cat([emb, emb.new_zeros(length - emb.shape[0], emb.shape[1])])
        mask = torch.cat([mask, mask.new_zeros(length - mask.shape[0])])
    return emb[:length].to(dev, dtype), mask[:length].to(dev)


def run_stage2(recipe: Recipe, rank: int, world_size: int, resume: str | None, students_dir: Path | None) -> Path:
    """Finetune and export; returns the export folder."""
    out = recipe.out / "stage2"
    cfg = recipe.stage2
    dev, dtype = pick_device(), compute_dtype(recipe.deepspeed.precision)
    model = grafted_model(recipe, students_dir)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    ema = EMA(model, cfg.ema_decay, keep=rank == 0, warmup=cfg.ema_warmup) if cfg.ema_decay else None
    engine = deepspeed_engine(model.to(dev), recipe, cfg.optim, cfg.steps, world_size)
    diffusion = build_diffusion(recipe)
    evaluation = PeriodicGenEval(recipe, diffusion.schedule, rank, world_size) if cfg.eval else None
    source = build_source(recipe, model, rank, world_size, "train", cfg.shards)
    drop_caption = recipe.data.caption_dropout > 0 and recipe.model.family == "pixart"
    null_emb, null_mask = null_caption(recipe, dev, dtype) if drop_caption else (None, None)

    def micro_step(batch: dict, generator: torch.Generator):
        batch = to_device(batch, dev, dtype)
        x_t, t, noise = noise_batch(diffusion, batch, generator)
        if drop_caption:
            drop = (torch.rand(len(t), generator=generator) < recipe.data.caption_dropout).to(dev)
            batch["text"] = torch.where(drop[:, None, None], null_emb, batch["text"])
            batch["text_mask"] = torch.where(drop[:, None], null_mask, batch["text_mask"])
        output = call_model(engine, x_t, t, batch)
        terms = diffusion.training_losses(output, batch["latent"], x_t, t, noise)
        loss = terms["loss"].mean()
        return loss, {"train/loss": loss.item(), "train/mse": terms["mse"].mean().item(),
                      "train/vb": terms["vb"].mean().item()}

    def after_step(step: int) -> dict:
        if ema is not None:
            ema.update(engine.module, step)
        if evaluation is not None and (step % cfg.eval.every == 0 or step == cfg.steps):
            model.eval()
            metrics = evaluation(step, lambda: final_model(recipe, engine.module, ema, rank, everywhere=True))
            model.train()
            return metrics
        return {}

    def state() -> dict:
        return {"ema": ema.state_dict() if ema else {}, "eval": evaluation.state_dict() if evaluation else {}}

    def load_state(saved: dict) -> None:
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        if evaluation is not None:
            evaluation.load_state_dict(saved.get("eval", {}))

    stage = loop.Stage("stage2", engine, source, cfg.steps, cfg.log_every, cfg.checkpoint_every, micro_step,
                       after_step, state, load_state)
    runlog = RunLog(out, enabled=rank == 0)
    loop.run(stage, CheckpointManager(out / "checkpoints", recipe.keep_checkpoints, rank), runlog, recipe.seed,
             recipe.deepspeed.gradient_accumulation, rank, resume)
    runlog.close(f"{recipe.name}: stage 2")
    if evaluation is not None and rank == 0:
        evaluation.write_curve(out / "metrics.jsonl")
    return export(recipe, engine.module, ema, rank)


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
        log.info("exported the %s model to %s", "grafted" if recipe.graft else "trained", folder)
    barrier()
    return folder
