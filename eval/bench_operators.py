"""Latency and FLOPs of every operator vs sequence length: where the paper's cheaper operators start to pay off.

    python -m eval.bench_operators --lengths 256 1024 4096 --width 1152 --device cuda --dtype bfloat16

Prints a Markdown table (forward GFLOPs, each operator's own analytic count `forward_flops`; forward+backward
latency as the median over `--repeats` timed runs after warm-up) with both ratios to `mha` at the same length;
`--json` also saves the rows. Operators run with their settings files (`recipes/operators/`, the paper's YAMLs;
`--operators` picks some) at the chosen width; an operator tied to the token count (MLP Hyena-X) gets `l_max`
equal to the length.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.tables import markdown_table
from models.operators import build, load_settings, operator_info, settings_names, settings_operator, with_length

log = logging.getLogger(__name__)

HEADED = ("mha", "swa")  # operators whose `num_heads` is attention heads (--heads applies to them)


def default_operators() -> list[str]:
    """Every settings file: mha first (the reference), then the other token mixers, then the channel mixers."""
    def order(settings: str) -> tuple[bool, bool, str]:
        name = settings_operator(settings)
        return operator_info(name).replaces == "mlp", name != "mha", settings

    return sorted(settings_names(), key=order)


def operator_config(settings: str, width: int, length: int, heads: int | None = None) -> dict:
    """The config of settings file `settings` at this width and length (and with `heads`, if given), filled in as
    graft surgery fills it."""
    name = settings_operator(settings)
    config = load_settings(settings) | {operator_info(name).width_key: width}
    if heads is not None and name in HEADED:
        config["num_heads"] = heads
    return with_length(name, config, length)


def time_forward_backward(op: torch.nn.Module, call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                          warmup: int, repeats: int) -> float:
    """Median seconds of one forward + backward (gradients w.r.t. input and parameters)."""
    grad = torch.randn_like(x)

    def step() -> None:
        op.zero_grad(set_to_none=True)
        x.grad = None
        call(x).backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Row:
    """One table line: forward GFLOPs and fwd+bwd milliseconds of an operator, and both as ratios to mha."""

    operator: str
    length: int
    gflops: float
    ms: float
    flops_vs_mha: float
    time_vs_mha: float


def benchmark(operators: list[str], lengths: list[int], width: int, heads: int | None, batch: int, device: str,
              dtype: torch.dtype, warmup: int, repeats: int) -> list[Row]:
    """Measure every operator (settings name) at every length; ratios are relative to `mha` at the same length."""
    measured = {}  # (length, settings) → (GFLOPs, ms)
    jobs = [(length, settings) for length in lengths for settings in operators]
    for length, settings in tqdm(jobs, desc="operators", unit="op"):
        torch.manual_seed(0)
        name = settings_operator(settings)
        op = build(name, **operator_config(settings, width, length, heads)).to(device=device, dtype=dtype)
        x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
        call = op if operator_info(name).replaces == "mlp" else functools.partial(op, hw=(1, length))
        ms = time_forward_backward(op, call, x, warmup, repeats) * 1e3
        measured[length, settings] = (batch * op.forward_flops(length) / 1e9, ms)
        log.debug("%s @ %d tokens: %.2f ms", settings, length, ms)
    rows = []
    for (length, name), (gflops, ms) in measured.items():
        mha_gflops, mha_ms = measured[length, "mha"]
        rows.append(Row(name, length, gflops, ms, gflops / mha_gflops, ms / mha_ms))
    return rows


def rows_table(rows: list[Row]) -> str:
    """One line per (length, operator), grouped by length."""
    return markdown_table(["tokens", "operator", "fwd GFLOP", "FLOPs / mha", "fwd+bwd ms", "time / mha"],
                          [[r.length, r.operator, f"{r.gflops:.3f}", f"{r.flops_vs_mha:.2f}", f"{r.ms:.2f}",
                            f"{r.time_vs_mha:.2f}"] for r in rows], align="rlrrrr")


def main(argv: list[str] | None = None) -> list[Row]:
    """Command line: benchmark, print the table, optionally save JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operators", nargs="+", default=default_operators(), choices=settings_names(),
                        metavar="SETTINGS", help="settings files of recipes/operators/ (default: all)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--width", type=int, default=1152, help="model width d (DiT-XL/2: 1152)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads for mha / swa (default: their settings', DiT-XL/2's 16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if "mha" not in args.operators:
        parser.error("the ratios are to mha: include it in --operators")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    log.info("width %d, heads %s, batch %d, %s %s, lengths %s", args.width, args.heads or "as set", args.batch,
             args.device, dtype_name, args.lengths)
    rows = benchmark(args.operators, args.lengths, args.width, args.heads, args.batch, args.device,
                     getattr(torch, dtype_name), args.warmup, args.repeats)
    print(rows_table(rows))
    if args.json is not None:
        setup = {"width": args.width, "heads": args.heads, "batch": args.batch, "device": args.device,
                 "dtype": dtype_name, "warmup": args.warmup, "repeats": args.repeats,
                 "settings": {name: load_settings(name) for name in args.operators}}
        args.json.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
        log.info("wrote %s", args.json)
    return rows


if __name__ == "__main__":
    main()
