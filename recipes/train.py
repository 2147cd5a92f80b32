"""Run a grafting recipe: stage 1 (activation distillation) → stage 2 (finetuning) → export.

    python -m recipes.train recipes/tiny_pixart_hyena_x.yaml                          # one process
    torchrun --nproc_per_node 2 -m recipes.train RECIPE --set stage2.optim.lr=5e-5    # or deepspeed / srun
    python -m recipes.train RECIPE --resume auto    # continue from the newest complete checkpoint

Rank and world size come from the environment (torchrun, the deepspeed launcher, or Slurm's srun).
"""
from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from common.files import save_text
from common.runtime import setup_logging
from recipes.config import dump_recipe, load_recipe
from recipes.distributed import barrier, init_process_group

log = logging.getLogger("train")
DONE = "DONE"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--resume", default="auto", help="auto (default), none, or a checkpoint folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stage2.optim.lr=5e-5 (repeatable)")
    parser.add_argument("--students", help="stage-1 students folder for --stage 2 (default: the recipe's own stage-1 "
                        "output); `fresh`: randomly initialised operators, no distillation (an ablation)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    # DeepSpeed calls torch.distributed functions torch has renamed; the warnings are not actionable here
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning)
    recipe = load_recipe(args.recipe, args.overrides)  # validate before starting processes' work
    rank, world_size = init_process_group()
    setup_logging(rank)
    out = recipe.out
    if rank == 0:
        save_text(dump_recipe(recipe), out / "recipe.yaml")
        log.info("recipe %s → %s (%d rank%s)", recipe.name, out, world_size, "s" * (world_size > 1))
    barrier()
    from recipes.stage1 import best_dir, run_stage1  # imported after the process group: DeepSpeed set-up
    from recipes.stage2 import run_stage2

    if recipe.graft is None:
        log.info("the recipe has no graft: stage 1 has nothing to distil; stage 2 trains the model as it is")
    elif args.stage == "all" and args.students == "fresh":
        log.info("--students fresh: stage 1 is skipped (fresh operators, no distillation)")
    elif args.stage in ("1", "all"):
        marker = out / "stage1" / DONE
        if args.resume == "auto" and marker.is_file():
            log.info("stage 1 already finished (%s); skipping it", marker)
        else:
            run_stage1(recipe, rank, world_size, args.resume)
            if rank == 0:
                marker.write_text("done\n")
            barrier()
    if args.stage in ("2", "all"):
        students = None if recipe.graft is None or args.students == "fresh" else Path(args.students or best_dir(recipe))
        return run_stage2(recipe, rank, world_size, args.resume, students)
    return None


if __name__ == "__main__":
    main()
