"""Speed of a grafted PixArt-Sigma against its baseline at 2048²: one forward pass and full 20-step sampling.

    python eval/speed.py                                  # CUDA: XL/2 2K, batch 2, bf16, 50% Hyena-X (odd blocks)
    python eval/speed.py --graft my_graft.yaml --ckpt weights/pixart_sigma_2k/transformer --out runs/speed

Both models are built and timed in the same process (CUDA events on a GPU), after warm-up, in rounds that time
baseline then grafted back to back. Latencies are medians over rounds; speed-ups are the median over rounds of
the paired ratio, which cancels load that drifts between rounds (it does on shared CPU machines). Random
weights are used unless `--ckpt` is given: latency does not depend on the values. Captions are random T5-sized
features, the model's `model_max_length` tokens (300 for PixArt-Sigma), mask all ones. Sampling is
`models.sampling.sample_pixart` (DPM-Solver++, CFG 4.5, so each step runs the transformer on 2 × batch); T5 and
the VAE decode are not timed. The FLOP-bound speed-up is the ratio of analytic forward FLOPs (`eval.flops`), which
every run checks against torch's FLOP counter on the meta device.

Without CUDA it runs a "2K-shaped" CPU proxy (width 288, 4 heads of 72, depth 4, 4,096 tokens, fp32): the same
tokens-to-width ratio as XL/2 at 2048² (16,384 / 1,152 ≈ 14.2), hence a similar attention share of the FLOPs.
It says so in its output; its numbers are not the paper's 1.43×.
"""
from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.files import save_json, save_text
from common.runtime import parse_dtype, pick_device, setup_logging
from common.tables import markdown_table
from eval.flops import meta_forward_flops, pixart_forward_flops
from models.graft import GraftSpec
from models.operators.kernels import backend_summary, backends
from models.pixart import PixArtConfig, PixArtSigma
from models.sampling import sample_pixart

log = logging.getLogger("speed")

FULL_PRESET = "PixArt-Sigma-XL-2-2K-MS"  # runs at its trained 256² latent = 2048² pixels, 16,384 tokens
PROXY_OVERRIDES = dict(hidden_size=288, num_heads=4, depth=4, sample_size=128)  # 4,096 tokens: 4096 / 288 ≈ 14.2
DEFAULT_GRAFT = ("hyena_x", {"ratio": 0.5, "pattern": "interleaved"})  # operator settings, blocks
TIMESTEP = 500  # any timestep costs the same
NOT_COMPARED = {"model_max_length"}  # T5's prompt length, not the transformer's; diffusers folders do not store it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graft", type=Path, help="graft spec YAML (default: 50%% interleaved Hyena-X on mha)")
    parser.add_argument("--ckpt", type=Path, help="baseline transformer weights (diffusers folder or .pth); "
                        "default random")
    parser.add_argument("--grafted-ckpt", type=Path, help="grafted export folder (its graft.yaml is the graft)")
    parser.add_argument("--model", choices=["auto", "full", "proxy"], default="auto",
                        help="full = XL/2 2K at 2048²; proxy = the 2K-shaped CPU stand-in; auto = full on CUDA")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes per model")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--sampling-repeats", type=int, default=3, help="timed sampling runs per model (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("runs/speed"), help="folder for speed.json and speed.md")
    return parser.parse_args(argv)


@dataclass
class Measurement:
    """One model's timings (seconds, every repeat), analytic forward FLOPs at the timed batch, and the backend
    every module with an optional kernel ran on (module path → backend, and a one-line summary)."""

    name: str
    forward_s: list[float]
    sampling_s: list[float]
    forward_flops: int
    flops_by_component: dict[str, int]
    backends: dict[str, str]
    backend_summary: str

    @property
    def forward_median(self) -> float:
        return statistics.median(self.forward_s)

    @property
    def sampling_median(self) -> float | None:
        return statistics.median(self.sampling_s) if self.sampling_s else None


def paired_speedup(baseline_s: list[float], other_s: list[float]) -> float | None:
    """Median over rounds of baseline time / other time (both timed in the same round)."""
    return statistics.median(b / o for b, o in zip(baseline_s, other_s)) if other_s else None


def model_config(kind: str) -> PixArtConfig:
    """XL/2 2K, or the 2K-shaped proxy of it."""
    return PixArtSigma.make_config(FULL_PRESET, **(PROXY_OVERRIDES if kind == "proxy" else {}))


def build_models(args: argparse.Namespace, config: PixArtConfig, device: torch.device, dtype: torch.dtype
                 ) -> tuple[PixArtSigma, PixArtSigma, GraftSpec]:
    """Baseline and grafted transformer: a deep copy of the baseline with the graft applied, or `--grafted-ckpt`
    (which must have the baseline's config: FLOPs and inputs come from the baseline's)."""
    if args.model == "proxy" and (args.ckpt or args.grafted_ckpt):
        raise SystemExit("--ckpt / --grafted-ckpt need the full-size model (--model full, a GPU); the CPU proxy "
                         "has another width and runs random weights")
    torch.manual_seed(0)
    if args.ckpt:
        baseline = PixArtSigma.from_pretrained(args.ckpt, preset=FULL_PRESET, dtype=dtype).to(device)
    else:
        with torch.device(device):
            baseline = PixArtSigma(config).to(dtype).eval()
    if args.grafted_ckpt:
        if args.graft:
            raise SystemExit("give --graft or --grafted-ckpt, not both: the export folder carries its graft.yaml")
        grafted = PixArtSigma.from_pretrained(args.grafted_ckpt, dtype=dtype).to(device)
        if grafted.graft is None:
            raise SystemExit(f"{args.grafted_ckpt} holds no graft.yaml; it is not a grafted export folder")
        check_same_config(baseline.config, grafted.config, args.grafted_ckpt)
        return baseline, grafted, grafted.graft
    spec = GraftSpec.from_yaml(args.graft) if args.graft else GraftSpec.from_settings(*DEFAULT_GRAFT)
    spec = spec.with_width(config.hidden_size)
    grafted = copy.deepcopy(baseline)
    spec.apply(grafted)
    return baseline, grafted, grafted.graft


def check_same_config(baseline: PixArtConfig, grafted: PixArtConfig, where: Path) -> None:
    """Refuse a grafted model of another architecture: its FLOPs and inputs would be the baseline's."""
    ours, theirs = asdict(baseline), asdict(grafted)
    differ = [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours if k not in NOT_COMPARED and ours[k] != theirs[k]]
    if differ:
        raise SystemExit(f"{where} has another config than the baseline (baseline vs grafted: {'; '.join(differ)}); "
                         f"pass the baseline it was grafted from as --ckpt (or none, for {FULL_PRESET} with random "
                         "weights)")


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events around it on a GPU, the wall clock on the CPU."""

    def cuda(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def wall(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cuda if device.type == "cuda" else wall


def time_alternating(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                     desc: str) -> dict[str, list[float]]:
    """Warm every call up, then time the calls in turn (A B A B …) so slow drift affects all of them alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measure = timer(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in tqdm(range(repeats), desc=desc, unit="round", disable=repeats == 0):
        for name, fn in calls.items():
            times[name].append(measure(fn))
    return times


def random_inputs(config: PixArtConfig, batch: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents at the config's trained size, a timestep, random caption features and an all-ones mask."""
    g = torch.Generator().manual_seed(0)
    side = config.sample_size
    latents = torch.randn(batch, config.in_channels, side, side, generator=g).to(device, dtype)
    captions = torch.randn(batch, config.model_max_length, config.caption_channels, generator=g).to(device, dtype)
    mask = torch.ones(batch, config.model_max_length, dtype=torch.long, device=device)
    return latents, torch.full((batch,), float(TIMESTEP), device=device), captions, mask


def check_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], graft: GraftSpec | None, analytic: int
                ) -> None:
    """Compare the analytic count with torch's meta-device counter; warn (the bound may be off) if they differ."""
    counted = meta_forward_flops(config, batch, hw, config.model_max_length, graft)
    if counted == analytic:
        log.info("analytic FLOPs match torch's FLOP counter on the meta device (%.2f TFLOP)", analytic / 1e12)
    else:
        log.warning("analytic FLOPs %.4g differ from torch's meta-device count %.4g (a graft config outside the "
                    "paper's settings?); the FLOP bound uses the analytic count", analytic, counted)


def measure(args: argparse.Namespace, kind: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Build both models, count their FLOPs, time forward and sampling; returns the report as a dict."""
    config = model_config(kind)
    baseline, grafted, spec = build_models(args, config, device, dtype)
    config = baseline.config
    hw = (config.sample_size // config.patch_size,) * 2
    models = {"baseline": baseline, "grafted": grafted}
    flops = {name: pixart_forward_flops(config, args.batch, hw, config.model_max_length,
                                        spec if name == "grafted" else None) for name in models}
    for name in models:
        check_flops(config, args.batch, hw, spec if name == "grafted" else None, flops[name]["total"])

    latents, t, captions, mask = random_inputs(config, args.batch, device, dtype)

    def forward(model: PixArtSigma) -> Callable[[], object]:
        return lambda: model(latents, t, captions, mask)

    def sampling(model: PixArtSigma) -> Callable[[], object]:
        return lambda: sample_pixart(model, latents.float(), captions, mask, captions, mask, args.steps, args.cfg,
                                     progress=False)

    with torch.inference_mode():
        forward_s = time_alternating({n: forward(m) for n, m in models.items()}, device, args.warmup, args.repeats,
                                     "forward")
        sampling_s = time_alternating({n: sampling(m) for n, m in models.items()}, device, 0,
                                      args.sampling_repeats, "sampling")
    rows = [Measurement(name, forward_s[name], sampling_s[name], flops[name]["total"], flops[name],
                        backends(model), backend_summary(model)) for name, model in models.items()]
    return {
        "setup": {
            "model": kind, "preset": FULL_PRESET, "overrides": PROXY_OVERRIDES if kind == "proxy" else {},
            "tokens": hw[0] * hw[1], "latent_side": config.sample_size, "hidden_size": config.hidden_size,
            "depth": config.depth, "num_heads": config.num_heads, "batch": args.batch, "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps, "cfg": args.cfg,
            "warmup": args.warmup, "repeats": args.repeats, "sampling_repeats": args.sampling_repeats,
            "weights": str(args.ckpt) if args.ckpt else "random", "graft": spec.to_dict(),
        },
        "flop_bound_speedup": rows[0].forward_flops / rows[1].forward_flops,
        "rows": [{**asdict(r), "forward_median_s": r.forward_median, "sampling_median_s": r.sampling_median,
                  "forward_speedup": paired_speedup(rows[0].forward_s, r.forward_s),
                  "sampling_speedup": paired_speedup(rows[0].sampling_s, r.sampling_s)} for r in rows],
    }


def markdown_report(report: dict) -> str:
    """A heading that says what ran, one table row per model, the FLOP bound."""
    s = report["setup"]
    cfg_batch = s["batch"] * (2 if s["cfg"] > 1 else 1)
    lines = []
    if s["model"] == "proxy":
        lines += ["**CPU PROXY — not PixArt-Σ XL/2 at 2048².** 2K-shaped stand-in: width "
                  f"{s['hidden_size']}, {s['num_heads']} heads, depth {s['depth']}, {s['tokens']} tokens "
                  f"(tokens/width {s['tokens'] / s['hidden_size']:.1f}, as XL/2 at 2048²). "
                  "Real numbers need a GPU.", ""]
    lines += [f"{s['device']}, {s['dtype'].removeprefix('torch.')}, batch {s['batch']}, {s['tokens']} tokens "
              f"(latent {s['latent_side']}²), depth {s['depth']}, width {s['hidden_size']}, {s['weights']} weights; "
              f"medians over {s['repeats']} forward / {s['sampling_repeats']} sampling rounds "
              f"({s['steps']} steps, CFG {s['cfg']}: transformer batch {cfg_batch}).", "",
              markdown_table(["model", "forward ms", "speed-up", "fwd TFLOP", "TFLOP/s", "sampling s", "speed-up"],
                             timing_rows(report), align="lrrrrrr")]
    lines += ["", f"FLOP-bound speed-up (analytic forward FLOPs, baseline / grafted): "
                  f"**{report['flop_bound_speedup']:.2f}×**", "",
              "Kernels that ran (`torch` is the pure-PyTorch path): "
              + "; ".join(f"{row['name']}: {row['backend_summary']}" for row in report["rows"]) + "."]
    return "\n".join(lines)


def timing_rows(report: dict) -> list[list[str]]:
    """A table row per model: forward latency, FLOPs and rate, sampling latency, speed-ups over the baseline."""
    rows = []
    for row in report["rows"]:
        fwd, smp = row["forward_median_s"], row["sampling_median_s"]
        tflop = row["forward_flops"] / 1e12
        sampling = [f"{smp:.2f}", f"{row['sampling_speedup']:.2f}×"] if smp else ["–", "–"]
        rows.append([row["name"], f"{fwd * 1e3:.1f}", f"{row['forward_speedup']:.2f}×", f"{tflop:.3g}",
                     f"{tflop / fwd:.3g}", *sampling])
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    device = pick_device(args.device)
    kind = args.model if args.model != "auto" else ("full" if device.type == "cuda" else "proxy")
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if kind == "proxy":
        log.warning("CPU PROXY: %s. This is not PixArt-Sigma XL/2 at 2048²; run on a CUDA machine for real "
                    "numbers.", "no CUDA device" if device.type != "cuda" else "--model proxy")
    report = measure(args, kind, device, dtype)
    table = markdown_report(report)
    save_json(report, args.out / "speed.json")
    save_text(table + "\n", args.out / "speed.md")
    print(table)
    log.info("wrote %s and %s", args.out / "speed.json", args.out / "speed.md")
    return report


if __name__ == "__main__":
    main()
