"""Stage 1's relative-error floor set by the teacher's precision, on the tiny PixArt-Sigma graft (CPU bf16 autocast).

For each teacher precision, on held-out batches: how far its recorded targets sit from the fp32 teacher's (a
student that learned them perfectly is that far from the fp32 operator), how far exact copies of the teacher's
attention, run as bf16-mixed students, sit from the targets (the students' own compute floor), and the error that
fresh attention students (a self-graft, which can reach the floor) trained for `--steps` on those targets, cosine
lr, reach against the fp32 targets:

    python -m recipes.bench_precision --steps 2000
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common.tables import markdown_table
from recipes.config import load_recipe
from recipes.precision import Precision
from recipes.stage1 import VAL_SEED, Distiller, student_losses, teacher_records

RECIPE = Path(__file__).parent / "tiny_pixart_hyena_x.yaml"
SELF_GRAFT = "graft.grafts=[{type: mha, name: mha, config: {num_heads: 4, qkv_bias: true}, layers: {ratio: 0.5}}]"


def relative_error(outputs: list[dict], references: list[dict]) -> float:
    """‖a − b‖ / ‖b‖ over every batch and layer."""
    err = sum((o[p].double() - r[p].double()).square().sum() for o, r in zip(outputs, references) for p in o)
    ref = sum(r[p].double().square().sum() for r in references for p in r)
    return (err / ref).sqrt().item()


def held_out(d: Distiller, batches: int, precision: Precision) -> list[dict]:
    val = iter(d.batches("val"))
    return [teacher_records(d.teacher, d.tap, d.diffusion, next(val), torch.Generator().manual_seed(VAL_SEED + i),
                            d.dev, precision) for i in range(batches)]


def student_outputs(d: Distiller, records: list[dict]) -> list[dict]:
    with torch.no_grad():
        return [student_losses(d.engine, r, d.losses, d.cfg.huber_delta, d.precision.param_dtype)[1] for r in records]


def targets(records: list[dict]) -> list[dict]:
    return [{p: r[2] for p, r in batch.items()} for batch in records]


def distiller(out: str, teacher: str, steps: int, *extra: str) -> Distiller:
    sets = [f"output_dir={out}", "stage1.mode=split", "deepspeed.precision=bf16-mixed",
            f"stage1.teacher_precision={teacher}", f"stage1.steps={steps}", *extra]
    return Distiller(load_recipe(RECIPE, sets), 0, 1)


def measure(teacher: str, exact: list[dict], args: argparse.Namespace, out: str) -> list:
    """One row: the teacher's targets, exact copies' and trained students' errors (`exact`: the fp32 targets)."""
    d = distiller(out, teacher, args.steps, SELF_GRAFT, "stage1.optim.schedule=cosine")
    records = held_out(d, args.eval_batches, d.teacher_precision)
    target_floor = relative_error(targets(records), exact)

    copies = distiller(out, teacher, args.steps, SELF_GRAFT)  # students: the teacher's own attention
    for path in copies.paths:
        copies.bank.students[path.replace(".", "_")].load_state_dict(copies.teacher.get_submodule(path).state_dict())
    copy_records = held_out(copies, args.eval_batches, copies.teacher_precision)
    compute_floor = relative_error(student_outputs(copies, copy_records), targets(copy_records))

    train = iter(d.batches("train"))
    for step in range(args.steps):
        loss, _ = d.micro_step(next(train), torch.Generator().manual_seed(step))
        d.engine.backward(loss)
        d.engine.step()
    trained = relative_error(student_outputs(d, records), exact)
    return [teacher, target_floor, compute_floor, trained]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-batches", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        exact = targets(held_out(distiller(out, "fp32", args.steps), args.eval_batches, Precision("fp32")))
        rows = [measure(teacher, exact, args, out) for teacher in ("fp32", "bf16-mixed", "bf16")]
    print(f"\nStage-1 relative errors by teacher precision, tiny PixArt-Sigma (depth 4), bf16-mixed students, "
          f"{args.eval_batches} held-out batches, {torch.get_num_threads()} CPU threads\n")
    print(markdown_table(["teacher", "its targets vs fp32 teacher's", "exact-copy students vs targets",
                          f"trained students after {args.steps} steps vs fp32 targets"], rows))


if __name__ == "__main__":
    main()
