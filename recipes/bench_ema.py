"""The stage-2 EMA update's cost as a fraction of a training step, at DiT-XL/2 width (1152, 16 heads, 256 tokens).

Before: the previous implementation, kept here as the baseline: every trained parameter copied to fp32 on rank 0's
CPU and blended there one tensor at a time while the other ranks wait. After: `recipes.ema.EMA`, one fused lerp
over this rank's shard of the fp32 master weights, where they live. Both are timed on the same DeepSpeed engine
(one process, the tiny recipe's ZeRO stage) in one run, for fp32 weights and for pure bf16 weights (the previous
default on GPUs):

    python -m recipes.bench_ema --depth 4 --batch-size 2 --steps 5
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

from common.tables import markdown_table
from recipes.config import load_recipe
from recipes.distributed import init_process_group
from recipes.master import trainable

RECIPE = Path(__file__).parent / "tiny_dit_hyena_y.yaml"


class PreviousEMA:
    """The baseline: fp32 CPU shadows of every trained parameter on rank 0, blended one tensor at a time."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().cpu().clone() for n, p in trainable(module).items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().float().cpu(), 1 - self.decay)


def seconds(fn, repeats: int) -> float:
    """Seconds per call of `fn`, over `repeats` calls timed by torch.utils.benchmark (after its warm-up calls)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(repeats).median


def measure(precision: str, args: argparse.Namespace, out: str) -> list[list]:
    """Step, previous EMA and sharded EMA times for one precision."""
    from recipes.stage2 import Finetuner

    recipe = load_recipe(RECIPE, [f"output_dir={out}", "model.preset=DiT-XL-2-256x256", f"model.arch={{depth: "
                                  f"{args.depth}}}", f"data.reader.batch_size={args.batch_size}",
                                  f"deepspeed.precision={precision}", "stage2.ema_decay=0.9999"])
    finetuner = Finetuner(recipe, 0, 1, None)
    engine, batches = finetuner.engine, iter(finetuner.batches())

    def step() -> None:
        loss, _ = finetuner.micro_step(next(batches), torch.Generator().manual_seed(0))
        engine.backward(loss)
        engine.step()

    step_s = seconds(step, args.steps)
    previous = PreviousEMA(engine.module, 0.9999)
    before = seconds(lambda: previous.update(engine.module), args.steps)
    after = seconds(finetuner.ema.update, args.steps)
    trained = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    return [[precision, f"{trained / 1e6:.1f} M", f"ZeRO-{recipe.deepspeed.zero_stage}", label, 1e3 * ema,
             1e3 * step_s, ema / step_s]
            for label, ema in (("previous (rank-0 CPU copy, per tensor)", before),
                               ("sharded fp32 master, fused lerp", after))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="DiT-XL/2 blocks (28 in the real model)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    init_process_group()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for precision in args.precision:
            rows += measure(precision, args, out)
    print(f"\nEMA update vs stage-2 step, DiT-XL/2 width, depth {args.depth}, batch {args.batch_size}, 256 tokens, "
          f"1 CPU process, {torch.get_num_threads()} threads, mean of {args.steps} calls\n")
    print(markdown_table(["weights", "trained params", "DeepSpeed", "EMA", "EMA ms", "step ms", "EMA / step"], rows))


if __name__ == "__main__":
    main()
