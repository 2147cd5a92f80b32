"""`python eval/speed.py --parallel-pairs`: a transformer's sequential blocks against the same blocks restructured
into parallel pairs (models.parallel_blocks, the paper's §7 depth-to-width case study), timed in one process.

Three models, random weights (latency does not depend on the values), the same inputs:
- `sequential`: the model as built, every block after the previous one (DiT-XL/2: 28);
- `parallel`: every pair of blocks (2i, 2i + 1) restructured into one fused parallel block (14 in sequence), the
  branches' projections as batched GEMMs and their attention as one call (what the graft builds);
- `parallel, unfused`: the same function computed branch by branch with the original blocks (`UnfusedPair`), which
  shows what the fusion buys; its output is checked against the fused model's before timing.
Forward passes only (inference mode), timed in interleaved rounds (`eval.measure`). FLOPs come from torch's
counter on the meta device: the pairs add only the merge projections (2 · tokens · 2d · d per pair).

Without CUDA it times a CPU proxy with the full model's depth and token count at width 384 (6 heads), fp32: DiT-XL/2's
28 blocks and 256 tokens (PixArt-Sigma XL/2 at 256²: the same), and says so.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
from collections.abc import Callable

import torch
from torch import nn

from common.config import parse_assignments
from common.tables import markdown_table
from eval.flops import counted_flops
from eval.inputs import random_inputs
from eval.measure import Ratio, time_alternating
from models.dit import DiT
from models.graft import GraftSpec
from models.parallel_blocks import unfused_pairs
from models.pixart import PixArtSigma
from models.pretrained import PretrainedModel

log = logging.getLogger("speed")

FAMILIES: dict[str, type[PretrainedModel]] = {"dit": DiT, "pixart": PixArtSigma}
PRESETS = {"dit": "DiT-XL-2-256x256", "pixart": "PixArt-Sigma-XL-2-256x256"}
PROXY = dict(hidden_size=384, num_heads=6)  # the CPU stand-in's width: DiT-S's
PAIRS = GraftSpec.from_dict({"grafts": [{"type": "blocks", "name": "parallel_pair", "layers": {"ratio": 1.0}}]})
REPORT = "parallel_pairs"  # {REPORT}.json and {REPORT}.md in --out


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """sequential, parallel (fused), parallel unfused: three models computing from the same weights."""
    fused = copy.deepcopy(model)
    PAIRS.apply(fused)
    return {"sequential": model, "parallel": fused, "parallel, unfused": unfused_pairs(model, fused)}


def meta_flops(family: str, config, batch: int) -> dict[str, int]:
    """Forward FLOPs of each variant at `batch`, from torch's counter on the meta device."""
    with torch.device("meta"):
        models = variants(FAMILIES[family](config).eval())
        example = random_inputs(config, batch, torch.device("meta"), torch.float32)
    return {name: counted_flops(model, *example) for name, model in models.items()}


def measure(args: argparse.Namespace, kind: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Build the three models, check they agree, time each batch size; returns the report as a dict."""
    family = args.family
    overrides = {**(PROXY if kind == "proxy" else {}), **parse_assignments(args.arch, "--arch", "depth=12")}
    config = FAMILIES[family].make_config(args.preset or PRESETS[family], **overrides)
    torch.manual_seed(0)
    models = {name: m.to(device, dtype) for name, m in variants(FAMILIES[family](config).eval()).items()}
    depths = {name: len(m.blocks) for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    batches = args.batch or ([1, 8, 64] if device.type == "cuda" else [1, 4])
    results = []
    with torch.inference_mode():
        check = random_inputs(config, 1, device, dtype)
        fused, reference = models["parallel"](*check).double(), models["parallel, unfused"](*check).double()
        agreement = ((fused - reference).abs().max() / reference.abs().max()).item()
        log.info("fused vs unfused parallel pairs: max relative difference %.2e (%s)", agreement, dtype)
        for batch in batches:
            example = random_inputs(config, batch, device, dtype)

            def forward(model: nn.Module) -> Callable[[], object]:
                return lambda: model(*example)

            timings = time_alternating({n: forward(m) for n, m in models.items()}, device, args.warmup,
                                       args.repeats, f"batch {batch}")
            times = {name: t.wall for name, t in timings.items()}
            flops = meta_flops(family, config, batch)
            for name in models:
                ratio = Ratio.of(times["sequential"], times[name])
                results.append({"batch": batch, "name": name, "sequential_blocks": depths[name], "params": params[name],
                                "forward_s": times[name], "forward_median_s": statistics.median(times[name]),
                                "speedup": ratio.median, "speedup_range": [ratio.low, ratio.high],
                                "forward_flops": flops[name]})
    return {
        "setup": {
            "family": family, "model": kind, "preset": args.preset or PRESETS[family], "overrides": overrides,
            "depth": config.depth, "hidden_size": config.hidden_size, "num_heads": config.num_heads,
            "tokens": config.num_tokens, "dtype": str(dtype), "batches": batches, "warmup": args.warmup,
            "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "load_average": os.getloadavg(), "fused_vs_unfused_max_rel_diff": agreement,
        },
        "rows": results,
    }


def markdown_report(report: dict) -> str:
    """A heading that says what ran, one table row per batch and model."""
    s = report["setup"]
    lines = []
    if s["model"] == "proxy":
        lines += [f"**CPU PROXY — not {s['preset']}.** Its depth ({s['depth']}) and tokens ({s['tokens']}) at width "
                  f"{s['hidden_size']} ({s['num_heads']} heads). Real numbers need a GPU.", ""]
    load = ", ".join(f"{x:.1f}" for x in s["load_average"])
    lines += [f"{s['family']} `{s['preset']}` ({s['depth']} blocks, width {s['hidden_size']}, {s['tokens']} tokens), "
              f"{s['device']}, {s['dtype'].removeprefix('torch.')}, {s['threads']} threads, random weights; medians "
              f"over {s['repeats']} interleaved rounds after {s['warmup']} warm-up passes; load average {load} at the "
              f"end. Fused and unfused pairs agree to {s['fused_vs_unfused_max_rel_diff']:.1e} (max relative).", "",
              markdown_table(["batch", "model", "blocks in sequence", "forward ms", "speed-up (range)", "GFLOP",
                              "params (M)"], [
                  [r["batch"], r["name"], r["sequential_blocks"], f"{r['forward_median_s'] * 1e3:.1f}",
                   f"{r['speedup']:.2f}× ({r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f})",
                   f"{r['forward_flops'] / 1e9:.4g}", f"{r['params'] / 1e6:.1f}"] for r in report["rows"]],
                  align="rlrrrrr"), "",
              "Speed-up: median over rounds of sequential time / this model's time in the same round (range: the "
              "lowest and highest of those ratios)."]
    return "\n".join(lines)
