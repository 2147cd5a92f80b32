"""Stage-1 wall time: one targeted layer vs all targeted layers of the same model on the same data.

The paper's code distils each layer in its own job, re-running the teacher every time; here every student
learns from one shared teacher forward. This prints both times and the ratio, measured in one run:

    python -m recipes.bench_stage1 --preset tiny-2k-shaped --depth 8 --sample-size 64 --steps 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.tables import markdown_table
from models.diffusion import GaussianDiffusion
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from recipes.batches import SyntheticBatches
from recipes.config import OptimSection
from recipes.engine import LocalEngine
from recipes.precision import Precision
from recipes.stage1 import ActivationTap, StudentBank, student_losses, teacher_records

FP32 = Precision("fp32")


def time_distillation(teacher: PixArtSigma, spec: GraftSpec, paths: list[str], batches: list[dict],
                      warmup: int) -> float:
    """Median seconds per step (after warm-up) to distil the students at `paths` from shared teacher forwards."""
    grafts = spec.targets(teacher)
    torch.manual_seed(0)
    students = {p: op for p, op in spec.build_operators(teacher).items() if p in paths}
    bank = StudentBank(students, grafts)
    engine = LocalEngine(bank, OptimSection(lr=1e-3), len(batches), 1, 0, FP32, bank.param_groups())
    tap = ActivationTap(teacher, paths)
    losses = {p: "l1" for p in paths}
    diffusion = GaussianDiffusion()
    times = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        records = teacher_records(teacher, tap, diffusion, batch, torch.Generator().manual_seed(step),
                                  torch.device("cpu"), FP32)
        per_layer, _ = student_losses(engine, records, losses, 1.0)
        engine.backward(torch.stack(list(per_layer.values())).sum())
        engine.step()
        times.append(time.perf_counter() - started)
    for handle in tap.handles:
        handle.remove()
    return statistics.median(times[warmup:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-2k-shaped")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--sample-size", type=int, default=64, help="latent side (64 → 1,024 tokens)")
    parser.add_argument("--operator", default="hyena_x", help="students: a settings file in recipes/operators/")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = PixArtSigma(PixArtSigma.make_config(args.preset, depth=args.depth,
                                                            sample_size=args.sample_size)).eval().requires_grad_(False)
    spec = GraftSpec.from_settings(args.operator, {"ratio": 0.5})
    paths = sorted(spec.targets(teacher), key=lambda p: int(p.split(".")[1]))
    c = teacher.config
    source = SyntheticBatches("pixart", (c.in_channels, c.sample_size, c.sample_size), args.batch_size,
                              num_samples=args.batch_size * args.steps, seed=0, caption_tokens=c.model_max_length,
                              caption_channels=c.caption_channels)
    batches = [batch for _, batch in zip(range(args.steps), source)]
    one = time_distillation(teacher, spec, paths[:1], batches, args.warmup)
    every = time_distillation(teacher, spec, paths, batches, args.warmup)
    n = len(paths)
    tokens = c.base_size**2
    print(f"\nStage-1 step time, {args.preset} (depth {args.depth}, width {c.hidden_size}, {tokens} tokens), "
          f"batch {args.batch_size}, {args.operator} students, CPU fp32, "
          f"median of {args.steps - args.warmup} timed steps\n")
    print(markdown_table(
        ["students", "s / step", "× one-student step", f"{n} separate one-student jobs (s / step)",
         "speed-up of one shared forward"],
        [[1, one, 1.0, "", ""], [n, every, every / one, n * one, n * one / every]]))


if __name__ == "__main__":
    main()
