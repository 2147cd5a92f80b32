"""The demo (`make demo`): graft the shipped shapes teacher and measure what the graft keeps, on 2 CPU processes.

    python -m recipes.demo                                   # → runs/demo/report.md (its path is the last line)
    python -m recipes.demo --out runs/ablation_75 --shared runs/demo \\
        --set "graft.grafts=[{type: mha, name: hyena_x, config: {}, layers: {ratio: 0.75, pattern: interleaved}}]"

Steps (each a command, printed before it runs; finished steps are skipped, so a killed demo resumes):
1. `data.shapes_data prompts`: training-stream prompts of the shapes world (never the held-out ones), for the
   training pairs and, from another seed, for the validation pairs;
2. `data.generate`: the teacher samples them into WebDataset shards (image, latent, T5 features); the graft never
   trains on the validation pairs, on which stage 1 picks its best students (`data.val`);
3. `recipes.null_caption`: the teacher text encoder's features of the empty prompt (caption dropout);
4. `recipes.train`: stage 1 (Hyena-X students distilled from the teacher's self-attention) then stage 2
   (finetuning of the graft), under DeepSpeed on `--nproc` processes → the graft's export folder;
5. `eval/geneval.py --world shapes` for the teacher and for the graft: the held-out prompts × 4 seeds, the exact
   detector, the official rules and the prompt-agnostic baseline;
6. `eval.fidelity`: the graft's images against the teacher's, same prompts and seeds;
7. `eval/speed.py` (one thread, like every step's processes): forward and sampling latency of teacher and graft
   at the teacher's size, and the 2K-shaped CPU proxy of the same graft;
8. the report: OUT/report.md.
`--shared DIR` takes the shards and the teacher's GenEval from another demo folder (ablations reuse them).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from common.files import save_json, save_text
from common.runtime import setup_logging
from data import shapes_data
from eval import fidelity
from models.teachers import SHAPES_TEACHER
from recipes import null_caption
from recipes.config import load_recipe
from recipes.demo_report import write_report
from recipes.distributed import free_port

log = logging.getLogger("demo")
RECIPE = Path(__file__).resolve().parent / "shapes_hyena_x.yaml"


class Runner:
    """Runs each step's command once: a step whose marker exists is skipped; durations go to `timings.json`."""

    def __init__(self, out: Path, nproc: int):
        self.out, self.nproc = out, nproc
        self.timings: dict[str, float] = {}
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                    "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}

    def torchrun(self, module: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc),
                "--master_port", str(free_port()), *module]

    def step(self, name: str, marker: Path, command: list[str], write_marker: bool = False,
             call: Callable[[list[str]], object] | None = None) -> None:
        """Run `command` unless `marker` exists (a file the step writes, or one written after it when
        `write_marker`). With `call`, the command is a module's CLI run in this process: `call(argv)`."""
        if marker.exists():
            log.info("%s: done already (%s)", name, marker)
            return
        print(f"\n[{name}] {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        if call is not None:
            call(command[3:])  # python -m MODULE ARGS…
        else:
            subprocess.run(command, check=True, env=self.env)
        self.timings[name] = time.perf_counter() - started
        if write_marker:
            save_text(f"{shlex.join(command)}\n", marker)
        save_json({**self._recorded(), **self.timings}, self.out / "timings.json")

    def _recorded(self) -> dict:
        path = self.out / "timings.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--shared", type=Path, help="take the shards and the teacher's GenEval from this demo folder "
                        "(default: OUT)")
    parser.add_argument("--teacher", type=Path, default=SHAPES_TEACHER, help="the teacher pipeline folder")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides (repeatable), e.g. --set stage2.steps=0 for stage 1 only")
    parser.add_argument("--students", help="`fresh`: skip stage 1 and finetune randomly initialised operators")
    parser.add_argument("--pairs", type=int, default=1024, help="teacher-generated training pairs")
    parser.add_argument("--val-pairs", type=int, default=64,
                        help="teacher-generated pairs held out from training: stage 1 picks its best students on them")
    parser.add_argument("--gen-steps", type=int, default=20, help="teacher sampling steps for the pairs")
    parser.add_argument("--cfg", type=float, default=4.5, help="guidance for the pairs and for GenEval")
    parser.add_argument("--nproc", type=int, default=2, help="processes for generation, training and GenEval")
    parser.add_argument("--eval-steps", type=int, default=20, help="sampling steps of GenEval (PixArt's 20)")
    parser.add_argument("--proxy", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the same graft on the 2K-shaped CPU proxy of eval/speed.py")
    parser.add_argument("--title", default="Grafting the shapes teacher: 50% of self-attention → Hyena-X")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    setup_logging()
    started = time.perf_counter()
    out, shared, teacher = args.out, args.shared or args.out, args.teacher
    run = Runner(out, args.nproc)
    py = sys.executable
    data = shared / "data"
    shards, val, null = data / "shards", data / "val", data / "null_caption.safetensors"
    graft_dir = out / "graft"
    overrides = [f"output_dir={graft_dir}", f"model.pretrained={teacher}", f"data.train={shards}",
                 f"data.val={val}", f"data.null_caption={null}", *args.overrides]
    recipe = load_recipe(args.recipe, overrides)  # a bad override fails here, before any work

    for split, pairs, seed in (("train", args.pairs, 1), ("val", args.val_pairs, 2)):
        prompts, folder = data / f"prompts_{split}.jsonl", shards if split == "train" else val
        run.step(f"prompts {split}", prompts, [py, "-m", "data.shapes_data", "prompts", "--split", "train", "--n",
                                               str(pairs), "--seed", str(seed), "--out", str(prompts)],
                 call=shapes_data.main)
        run.step(f"generate {split}", folder / "generate.done", run.torchrun([
            "-m", "data.generate", "--pipeline", str(teacher), "--prompts", str(prompts), "--out", str(folder),
            "--steps", str(args.gen_steps), "--cfg", str(args.cfg), "--batch-size", "32",
            "--shard-size", str(max(1, pairs // 16)), "--seed", str(1000 * seed)]), write_marker=True)
    run.step("null caption", null, [py, "-m", "recipes.null_caption", "--pipeline", str(teacher), "--out", str(null),
                                    "--max-length", str(recipe.data.reader.caption_tokens)], call=null_caption.main)
    train = ["-m", "recipes.train", str(args.recipe), *[a for o in overrides for a in ("--set", o)]]
    if args.students:
        train += ["--students", args.students]
    run.step("train", graft_dir / "export" / "model.safetensors", run.torchrun(train))
    geneval = ["-m", "eval.geneval.cli", "--world", "shapes", "--pipeline", str(teacher), "--batch-size", "32",
               "--cfg", str(args.cfg), "--steps", str(args.eval_steps)]
    teacher_eval, graft_eval = shared / "geneval_teacher", out / "geneval_graft"
    run.step("GenEval teacher", teacher_eval / "scores.json",
             run.torchrun([*geneval, "--ckpt", str(teacher), "--out", str(teacher_eval)]))
    run.step("GenEval graft", graft_eval / "scores.json",
             run.torchrun([*geneval, "--ckpt", str(graft_dir / "export"), "--out", str(graft_eval)]))
    run.step("fidelity", out / "fidelity" / "fidelity.json",
             [py, "-m", "eval.fidelity", "--reference", str(teacher_eval), "--candidate", str(graft_eval),
              "--world", "shapes", "--out", str(out / "fidelity")], call=fidelity.main)
    run.step("speed", out / "speed" / "speed.json",
             [py, "-m", "eval.speed", "--model", "full", "--device", "cpu", "--ckpt", str(teacher / "transformer"),
              "--grafted-ckpt", str(graft_dir / "export"), "--batch", "8", "--repeats", "10",
              "--sampling-repeats", "2", "--no-train-memory", "--out", str(out / "speed")])
    if args.proxy:  # the recipe's graft rule (e.g. every other block), not the export's block indexes: other depth
        rule = out / "speed_proxy" / "graft.yaml"
        save_text(yaml.safe_dump(recipe.graft, sort_keys=False), rule)
        run.step("speed proxy", out / "speed_proxy" / "speed.json",
                 [py, "-m", "eval.speed", "--model", "proxy", "--graft", str(rule),
                  "--warmup", "1", "--repeats", "3", "--sampling-repeats", "0", "--no-train-memory",
                  "--out", str(out / "speed_proxy")])
    report = write_report(out, shared, teacher, recipe, args.title, time.perf_counter() - started)
    print(report)
    return report


if __name__ == "__main__":
    main()
