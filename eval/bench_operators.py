"""Latency and FLOPs of every operator vs sequence length: where the paper's cheaper operators start to pay off.

    python -m eval.bench_operators --lengths 256 1024 4096 --width 1152 --heads 16 --device cuda --dtype bfloat16

Prints a Markdown table (forward GFLOPs counted analytically, forward+backward latency as the median over
`--repeats` timed runs after warm-up) with both ratios to `mha` at the same length; `--json` also saves the rows.
Operator settings are the paper's YAMLs at the chosen width; the length-tied operators (Hyena, MLP Hyena-X) get
`l_max` equal to the length.
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
from models.operators import build, operator_info

log = logging.getLogger(__name__)

SWA_WINDOW = (4, 4)
MAMBA2 = dict(d_state=64, d_conv=4, expand=2, headdim=16)  # the paper's mamba2.yaml
HYENA_KERNEL = 4
MLP_RATIO = 4
MLP_HYENA_X_RATIO = 2
OPERATORS = ["mha", "swa", "hyena_se", "hyena_x", "hyena_y", "mamba2", "mlp", "mlp_hyena_x"]


def operator_config(name: str, width: int, heads: int, length: int) -> dict:
    """The paper's config for `name` at this width (and, for length-tied operators, this length)."""
    configs = {
        "mha": dict(dim=width, num_heads=heads, qkv_bias=True),
        "swa": dict(embed_dim=width, num_heads=heads, window_size=SWA_WINDOW),
        "hyena_se": dict(d_model=width, l_max=length),
        "hyena_x": dict(d_model=width, l_max=length),
        "hyena_y": dict(d_model=width, l_max=length),
        "mamba2": dict(d_model=width, **MAMBA2),
        "mlp": dict(d_model=width, expansion_ratio=MLP_RATIO),
        "mlp_hyena_x": dict(d_model=width, l_max=length, expansion_ratio=MLP_HYENA_X_RATIO),
    }
    return configs[name]


def _attention_flops(n: int, d: int, keys: int) -> int:
    return 8 * n * d * d + 4 * n * keys * d  # q, k, v, out projections + scores and weighted sum


def _hyena_flops(n: int, d: int, short: bool, inner: bool) -> int:
    convs = 2 * HYENA_KERNEL * n * (3 * d * short + d * inner)
    return 2 * n * d * 3 * d + 2 * n * d * d + convs


def _mamba2_flops(n: int, d: int) -> int:
    inner, state = MAMBA2["expand"] * d, MAMBA2["d_state"]
    heads = inner // MAMBA2["headdim"]
    projections = 2 * n * d * (2 * inner + 2 * state + heads) + 2 * n * inner * d
    conv = 2 * MAMBA2["d_conv"] * (inner + 2 * state) * n
    return projections + conv + 2 * 2 * n * inner * state  # scan: state update + read-out, per token


def _mlp_hyena_x_flops(n: int, d: int) -> int:
    hidden = MLP_HYENA_X_RATIO * d
    return 2 * n * d * 3 * hidden + 2 * n * hidden * d + 2 * HYENA_KERNEL * n * 3 * hidden  # conv: N channels


FLOPS = {
    "mha": lambda n, d: _attention_flops(n, d, keys=n),
    "swa": lambda n, d: _attention_flops(n, d, keys=min(n, SWA_WINDOW[0] + SWA_WINDOW[1] + 1)),
    "hyena_se": lambda n, d: _hyena_flops(n, d, short=True, inner=True),
    "hyena_x": lambda n, d: _hyena_flops(n, d, short=True, inner=False),
    "hyena_y": lambda n, d: _hyena_flops(n, d, short=False, inner=True),
    "mamba2": _mamba2_flops,
    "mlp": lambda n, d: 2 * 2 * n * d * MLP_RATIO * d,
    "mlp_hyena_x": _mlp_hyena_x_flops,
}


def forward_flops(name: str, batch: int, length: int, width: int) -> int:
    """Analytic forward FLOPs: matmuls 2·MACs, attention core 4·N·keys·D, depthwise convs 2·K·C·N.

    Elementwise work (gates, softmax, norms, activations) is left out. Mamba-2's scan is counted in its
    recurrent form (2·2·N·d_inner·d_state), not the extra work of the chunked algorithm.
    """
    if name not in FLOPS:
        raise ValueError(f"no FLOP count for operator {name!r}; known: {sorted(FLOPS)}")
    return batch * FLOPS[name](length, width)


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


def benchmark(lengths: list[int], width: int, heads: int, batch: int, device: str, dtype: torch.dtype,
              warmup: int, repeats: int) -> list[Row]:
    """Measure every operator at every length; ratios are relative to `mha` at the same length."""
    measured = {}  # (length, operator) → (GFLOPs, ms)
    jobs = [(length, name) for length in lengths for name in OPERATORS]
    for length, name in tqdm(jobs, desc="operators", unit="op"):
        torch.manual_seed(0)
        op = build(name, **operator_config(name, width, heads, length)).to(device=device, dtype=dtype)
        x = torch.randn(batch, length, width, device=device, dtype=dtype, requires_grad=True)
        call = op if operator_info(name).replaces == "mlp" else functools.partial(op, hw=(1, length))
        ms = time_forward_backward(op, call, x, warmup, repeats) * 1e3
        measured[length, name] = (forward_flops(name, batch, length, width) / 1e9, ms)
        log.debug("%s @ %d tokens: %.2f ms", name, length, ms)
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
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--width", type=int, default=1152, help="model width d (DiT-XL/2: 1152)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads for mha / swa (DiT-XL/2: 16)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    log.info("width %d, %d heads, batch %d, %s %s, lengths %s", args.width, args.heads, args.batch, args.device,
             dtype_name, args.lengths)
    rows = benchmark(args.lengths, args.width, args.heads, args.batch, args.device, getattr(torch, dtype_name),
                     args.warmup, args.repeats)
    print(rows_table(rows))
    if args.json is not None:
        setup = {"width": args.width, "heads": args.heads, "batch": args.batch, "device": args.device,
                 "dtype": dtype_name, "warmup": args.warmup, "repeats": args.repeats}
        args.json.write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
        log.info("wrote %s", args.json)
    return rows


if __name__ == "__main__":
    main()
