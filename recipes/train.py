"""Run a grafting recipe: stage 1 (activation distillation) → stage 2 (finetuning) → export.

    python -m recipes.train recipes/tiny_pixart_hyena_x.yaml                          # one process
    torchrun --nproc_per_node 2 -m recipes.train RECIPE --set stage2.optim.lr=5e-5    # or deepspeed / srun
    python -m recipes.train RECIPE --resume auto    # continue this folder's run from its newest checkpoint
    python -m recipes.train RECIPE --set stage2.optim.lr=2e-5 --allow-change stage2.optim.lr   # change a setting
    python -m recipes.train RECIPE --start-over     # delete the folder's run and start a new one

Rank and world size come from the environment (torchrun, the deepspeed launcher, or Slurm's srun). The run folder
records what the run was started with (run.json); a job there with other settings, a second live job, or a new run
over an old one is refused with what to do instead (docs/errors.md lists every such message).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from common.config import ConfigError
from common.files import save_text
from common.lifeline import end_with_launcher
from common.runtime import Rank, setup_logging
from models.weights import CheckpointError
from recipes.checkpoints import ResumeError
from recipes.config import Recipe, dump_recipe, read_recipe
from recipes.distributed import all_ranks_true, barrier, init_process_group
from recipes.preflight import check_inputs
from recipes.run_identity import (
    HASH_CACHE,
    RECIPE_FILE,
    RUN_FILE,
    RunFolderError,
    RunRecord,
    current_record,
    mark_done,
    open_run,
    stage_done,
)
from recipes.run_lock import RunLock, RunLockedError
from recipes.stage1 import best_dir

FRESH = "fresh"  # --students fresh: stage 2 without distillation (an ablation)
log = logging.getLogger("train")
#: errors of the user's making: printed as one message, without a traceback
USER_ERRORS = (ConfigError, RunFolderError, RunLockedError, CheckpointError, FileNotFoundError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--resume", default="auto", help="auto (default: continue this folder's run, or start one "
                        "in an unused folder), none (start a run; refused in a used folder), or a checkpoint folder "
                        "of this run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set stage2.optim.lr=5e-5 (repeatable)")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="let a resumed run take a changed setting (a recipe key or section, world_size or "
                        "students); repeatable. Refused when the change cannot take effect")
    parser.add_argument("--start-over", action="store_true", help="delete the run this folder holds (its "
                        "checkpoints, stages and export) and start a new one")
    parser.add_argument("--students", help="stage-1 students folder for --stage 2 (default: the recipe's own stage-1 "
                        "output); `fresh`: no distillation, stage 2 starts from fresh operators (random) or parallel "
                        "pairs (the teacher's two blocks, merged as their sum): an ablation")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def students_dir(students: str | None, recipe: Recipe) -> Path | None:
    """The students stage 2 starts from: `--students`, else this recipe's stage-1 output; none for `fresh` or a
    recipe without a graft."""
    if students == FRESH or recipe.graft is None:
        return None
    return Path(students) if students else best_dir(recipe)


def main(argv: list[str] | None = None) -> Path | None:
    end_with_launcher()
    args = parse_args(argv)
    # DeepSpeed calls torch.distributed functions torch has renamed; the warnings are not actionable here
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning)
    try:
        recipe, sources = read_recipe(args.recipe, args.overrides)  # everything checked before any work starts
        check_inputs(recipe, sources, Rank.from_env().world_size,
                     students_dir(args.students, recipe) if args.stage == "2" else None)
    except USER_ERRORS as err:
        fail(err, Rank.from_env().rank)
    rank, world_size = init_process_group()
    setup_logging(rank)
    out = recipe.out
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = RunLock(out)
            lock.acquire()
            given = Path(args.students) if args.students not in (None, FRESH) else args.students
            record = open_run(out, current_record(recipe, world_size, given, out / HASH_CACHE), args.resume,
                              args.allow_change, args.start_over)
            save_text(dump_recipe(recipe), out / RECIPE_FILE)
            log.info("recipe %s → %s, run %s (%d rank%s)", recipe.name, out, record.run_id, world_size,
                     "s" * (world_size > 1))
        except Exception as err:  # noqa: BLE001 (told to every rank first, so that none waits for rank 0)
            refusal = err
            if lock is not None:
                lock.release()
    if not all_ranks_true(refusal is None):
        if refusal is not None and not isinstance(refusal, USER_ERRORS):
            raise refusal
        fail(refusal, rank)
    try:
        return run_stages(args, recipe, rank, world_size, RunRecord.read(out / RUN_FILE))
    except (*USER_ERRORS, ResumeError) as err:  # a bad checkpoint, or one of another run: no traceback
        fail(err, rank, every_rank=True)
    finally:
        if lock is not None:
            lock.release()


def run_stages(args: argparse.Namespace, recipe: Recipe, rank: int, world_size: int, record: RunRecord
               ) -> Path | None:
    from recipes.stage1 import run_stage1  # imported after the process group: DeepSpeed set-up
    from recipes.stage2 import run_stage2

    out = recipe.out
    if recipe.graft is None:
        log.info("the recipe has no graft: stage 1 has nothing to distil; stage 2 trains the model as it is")
    elif args.stage == "all" and args.students == FRESH:
        log.info("--students fresh: stage 1 is skipped (fresh operators, no distillation)")
    elif args.stage in ("1", "all"):
        if stage_done(out, "stage1", record.run_id):
            log.info("stage 1 of run %s already finished; skipping it", record.run_id)
        else:
            run_stage1(recipe, rank, world_size, resume_of(args.resume, out, "stage1"), record.run_id)
            if rank == 0:
                mark_done(out, "stage1", record)
            barrier()
    if args.stage in ("2", "all"):
        export = out / "export"
        if stage_done(out, "stage2", record.run_id) and export.is_dir():
            log.info("stage 2 of run %s already finished; its export is %s", record.run_id, export)
            return export
        export = run_stage2(recipe, rank, world_size, resume_of(args.resume, out, "stage2"),
                            students_dir(args.students, recipe), record.run_id)
        if rank == 0:
            mark_done(out, "stage2", record)
        barrier()
        return export
    return None


def resume_of(resume: str, out: Path, stage: str) -> str:
    """`--resume` for one stage: a checkpoint path applies to the stage it belongs to; the others go on as auto."""
    if resume in ("auto", "none"):
        return resume
    return resume if Path(resume).resolve().parent == (out / stage / "checkpoints").resolve() else "auto"


def fail(err: BaseException | None, rank: int, every_rank: bool = False) -> NoReturn:
    """End the job over a user error, saying what is wrong without a traceback; exit status 2. Errors every rank
    finds alike are told by rank 0 only."""
    if err is not None and (rank == 0 or every_rank):
        print(f"error{f' (rank {rank})' if every_rank else ''}: {err}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
