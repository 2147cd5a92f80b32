"""Stage 2: finetune the grafted model with its own diffusion objective (ε MSE + VLB), in full or with LoRA,
then export a folder the model loaders accept (graft.yaml, config.json, model.safetensors)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.files import save_text
from common.runtime import compute_dtype, pick_device
from models.diffusion import GaussianDiffusion
from models.graft import GraftSpec
from models.pretrained import PretrainedModel
from models.weights import load_strict, read_state_dict
from recipes import loop
from recipes.batches import call_model, noise_batch, to_device
from recipes.builders import build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe, dump_recipe
from recipes.distributed import barrier
from recipes.ema import EMA
from recipes.engine import deepspeed_engine, full_state_dict
from recipes.lora import attach_lora, merge_lora
from recipes.model_card import write_model_card
from recipes.reporting import RunLog
from recipes.stage1 import load_students

log = logging.getLogger(__name__)


def grafted_model(recipe: Recipe, students_dir: Path | None) -> tuple[PretrainedModel, GraftSpec]:
    """The teacher with its targeted operators replaced: by the stage-1 students, or fresh if none are given."""
    model = build_teacher(recipe)
    spec = GraftSpec.from_dict(recipe.graft, where="recipe graft")
    students = load_students(students_dir, spec, model) if students_dir is not None else None
    spec.apply(model, students)
    if recipe.stage2.mode == "lora":
        attach_lora(model, recipe.stage2.lora, sorted(spec.targets(model)))
    return model, spec


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
    model, spec = grafted_model(recipe, students_dir)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    ema = EMA(model, cfg.ema_decay, keep=rank == 0) if cfg.ema_decay else None
    engine = deepspeed_engine(model.to(dev), recipe, cfg.optim, cfg.steps, world_size)
    diffusion = GaussianDiffusion()
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
            ema.update(engine.module)
        return {}

    stage = loop.Stage("stage2", engine, source, cfg.steps, cfg.log_every, cfg.checkpoint_every, micro_step,
                       after_step, state=lambda: {"ema": ema.state_dict() if ema else {}},
                       load_state=lambda s: ema.load_state_dict(s["ema"]) if ema else None)
    runlog = RunLog(out, enabled=rank == 0)
    loop.run(stage, CheckpointManager(out / "checkpoints", recipe.keep_checkpoints, rank), runlog, recipe.seed,
             recipe.deepspeed.gradient_accumulation, rank, resume)
    runlog.close(f"{recipe.name}: stage 2")
    return export(recipe, engine.module, ema, rank)


def export(recipe: Recipe, trained: torch.nn.Module, ema: EMA | None, rank: int) -> Path:
    """Rank 0 writes the final model (EMA weights if kept, LoRA merged) as an export folder; collective."""
    state = full_state_dict(trained)
    folder = recipe.out / "export"
    if rank == 0:
        if ema is not None:
            state.update(ema.state_dict())
        model, _ = grafted_model(recipe, students_dir=None)
        load_strict(model, state, "trained model")
        if recipe.stage2.mode == "lora":
            merge_lora(model)
        model.save_pretrained(folder)
        save_text(dump_recipe(recipe), folder / "recipe.yaml")
        write_model_card(folder, new_weights=True)
        log.info("exported the grafted model to %s", folder)
    barrier()
    return folder
