"""Latency and FLOPs of every operator vs sequence length: where the paper's cheaper operators start to pay off.

    python -m eval.bench_operators --lengths 256 1024 4096 --width 1152 --device cuda --dtype bfloat16

Prints a Markdown table (forward GFLOPs, each operator's own analytic count `forward_flops`; forward+backward
latency as the median over `--repeats` timed rounds after warm-up) with both ratios to `mha` at the same length;
`--json` also saves the rows. At each length the operators are timed in turn, round after round (`eval.measure`),
and the time ratio to `mha` is the median of the per-round ratios (with its range), so that load from other jobs
cancels. On the CPU `--clock cpu` reports process CPU time instead of the wall clock (the other clock's ratio is
the last column): on a shared machine it is far less disturbed by other jobs. Operators run with their settings files
(`recipes/operators/`, the paper's YAMLs; `--operators` picks some) at the chosen width; an operator tied to the
token count (MLP Hyena-X) gets `l_max` equal to the length. `--compile` runs each under torch.compile.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.tables import markdown_table
from eval.measure import Ratio, time_alternating, warn_cpu_clock_threads
from models import compile as compiling
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


def forward_backward(op: torch.nn.Module, call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                     ) -> Callable[[], None]:
    """One forward + backward (gradients w.r.t. input and parameters), as a call to time."""
    grad = torch.randn_like(x)

    def step() -> None:
        op.zero_grad(set_to_none=True)
        x.grad = None
        call(x).backward(grad)

    return step


@dataclass
class Row:
    """One table line: forward GFLOPs and fwd+bwd milliseconds of an operator (on `clock`), and both as ratios to
    mha (the time ratio with its lowest and highest round, and on the other clock where it was measured)."""

    operator: str
    length: int
    gflops: float
    ms: float
    flops_vs_mha: float
    time_vs_mha: float
    time_vs_mha_low: float
    time_vs_mha_high: float
    other_clock_time_vs_mha: float | None
    clock: str = "wall"


def benchmark(operators: list[str], lengths: list[int], width: int, heads: int | None, batch: int, device: str,
              dtype: torch.dtype, warmup: int, repeats: int, compile: bool = False, clock: str = "wall"
              ) -> list[Row]:
    """Measure every operator (settings name) at every length; ratios are relative to `mha` at the same length."""
    rows = []
    for length in lengths:
        steps, gflops = {}, {}
        for settings in operators:
            torch.manual_seed(0)
            name = settings_operator(settings)
            op = build(name, **operator_config(settings, width, length, heads)).to(device=device, dtype=dtype)
            if compile:
                compiling.for_training(op)
            x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
            call = op if operator_info(name).replaces == "mlp" else functools.partial(op, hw=(1, length))
            steps[settings] = forward_backward(op, call, x)
            gflops[settings] = batch * op.forward_flops(length) / 1e9
        times = time_alternating(steps, torch.device(device), warmup, repeats, f"{length} tokens")
        other = "wall" if clock == "cpu" else "cpu"
        for settings in operators:
            main = Ratio.of(getattr(times[settings], clock), getattr(times["mha"], clock))
            second = Ratio.of(getattr(times[settings], other) or [], getattr(times["mha"], other) or [])
            ms = statistics.median(getattr(times[settings], clock)) * 1e3
            rows.append(Row(settings, length, gflops[settings], ms, gflops[settings] / gflops["mha"], main.median,
                            main.low, main.high, second.median if second else None, clock))
    return rows


def rows_table(rows: list[Row]) -> str:
    """One line per (length, operator), grouped by length."""
    second = any(r.other_clock_time_vs_mha is not None for r in rows)
    cpu = rows[0].clock == "cpu"
    return markdown_table(
        ["tokens", "operator", "fwd GFLOP", "FLOPs / mha", "fwd+bwd ms" + (" (CPU time)" if cpu else ""),
         "time / mha (range)", *([("wall" if cpu else "CPU") + " time / mha"] if second else [])],
        [[r.length, r.operator, f"{r.gflops:.3f}", f"{r.flops_vs_mha:.2f}", f"{r.ms:.2f}",
          f"{r.time_vs_mha:.2f} ({r.time_vs_mha_low:.2f}–{r.time_vs_mha_high:.2f})",
          *([f"{r.other_clock_time_vs_mha:.2f}"] if second else [])] for r in rows],
        align="rlrrrr" + ("r" if second else ""))


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
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--compile", action="store_true", help="run every operator under torch.compile")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU only: report process CPU time instead of the wall clock")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if "mha" not in args.operators:
        parser.error("the ratios are to mha: include it in --operators")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    warn_cpu_clock_threads(args.clock)
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    log.info("width %d, heads %s, batch %d, %s %s, %d threads, lengths %s%s", args.width, args.heads or "as set",
             args.batch, args.device, dtype_name, torch.get_num_threads(), args.lengths,
             ", compiled" if args.compile else "")
    rows = benchmark(args.operators, args.lengths, args.width, args.heads, args.batch, args.device,
                     getattr(torch, dtype_name), args.warmup, args.repeats, args.compile,
                     args.clock if not args.device.startswith("cuda") else "wall")
    print(rows_table(rows))
    if args.json is not None:
        setup = {"width": args.width, "heads": args.heads, "batch": args.batch, "device": args.device,
                 "dtype": dtype_name, "warmup": args.warmup, "repeats": args.repeats,
                 "threads": torch.get_num_threads(), "compile": args.compile, "clock": args.clock,
                 "settings": {name: load_settings(name) for name in args.operators}}
        args.json.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
        log.info("wrote %s", args.json)
    return rows


if __name__ == "__main__":
    main()
