"""What a recipe's checkpoints weigh, by arithmetic on parameter counts (the grafted model built on the meta device,
nothing loaded): each holds the trained parameters (never the frozen ones, which come back from the teacher file),
their optimizer state and the EMA.

    python -m recipes.checkpoint_size recipes/dit_xl2/mha_hyena_y_50.yaml recipes/tiny_pixart_hyena_x.yaml
    python -m recipes.checkpoint_size recipes/pixart_sigma_2k_hyena_x_50.yaml --preset PixArt-Sigma-XL-2-2K-MS

Per trained parameter: the module copy in its dtype (4 bytes, 2 for pure bf16; none under ZeRO-3, whose module
states hold only partition placeholders); AdamW's fp32 master weights and two moments (12 bytes, partitioned over
the ranks by ZeRO; a `LocalEngine` keeps the moments, 8 bytes, plus fp32 masters only for pure bf16); the stage-2
EMA (4 bytes, sharded). DeepSpeed also copies its `zero_to_fp32.py` / `zero_to_torch.py` into every checkpoint.
Pickle headers, key names and the data position add a few kilobytes a file on top (tests/recipes/test_train.py
checks the arithmetic against a run's files).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from common.tables import markdown_table
from models.graft import GraftSpec
from recipes.builders import FAMILIES
from recipes.config import Recipe, load_recipe
from recipes.lora import attach_lora
from recipes.precision import Precision

SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed copies these into every checkpoint


@dataclass
class CheckpointBytes:
    stage: str
    trained: int  # parameters
    frozen: int
    module: int  # bytes
    optimizer: int
    ema: int
    scripts: int

    @property
    def tensors(self) -> int:
        return self.module + self.optimizer + self.ema

    @property
    def total(self) -> int:
        return self.tensors + self.scripts


def parameter_counts(recipe: Recipe, stage: int, preset: str | None = None) -> tuple[int, int]:
    """(trained, frozen) parameters of a stage: the students (stage 1, the teacher is never saved), or the grafted
    model with its LoRA adapters (stage 2)."""
    family = FAMILIES[recipe.model.family]
    preset = preset or recipe.model.preset or (family.preset_from_filename(Path(recipe.model.pretrained))
                                               if recipe.model.pretrained else None)
    if preset is None:
        raise ValueError(f"{recipe.name}: no preset names the architecture of {recipe.model.pretrained}; pass --preset")
    spec = GraftSpec.from_dict(recipe.graft, where="recipe graft")
    with torch.device("meta"):
        model = family(family.make_config(preset, **recipe.model.arch))
        if stage == 1:
            return sum(p.numel() for op in spec.build_operators(model).values() for p in op.parameters()), 0
        spec.apply(model)
        if recipe.stage2.mode == "lora":
            attach_lora(model, recipe.stage2.lora, sorted(spec.targets(model)))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters()) - trained


def checkpoint_bytes(recipe: Recipe, stage: int, preset: str | None = None) -> CheckpointBytes:
    """One checkpoint of `stage`, all ranks' files together."""
    import deepspeed

    trained, frozen = parameter_counts(recipe, stage, preset)
    precision = Precision.resolve(recipe.deepspeed.precision)
    width = 2 if precision.mode == "bf16" else 4
    scripts = sum((Path(deepspeed.__file__).parent / "utils" / name).stat().st_size for name in SCRIPTS)
    if stage == 1 and recipe.stage1.mode == "split":  # LocalEngine files: module, AdamW moments, bf16 masters
        return CheckpointBytes("stage 1", trained, frozen, width * trained, (8 + 4 * (width == 2)) * trained, 0, 0)
    module = 0 if recipe.deepspeed.zero_stage == 3 else width * trained
    ema = 4 * trained if stage == 2 and recipe.stage2.ema_decay else 0
    return CheckpointBytes(f"stage {stage}", trained, frozen, module, 12 * trained, ema, scripts)


def human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", type=Path, nargs="+")
    parser.add_argument("--preset", help="the architecture, when the recipe's pretrained file does not name it")
    args = parser.parse_args(argv)
    rows = []
    for path in args.recipes:
        recipe = load_recipe(path)
        for stage in (1, 2):
            size = checkpoint_bytes(recipe, stage, args.preset)
            rows.append([recipe.name, size.stage, f"{size.trained / 1e6:.2f} M", f"{size.frozen / 1e6:.2f} M",
                         human(size.total), recipe.keep_checkpoints, human(recipe.keep_checkpoints * size.total)])
    print(markdown_table(["recipe", "stage", "trained params", "frozen (not saved)", "a checkpoint", "kept",
                          "on disk"], rows))


if __name__ == "__main__":
    main()
