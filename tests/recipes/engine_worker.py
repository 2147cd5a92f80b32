"""Run by tests/recipes/test_engine.py under torchrun (2 CPU processes, gloo): DeepSpeed engines at every ZeRO
stage and precision, checked for per-student clipping, fp32 master weights and the sharded EMA. Rank 0 writes
what it measured to the JSON file named on the command line; the test asserts on it.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.recipes.engine_worker OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from recipes.config import load_recipe
from recipes.distributed import init_process_group
from tests.conftest import REPO

CASES = [(0, "bf16-mixed"), (1, "bf16-mixed"), (2, "bf16-mixed"), (3, "bf16-mixed"), (1, "bf16"), (2, "bf16"),
         (3, "bf16"), (2, "fp32")]


class Pair(nn.Module):
    """Two independent students."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def engine_for(zero: int, precision: str, per_student: bool, world: int):
    from recipes.engine import deepspeed_engine

    recipe = load_recipe(REPO / "recipes" / "tiny_dit_hyena_y.yaml",
                         [f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}"])
    optim = recipe.stage1.optim
    optim.lr, optim.warmup_steps, optim.grad_clip = 1e-2, 0, 1.0
    torch.manual_seed(0)
    module = Pair()
    groups = {"a": list(module.a.parameters()), "b": list(module.b.parameters())} if per_student else None
    return deepspeed_engine(module, recipe, optim, total_steps=10, world_size=world, batch_size=2, groups=groups)


def train(engine, blow_up: float, rank: int, steps: int, ema=None) -> list[dict[str, torch.Tensor]]:
    """`steps` steps on fixed per-rank inputs, student a's loss × `blow_up`; the full masters after each step."""
    from recipes.master import master_state_dict

    dtype = next(engine.module.parameters()).dtype
    history = []
    for step in range(steps):
        x = torch.randn(2, 16, generator=torch.Generator().manual_seed(100 * step + rank)).to(dtype)
        a, b = engine(x)
        loss = blow_up * a.float().square().mean() + b.float().square().mean()
        engine.backward(loss)
        engine.step()
        if ema is not None:
            ema.update()
        history.append(master_state_dict(engine, engine.module))
    return history


def check(zero: int, precision: str, rank: int, world: int) -> dict:
    """Every rank runs the engines (their gathers are collective); rank 0 compares what it gathered."""
    from deepspeed.utils import safe_get_full_fp32_param

    from recipes.ema import EMA
    from recipes.master import master_state_dict

    plain = train(engine_for(zero, precision, True, world), 1.0, rank, 1)[-1]
    spiked_engine = engine_for(zero, precision, True, world)
    spiked = train(spiked_engine, 1e6, rank, 1)[-1]
    globally = train(engine_for(zero, precision, False, world), 1e6, rank, 1)[-1]

    engine = engine_for(zero, precision, True, world)  # master weights and the EMA over 3 steps
    ema = EMA(engine, engine.module, decay=0.5)
    seen = []
    engine.module.a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    start = master_state_dict(engine, engine.module)
    history = train(engine, 1.0, rank, 3, ema)
    masters = master_state_dict(engine, engine.module)
    official = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    full = ema.full_state_dict()
    resumed = EMA(engine, engine.module, decay=0.5)
    resumed.load_state_dict(ema.state_dict())
    reloaded = resumed.full_state_dict()
    if rank:
        return {}

    norms = spiked_engine.lr_scheduler.optimizer.norms
    result = {"norm_a": float(norms["a"]), "norm_b": float(norms["b"]),
              "b_unchanged_by_a": all(torch.equal(plain[n], spiked[n]) for n in plain if n.startswith("b.")),
              "a_changed": not torch.equal(plain["a.weight"], spiked["a.weight"]),
              "global_clip_moves_b": not torch.equal(plain["b.weight"], globally["b.weight"])}
    torch.manual_seed(0)  # b's gradient averaged over both ranks' inputs, in one process, in fp32
    reference = Pair()
    for r in range(world):
        x = torch.randn(2, 16, generator=torch.Generator().manual_seed(r))
        (reference.b(x).square().mean() / world).backward()
    result["reference_norm_b"] = torch.cat([p.grad.flatten() for p in reference.b.parameters()]).norm().item()

    # master weights: what DeepSpeed's own API reads, and not the module's (rounded) copy under bf16
    result["master_is_deepspeeds"] = all(official[n] is None or torch.equal(masters[n], official[n].cpu())
                                         for n in masters)
    result["master_dtype"] = str(masters["a.weight"].dtype)
    result["param_dtype"] = str(next(engine.module.parameters()).dtype)
    result["activation_dtype"] = str(seen[0])  # inside the engine's forward: DeepSpeed's autocast
    expected = {n: v.clone() for n, v in start.items()}
    for state in history:
        for n in expected:
            expected[n].lerp_(state[n], 0.5)
    result["ema_exact"] = all(torch.equal(full[n], expected[n]) for n in expected)
    result["ema_shard_numel"] = sum(s.values.numel() for s in ema.shards.values())
    result["param_numel"] = sum(v.numel() for v in expected.values())
    result["ema_reloads"] = all(torch.equal(reloaded[n], full[n]) for n in full)
    return result


def main() -> None:
    rank, world = init_process_group()
    results = {f"zero{zero}-{precision}": check(zero, precision, rank, world) for zero, precision in CASES}
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
