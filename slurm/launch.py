"""Run the PixArt-Sigma grafting pipeline as dependent Slurm jobs from Python (submitit), or on this machine.

    python slurm/launch.py recipes/pixart_sigma_2k_hyena_x_50.yaml                    # submit, print the job ids
    python slurm/launch.py RECIPE --nodes 4 --partition gpu --account me --set stage2.optim.lr=5e-5 --wait
    python slurm/launch.py recipes/tiny_pixart_hyena_x.yaml --executor local ...       # no Slurm: one step at a time

The steps, commands and files are those of `slurm/pixart_hyena_x.sh`; here every step is its own job:
- prompts: written by the launcher itself (seconds on a CPU);
- generate: one job array with a task per (split, rank) — each task writes one rank's shards of one split on one
  GPU, so the teacher's images spread over whatever GPUs are free; null-caption: one task;
- stage1, then stage2: every node and GPU;
- geneval (every GPU) and speed (one GPU), both after stage 2.
A step starts when the steps it needs have finished (`afterok`); if one fails, Slurm cancels the ones after it
(`kill-on-invalid-dep`). A job that reaches its time limit or is preempted is requeued by submitit (`Command` is
`Checkpointable`) and resumes: training from its last complete checkpoint, the others from their finished files.
Steps finished earlier are skipped (OUT/slurm/*.done, DATA/slurm/*.done). Job logs: OUT/submitit/.

Without Slurm (`--executor local`, or auto when `srun` is missing) submitit's local executor runs the steps one
after another on this machine, a job's ranks as local processes.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from common.files import save_text
from common.runtime import setup_logging
from common.tables import markdown_table
from recipes.config import load_recipe
from slurm.jobs import Command, finished

log = logging.getLogger("launch")
STEPS = ("prompts", "generate", "stage1", "stage2", "geneval", "speed")
SPLITS = ("stage1", "stage2", "val")


@dataclass
class Step:
    """One job (`ranks` "all" or "one"), or a job array of single-rank commands (`ranks` "array")."""

    name: str
    stage: str  # the entry of STEPS that asks for it
    commands: list[Command]
    ranks: str
    after: list[str] = field(default_factory=list)  # names of the steps it needs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both training stages (repeatable)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    paths = parser.add_argument_group("paths (as in slurm/pixart_hyena_x.sh)")
    paths.add_argument("--out", type=Path, help="run folder (default: the recipe's output_dir)")
    paths.add_argument("--pipeline", type=Path, default=Path("weights/pixart_sigma_base"),
                       help="T5 + tokenizer + VAE folder")
    paths.add_argument("--teacher", type=Path, default=Path("weights/pixart_sigma_2k"),
                       help="teacher transformer: generates the data and is grafted (recipe model.pretrained)")
    paths.add_argument("--data", type=Path, default=Path("data/pixart_2k"),
                       help="prompts, shard folders stage1/ stage2/ val/, null_caption.safetensors")
    paths.add_argument("--prompts", type=int, nargs=3, default=[8000, 12000, 256], metavar=("STAGE1", "STAGE2", "VAL"),
                       help="prompts (= teacher images) per split")
    paths.add_argument("--generate-args", default="--height 2048 --width 2048 --dtype bf16",
                       help="more python -m data.generate options")
    paths.add_argument("--geneval-args", default="--height 2048 --width 2048 --dtype bf16 --detector-path "
                       "weights/mask2former-swin-small-coco-instance --clip weights/clip-vit-l-14-openai",
                       help="more python eval/geneval.py options")
    paths.add_argument("--speed-args", help="python eval/speed.py options (default: --ckpt TEACHER --grafted-ckpt "
                       "OUT/export)")
    jobs = parser.add_argument_group("jobs")
    jobs.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                      help="auto: Slurm when srun is on PATH, else this machine")
    jobs.add_argument("--nodes", type=int, default=1)
    jobs.add_argument("--gpus-per-node", type=int, help="default: 8 on Slurm, this machine's GPUs locally")
    jobs.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU, at least one)")
    jobs.add_argument("--cpus-per-task", type=int, default=16)
    jobs.add_argument("--generate-tasks", type=int, help="ranks the teacher data is split over (default: every "
                      "GPU of the training job)")
    jobs.add_argument("--partition")
    jobs.add_argument("--account")
    jobs.add_argument("--time", type=int, default=24 * 60,
                      help="time limit of each job in minutes (near it, the job is requeued)")
    jobs.add_argument("--wait", action="store_true", help="on Slurm, wait for the last job and fail if one failed")
    args = parser.parse_args(argv)
    if args.executor == "auto":
        args.executor = "slurm" if shutil.which("srun") else "local"
    if args.gpus_per_node is None:
        args.gpus_per_node = 8 if args.executor == "slurm" else local_gpus()
    args.tasks_per_node = args.tasks_per_node or max(1, args.gpus_per_node)
    args.generate_tasks = args.generate_tasks or args.nodes * args.tasks_per_node
    if args.executor == "local" and args.nodes != 1:
        parser.error("the local executor has one node (--nodes 1)")
    return args


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def data_paths(args: argparse.Namespace) -> list[str]:
    """Recipe overrides pointing training at the teacher and the generated data; they come after the user's."""
    data = args.data
    return [f"model.pretrained={args.teacher}", f"stage1.shards={data / 'stage1'}", f"data.train={data / 'stage2'}",
            f"data.val={data / 'val'}", f"data.null_caption={data / 'null_caption.safetensors'}"]


def pixart_steps(args: argparse.Namespace, sets: list[str], out: Path) -> list[Step]:
    """The pipeline of slurm/pixart_hyena_x.sh, as jobs; `sets` are the recipe overrides for training."""
    cwd, data = str(Path.cwd()), args.data

    def command(module: str, argv: list, folder: Path, name: str, **rank) -> Command:
        return Command(module, [str(a) for a in argv], cwd, str(folder / "slurm" / f"{name}.done"), **rank)

    def single(name: str, ranks: str, module: str, argv: list, after: list[str]) -> Step:
        return Step(name, name, [command(module, argv, out, name)], ranks, after)

    generate, first, tasks = [], 0, args.generate_tasks
    for split, count in zip(SPLITS, args.prompts):
        argv = ["--pipeline", args.pipeline, "--transformer", args.teacher, "--prompts", data / f"prompts_{split}.txt",
                "--out", data / split, "--seed", first, *shlex.split(args.generate_args)]
        generate += [command("data.generate", argv, data, f"generate-{split}-rank{rank}of{tasks}", rank=rank,
                             world_size=tasks) for rank in range(tasks)]
        first += count
    null_caption = command("recipes.null_caption", ["--pipeline", args.pipeline, "--out",
                                                    data / "null_caption.safetensors"], data, "null-caption")
    train = [args.recipe, *(x for item in [*sets, f"output_dir={out}"] for x in ("--set", item))]
    geneval = ["--ckpt", out / "export", "--pipeline", args.pipeline, "--out", out / "geneval",
               *shlex.split(args.geneval_args)]
    speed = shlex.split(args.speed_args) if args.speed_args is not None else \
        ["--ckpt", args.teacher, "--grafted-ckpt", out / "export"]
    return [
        Step("generate", "generate", generate, "array"),
        Step("null-caption", "generate", [null_caption], "one"),
        single("stage1", "all", "recipes.train", [*train, "--stage", "1"], after=["generate", "null-caption"]),
        single("stage2", "all", "recipes.train", [*train, "--stage", "2"], after=["stage1"]),
        single("geneval", "all", "eval.geneval.cli", geneval, after=["stage2"]),
        single("speed", "one", "eval.speed", ["--out", out / "speed", *speed], after=["stage2"]),
    ]


def write_prompts(data: Path, counts: list[int]) -> None:
    """prompts.txt and its stage1 / stage2 / val parts, as the sbatch script writes them."""
    from data.prompt_generator import main as generate_prompts

    generate_prompts(["--n", str(sum(counts)), "--seed", "0", "--out", str(data / "prompts.txt")])
    lines = (data / "prompts.txt").read_text().splitlines(keepends=True)
    start = 0
    for split, count in zip(SPLITS, counts):
        (data / f"prompts_{split}.txt").write_text("".join(lines[start:start + count]))
        start += count


def executor(args: argparse.Namespace, out: Path, step: Step, after: list[str] = ()) -> submitit.AutoExecutor:
    """A submitit executor sized for one step (every node and GPU, or one rank on one GPU), after the given jobs."""
    ex = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=args.executor)
    every = step.ranks == "all"
    gpus = args.gpus_per_node if every else min(1, args.gpus_per_node)
    params = dict(name=step.name, timeout_min=args.time, nodes=args.nodes if every else 1,
                  tasks_per_node=args.tasks_per_node if every else 1, cpus_per_task=args.cpus_per_task,
                  slurm_partition=args.partition, slurm_account=args.account,
                  slurm_additional_parameters={"kill-on-invalid-dep": "yes"})
    if gpus:
        params["gpus_per_node"] = gpus
    if after:
        params["slurm_additional_parameters"]["dependency"] = "afterok:" + ":".join(after)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def launch(args: argparse.Namespace) -> list[list[str]]:
    """Submit (Slurm) or run (local) the wanted, unfinished steps; returns a row (step, job ids, state) per step."""
    sets = [*args.overrides, *data_paths(args)]
    recipe = load_recipe(args.recipe, sets)  # fails here, before any job, on a bad recipe or override
    if recipe.model.family != "pixart":
        raise SystemExit(f"{args.recipe} is a {recipe.model.family} recipe; this launcher runs the PixArt-Sigma "
                         "pipeline (for DiT-XL/2 recipes: sbatch slurm/dit_xl2.sh RECIPE)")
    out = args.out or recipe.out
    if "prompts" in args.steps:
        marker, line = args.data / "slurm" / "prompts.done", f"prompts {' '.join(map(str, args.prompts))}"
        if not finished(marker, line):
            write_prompts(args.data, args.prompts)
            save_text(line, marker)
    submitted: dict[str, list[submitit.Job]] = {}
    rows = []
    for step in pixart_steps(args, sets, out):
        todo = [c for c in step.commands if not finished(Path(c.marker), c.line())]
        if step.stage not in args.steps or not todo:
            rows.append([step.name, "", "finished before" if step.stage in args.steps else "not asked for"])
            continue
        if args.executor == "local":  # one command at a time, each waited for
            jobs = []
            for command in todo:
                jobs.append(executor(args, out, step).submit(command))
                jobs[-1].results()  # raises, with the job's log, if it failed
        else:
            after = sorted({job.job_id.split("_")[0] for name in step.after for job in submitted.get(name, [])})
            ex = executor(args, out, step, after)
            jobs = ex.submit_array(todo) if step.ranks == "array" else [ex.submit(todo[0])]
        submitted[step.name] = jobs
        log.info("%s: job %s", step.name, ", ".join(j.job_id for j in jobs))
        rows.append([step.name, ", ".join(j.job_id for j in jobs), "done" if args.executor == "local" else "submitted"])
    if args.executor == "slurm" and args.wait:
        for row in rows:
            for job in submitted.get(row[0], []):
                job.results()  # raises, naming the job and its log, if a task failed
            if row[2] == "submitted":
                row[2] = "done"
    return rows


def main(argv: list[str] | None = None) -> list[list[str]]:
    setup_logging(0)
    rows = launch(parse_args(argv))
    print(markdown_table(["step", "job", "state"], rows))
    return rows


if __name__ == "__main__":
    main()
