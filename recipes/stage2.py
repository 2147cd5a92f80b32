"""Stage 2: finetune the grafted model with its own diffusion objective (PixArt-Sigma's ε MSE + VLB, or the
teacher's), in full or with LoRA, then export a folder the model loaders accept (graft.yaml, config.json,
model.safetensors). A recipe without a graft trains the model as it is: from random weights, that is how the
shapes teacher is made. Optionally GenEval runs every few steps and the best checkpoint is kept.

The export loses nothing: trained tensors come from the fp32 master weights (or their EMA), frozen ones straight
from the teacher file, and LoRA adapters are merged in fp32."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from common.files import save_text
from common.runtime import pick_device
from models import compile as compiling
from models.graft import GraftSpec
from models.operators.kernels import log_backends_once
from models.pretrained import PretrainedModel
from models.weights import read_state_dict
from recipes import loop
from recipes.batches import BatchSource, call_model, noise_batch, to_device
from recipes.builders import build_diffusion, build_source, build_teacher
from recipes.checkpoints import CheckpointManager
from recipes.config import Recipe, dump_recipe
from recipes.distributed import barrier, broadcast_tensors
from recipes.ema import EMA
from recipes.engine import Engine, deepspeed_engine
from recipes.evaluation import PeriodicGenEval
from recipes.lora import attach_lora, merge_lora
from recipes.master import master_state_dict, trainable
from recipes.model_card import write_model_card
from recipes.precision import Precision
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
    if emb.shape[0] < length and recipe.data.null_caption_mask == "prompt":
        raise ValueError(f"{recipe.data.null_caption} holds {emb.shape[0]} tokens, but data.null_caption_mask=prompt "
                         f"attends to as many as a prompt has, up to {length}; write it with --max-length {length}")
    if emb.shape[0] < length:
        emb = torch.cat([emb, emb.new_zeros(length - emb.shape[0], emb.shape[1])])
        mask = torch.cat([mask, mask.new_zeros(length - mask.shape[0])])
    return emb[:length].to(dev, dtype), mask[:length].to(dev)


def drop_captions(text: torch.Tensor, mask: torch.Tensor, null: tuple[torch.Tensor, torch.Tensor], convention: str,
                  drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions of the samples where `drop` is set replaced by the null caption. Its mask is T5("")'s own under the
    `own` convention (what the sampler's unconditional branch feeds, as diffusers does) or the dropped prompt's
    under `prompt` (PixArt-Sigma's training code, which swaps the features only)."""
    null_emb, null_mask = null
    text = torch.where(drop[:, None, None], null_emb, text)
    if convention == "own":
        mask = torch.where(drop[:, None], null_mask, mask)
    return text, mask


def load_trained(model: torch.nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """Copy the trained tensors into `model`, whose other parameters stay as they are; they must be exactly the
    parameters of `model` that require grad."""
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(trained) != expected:
        raise KeyError(f"trained tensors do not match the model's trainable parameters: missing "
                       f"{sorted(expected - set(trained))[:5]}, unexpected {sorted(set(trained) - expected)[:5]}")
    with torch.no_grad():
        for name, values in trained.items():
            params[name].copy_(values)


class Finetuner:
    """Stage 2 on one rank: the grafted model in its engine, its EMA, and caption dropout toward the null caption
    (which keeps the unconditional branch that classifier-free guidance needs)."""

    def __init__(self, recipe: Recipe, rank: int, world_size: int, students_dir: Path | None):
        self.recipe, self.cfg = recipe, recipe.stage2
        self.dev, self.precision = pick_device(), Precision.resolve(recipe.deepspeed.precision)
        self.dtype = self.precision.param_dtype  # of the batches
        self.model = grafted_model(recipe, students_dir)
        log_backends_once(self.model, "stage 2 model")
        self.model.gradient_checkpointing = self.cfg.gradient_checkpointing
        self.model.train()
        if self.cfg.compile:
            compiling.for_training(self.model)
        self.batch_size = recipe.batch_size("stage2")
        self.engine = deepspeed_engine(self.model.to(self.dev), recipe, self.cfg.optim, self.cfg.steps, world_size,
                                       self.batch_size)
        self.ema = (EMA(self.engine, self.engine.module, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)
                    if self.cfg.ema_decay else None)
        self.diffusion = build_diffusion(recipe)
        self.rank, self.world_size = rank, world_size
        self.evaluation = (PeriodicGenEval(recipe, self.diffusion.schedule, rank, world_size) if self.cfg.eval
                           else None)
        self.caption_dropout = recipe.data.caption_dropout if recipe.model.family == "pixart" else 0.0
        self.null = null_caption(recipe, self.dev, self.dtype) if self.caption_dropout > 0 else None

    def batches(self) -> BatchSource:
        return build_source(self.recipe, self.model, self.rank, self.world_size, "train", self.cfg.shards,
                            self.batch_size)

    def micro_step(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The model's own diffusion loss (the recipe's objective, PixArt-Sigma's ε MSE + VLB by default) on noised
        latents, some captions dropped."""
        batch = to_device(batch, self.dev, self.dtype)
        x_t, t, noise = noise_batch(self.diffusion, batch, generator)
        if self.null is not None:
            batch["text"], batch["text_mask"] = drop_captions(
                batch["text"], batch["text_mask"], self.null, self.recipe.data.null_caption_mask,
                (torch.rand(len(t), generator=generator) < self.caption_dropout).to(self.dev))
        output = call_model(self.engine, x_t, t, batch)
        terms = self.diffusion.training_losses(output, batch["latent"], x_t, t, noise)
        loss = terms["loss"].mean()
        return loss, {"train/loss": loss.item(), "train/mse": terms["mse"].mean().item(),
                      "train/vb": terms["vb"].mean().item()}

    def after_step(self, step: int) -> dict[str, float]:
        """The EMA update; GenEval every `eval.every` steps and at the end (collective), when the recipe asks."""
        if self.ema is not None:
            self.ema.update(step)
        if self.evaluation is None or (step % self.cfg.eval.every and step != self.cfg.steps):
            return {}
        self.model.eval()
        metrics = self.evaluation(step, lambda: final_model(self.recipe, self.engine, self.ema, self.rank,
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
    if cfg.steps == 0 and rank == 0:
        log.info("stage2.steps is 0: the export is the grafted model as stage 1 left it, without finetuning")
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
    return export(recipe, finetuner.engine, finetuner.ema, rank)


def final_model(recipe: Recipe, engine: Engine, ema: EMA | None, rank: int, everywhere: bool
                ) -> PretrainedModel | None:
    """The model an export holds, on rank 0 or on every rank (collective): the trained tensors from the fp32
    master weights (their EMA if kept), the frozen ones from a fresh load of the teacher, LoRA merged in fp32."""
    trained = ema.full_state_dict() if ema is not None else master_state_dict(engine, engine.module)
    if rank != 0 and not everywhere:
        return None
    model = grafted_model(recipe, students_dir=None)  # fp32; frozen tensors exactly as the teacher has them
    if everywhere:  # rank 0 gathered the trained tensors; the others receive them
        if rank != 0:
            trained = {name: p.detach().clone() for name, p in trainable(model).items()}
        trained = broadcast_tensors(trained)
    load_trained(model, trained)
    if recipe.stage2.mode == "lora":
        merge_lora(model)
    return model.eval()


def export(recipe: Recipe, engine: Engine, ema: EMA | None, rank: int) -> Path:
    """Rank 0 writes the final model as an export folder; collective."""
    model = final_model(recipe, engine, ema, rank, everywhere=False)
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
