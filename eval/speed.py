"""Speed and memory of grafted PixArt-Sigma against its baseline at 2048²: one forward pass and full 20-step
sampling, eager and compiled.

    python eval/speed.py                        # CUDA: XL/2 2K, batch 2, bf16; baseline, 50% and 75% Hyena-X
    python eval/speed.py --dry-run              # that same table at tiny shapes on the CPU (checks the command)
    python eval/speed.py --compile --profile    # CPU: the 2K-shaped proxy, eager and compiled, op profiles
    python eval/speed.py --graft my_graft.yaml --ckpt weights/pixart_sigma_2k/transformer --out runs/speed

Every model is built and timed in the same process: after warm-up, rounds time each model in turn (A B C A B C …),
CUDA events on a GPU, the wall clock and the process CPU time on the CPU. Latencies are medians over rounds;
speed-ups are the median (and range) over rounds of the paired ratio baseline / model, which cancels load that
drifts between rounds. Compiled models (`models.compile.for_inference`) are compared with the compiled baseline,
eager with eager. The FLOP bound of a graft is the ratio of analytic forward FLOPs (`eval.flops`, checked against
torch's FLOP counter on the meta device); "of bound" is the measured speed-up over it. Peak memory is what a call
allocates above the weights (`eval.measure.peak_memory`): one inference forward, and one training forward +
backward (activations and gradients).

Random weights are used unless `--ckpt` is given: latency does not depend on the values. Captions are random
T5-sized features, the model's `model_max_length` tokens (300 for PixArt-Sigma), mask all ones. Sampling is
`models.sampling.sample_pixart` (DPM-Solver++, CFG 4.5, so each step runs the transformer on 2 × batch); T5 and
the VAE decode are not timed.

On CUDA every module with an optional kernel (`models.operators.kernels`) must have run one (or the compiled
path); if one ran the pure-PyTorch fallback, the speed-ups are withheld, since they would measure a missing
install rather than the graft, unless `--allow-missing-kernels` is given.

Without CUDA it runs a "2K-shaped" CPU proxy (width 288, 4 heads of 72, depth 4, 4,096 tokens, fp32): the same
tokens-to-width ratio as XL/2 at 2048² (16,384 / 1,152 ≈ 14.2), hence a similar attention share of the FLOPs.
It says so in its output; its numbers are not the paper's 1.43×.

Depth to width (`--parallel-pairs`, eval/speed_pairs.py): a model's sequential blocks against the same blocks
restructured into parallel pairs, forward passes at several batch sizes; DiT-XL/2 (28 → 14 blocks) by default, or
`--family pixart`. Without CUDA, a CPU proxy with the full depth and tokens at width 384.

    python eval/speed.py --parallel-pairs                 # CUDA: DiT-XL/2 at 256², bf16, batches 1, 8, 64
    python eval/speed.py --parallel-pairs --family pixart --preset PixArt-Sigma-XL-2-1024-MS --batch 1 4
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.files import save_json, save_text
from common.runtime import parse_dtype, pick_device, setup_logging
from eval import speed_pairs
from eval.flops import meta_forward_flops, pixart_forward_flops
from eval.inputs import random_inputs
from eval.measure import Ratio, machine_load, op_profile, peak_memory, time_alternating, warn_cpu_clock_threads
from eval.speed_report import markdown_report
from models import compile as compiling
from models.graft import GraftSpec
from models.operators.kernels import PURE, backend_summary, backends
from models.pixart import PixArtConfig, PixArtSigma
from models.sampling import sample_pixart

log = logging.getLogger("speed")

FULL_PRESET = "PixArt-Sigma-XL-2-2K-MS"  # runs at its trained 256² latent = 2048² pixels, 16,384 tokens
PROXY_OVERRIDES = dict(hidden_size=288, num_heads=4, depth=4, sample_size=128)  # 4,096 tokens: 4096 / 288 ≈ 14.2
DRY_RUN_OVERRIDES = dict(hidden_size=64, num_heads=4, depth=4, sample_size=16, caption_channels=32)
DRY_RUN_ARGS = ["--device", "cpu", "--dtype", "fp32", "--compile", "--warmup", "1", "--repeats", "2",
                "--sampling-repeats", "1", "--steps", "2"]
GRAFT_OPERATOR = "hyena_x"  # the paper's PixArt-Sigma graft: Hyena-X in place of self-attention
DEFAULT_RATIOS = (0.5, 0.75)
NOT_COMPARED = {"model_max_length"}  # T5's prompt length, not the transformer's; diffusers folders do not store it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graft", type=Path, action="append",
                        help="graft spec YAML (repeatable; default: interleaved Hyena-X at --ratios)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS),
                        help="fractions of self-attention blocks grafted with Hyena-X when no --graft is given")
    parser.add_argument("--ckpt", type=Path, help="baseline transformer weights (diffusers folder or .pth); "
                        "default random")
    parser.add_argument("--grafted-ckpt", type=Path, help="grafted export folder (its graft.yaml is the graft)")
    parser.add_argument("--model", choices=["auto", "full", "proxy"], default="auto",
                        help="full = XL/2 2K at 2048²; proxy = the 2K-shaped CPU stand-in; auto = full on CUDA")
    parser.add_argument("--dry-run", action="store_true",
                        help="the default CUDA table (every row, eager and compiled) at tiny shapes on the CPU, "
                        "one round each: checks the command before a GPU run")
    parser.add_argument("--batch", type=int, nargs="+",
                        help="batch size (default 2); with --parallel-pairs one or more (default: 1 8 64 on CUDA, "
                        "1 4 on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what the tables report on the CPU: wall-clock time, or process CPU time (less "
                        "disturbed by other jobs; with --threads 1, close to the work done); the other goes below")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure every model under torch.compile, beside eager (default: on with CUDA)")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes per model")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward rounds")
    parser.add_argument("--sampling-repeats", type=int, default=3, help="timed sampling rounds (0: skip)")
    parser.add_argument("--train-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the peak memory of one training forward + backward per model (eager)")
    parser.add_argument("--profile", action="store_true",
                        help="add the time per op of one eager forward of every model (torch.profiler; with "
                        "--clock cpu, each op's CPU time)")
    parser.add_argument("--allow-missing-kernels", action="store_true",
                        help="print speed-ups even when a module ran the pure-PyTorch path where a CUDA kernel "
                        "was expected")
    parser.add_argument("--out", type=Path, default=Path("runs/speed"),
                        help="folder for speed.json and speed.md (--parallel-pairs: parallel_pairs.json / .md)")
    pairs = parser.add_argument_group("depth to width: sequential blocks vs parallel pairs")
    pairs.add_argument("--parallel-pairs", action="store_true",
                       help="time the model's sequential blocks against the same blocks restructured into parallel "
                       "pairs (DiT-XL/2: 28 → 14) instead of a baseline against a graft")
    pairs.add_argument("--family", choices=sorted(speed_pairs.FAMILIES), help="default dit")
    pairs.add_argument("--preset", help="architecture preset (default: DiT-XL/2 256², PixArt-Sigma XL/2 256²)")
    pairs.add_argument("--arch", nargs="*", default=[], metavar="KEY=VALUE",
                       help="architecture overrides, e.g. depth=12 (on the CPU proxy they apply over its width)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args = parser.parse_args([*DRY_RUN_ARGS, *(sys.argv[1:] if argv is None else argv)])
    mode_check(parser, args)
    return args


def mode_check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options of the other comparison (they would be silently ignored); fill per-mode defaults."""
    if args.parallel_pairs:
        other = [f for f, v in (("--graft", args.graft), ("--ckpt", args.ckpt), ("--grafted-ckpt", args.grafted_ckpt),
                                ("--dry-run", args.dry_run)) if v]
        if other:
            parser.error(f"{', '.join(other)}: not with --parallel-pairs, which restructures a randomly initialised "
                         "model itself (latency does not depend on the weights)")
        args.family = args.family or "dit"
        return
    pair_only = [f for f, v in (("--family", args.family), ("--preset", args.preset), ("--arch", args.arch)) if v]
    if pair_only:
        parser.error(f"{', '.join(pair_only)}: only with --parallel-pairs (the graft comparison runs "
                     f"{FULL_PRESET} or its CPU proxy)")
    if args.batch and len(args.batch) > 1:
        parser.error("--batch takes one size here (several only with --parallel-pairs)")
    args.batch = args.batch[0] if args.batch else 2


@dataclass
class Variant:
    """One model of the comparison: its name, its graft (None for the baseline), and the eager module."""

    name: str
    graft: GraftSpec | None
    model: PixArtSigma


def model_config(kind: str) -> PixArtConfig:
    """XL/2 2K, its 2K-shaped proxy, or the dry run's tiny stand-in."""
    overrides = {"proxy": PROXY_OVERRIDES, "dry-run": DRY_RUN_OVERRIDES}.get(kind, {})
    return PixArtSigma.make_config(FULL_PRESET, **overrides)


def build_variants(args: argparse.Namespace, config: PixArtConfig, device: torch.device, dtype: torch.dtype
                   ) -> list[Variant]:
    """The baseline, then one grafted copy of it per graft spec (or the `--grafted-ckpt` export, which must have
    the baseline's config: FLOPs and inputs come from the baseline's)."""
    if args.model in ("proxy", "dry-run") and (args.ckpt or args.grafted_ckpt):
        raise SystemExit("--ckpt / --grafted-ckpt need the full-size model (--model full, a GPU); the CPU proxy "
                         "has another width and runs random weights")
    torch.manual_seed(0)
    if args.ckpt:
        baseline = PixArtSigma.from_pretrained(args.ckpt, preset=FULL_PRESET, dtype=dtype).to(device)
    else:
        with torch.device(device):
            baseline = PixArtSigma(config).to(dtype)
    variants = [Variant("baseline", None, baseline.eval())]
    if args.grafted_ckpt:
        if args.graft:
            raise SystemExit("give --graft or --grafted-ckpt, not both: the export folder carries its graft.yaml")
        grafted = PixArtSigma.from_pretrained(args.grafted_ckpt, dtype=dtype).to(device)
        if grafted.graft is None:
            raise SystemExit(f"{args.grafted_ckpt} holds no graft.yaml; it is not a grafted export folder")
        check_same_config(baseline.config, grafted.config, args.grafted_ckpt)
        return variants + [Variant(args.grafted_ckpt.name, grafted.graft, grafted.eval())]
    specs = ({path.stem: GraftSpec.from_yaml(path) for path in args.graft} if args.graft else
             {f"{GRAFT_OPERATOR} {ratio:.0%}": GraftSpec.from_settings(GRAFT_OPERATOR, {"ratio": ratio,
                                                                                       "pattern": "interleaved"})
              for ratio in args.ratios})
    for name, spec in specs.items():
        grafted = copy.deepcopy(baseline)
        spec.with_width(config.hidden_size).apply(grafted)
        variants.append(Variant(name, grafted.graft, grafted.eval()))
    return variants


def check_same_config(baseline: PixArtConfig, grafted: PixArtConfig, where: Path) -> None:
    """Refuse a grafted model of another architecture: its FLOPs and inputs would be the baseline's."""
    ours, theirs = asdict(baseline), asdict(grafted)
    differ = [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in ours if k not in NOT_COMPARED and ours[k] != theirs[k]]
    if differ:
        raise SystemExit(f"{where} has another config than the baseline (baseline vs grafted: {'; '.join(differ)}); "
                         f"pass the baseline it was grafted from as --ckpt (or none, for {FULL_PRESET} with random "
                         "weights)")


def check_flops(config: PixArtConfig, batch: int, hw: tuple[int, int], graft: GraftSpec | None, analytic: int
                ) -> None:
    """Compare the analytic count with torch's meta-device counter; warn (the bound may be off) if they differ."""
    counted = meta_forward_flops(config, batch, hw, config.model_max_length, graft)
    if counted == analytic:
        log.info("analytic FLOPs match torch's FLOP counter on the meta device (%.4g TFLOP)", analytic / 1e12)
    else:
        log.warning("analytic FLOPs %.4g differ from torch's meta-device count %.4g (a graft config outside the "
                    "paper's settings?); the FLOP bound uses the analytic count", analytic, counted)


def training_memory(model: PixArtSigma, inputs: tuple, device: torch.device) -> int | None:
    """Peak bytes of one training forward + backward (activations and gradients); None if it runs out of memory."""
    model.train()
    try:
        return peak_memory(lambda: model(*inputs).float().square().mean().backward(), device)
    except torch.cuda.OutOfMemoryError:
        log.warning("the training step ran out of GPU memory; its peak is not reported")
        return None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def missing_kernels(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Modules that ran the pure-PyTorch path where a CUDA kernel was expected (every kernel-capable module on
    CUDA; the compiled path counts as intended)."""
    if device.type != "cuda":
        return []
    return sorted(path for path, backend in backends(model).items() if backend == PURE)


def measure_mode(mode: str, variants: list[Variant], args: argparse.Namespace, device: torch.device,
                 inputs: tuple) -> dict[str, dict]:
    """Memory, forward and sampling timings, and backends of every model in one mode (eager or compiled)."""
    if mode == "compiled":
        # Every instance of the model class is its own entry in dynamo's cache, with one graph for the forward's
        # inputs and one for the sampler's (CFG doubles the batch); past the limit dynamo would run them eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(variants))
    models = {v.name: v.model if mode == "eager" else compiling.for_inference(copy.deepcopy(v.model),
                                                                               args.compile_mode)
              for v in variants}
    latents, t, captions, mask = inputs

    def sampling(model: PixArtSigma, steps: int) -> Callable[[], object]:
        return lambda: sample_pixart(model, latents.float(), captions, mask, captions, mask, steps, args.cfg,
                                     progress=False)

    with torch.inference_mode():
        forwards = {name: (lambda m=model: m(*inputs)) for name, model in models.items()}
        forward_s = time_alternating(forwards, device, args.warmup, args.repeats, f"{mode} forward")
        memory = {name: peak_memory(fn, device) for name, fn in forwards.items()}
        sampling_s = {}
        if args.sampling_repeats:
            for model in models.values():  # the sampler's own call (compiled once more), untimed
                sampling(model, 1)()
            sampling_s = time_alternating({n: sampling(m, args.steps) for n, m in models.items()}, device, 0,
                                          args.sampling_repeats, f"{mode} sampling")
    return {name: {"forward": asdict(forward_s[name]), "sampling": asdict(sampling_s[name]) if sampling_s else None,
                   "forward_memory": memory[name], "backends": backends(model),
                   "backend_summary": backend_summary(model), "missing_kernels": missing_kernels(model, device)}
            for name, model in models.items()}


def speedups(results: dict[str, dict]) -> dict[str, dict]:
    """Paired speed-ups of every model over the baseline of the same mode: `forward` and `sampling`, each in wall
    time and (`_cpu`) in process CPU time."""
    base = results["baseline"]
    out = {}
    for name, r in results.items():
        out[name] = {}
        for what in ("forward", "sampling"):
            for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
                ratio = Ratio.of(*((x[what] or {}).get(clock) or [] for x in (base, r)))
                out[name][what + suffix] = asdict(ratio) if ratio else None
    return out


def measure(args: argparse.Namespace, kind: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Build every model, count its FLOPs, measure it in each mode; returns the report as a dict."""
    load_before = machine_load()
    config = model_config(kind)
    variants = build_variants(args, config, device, dtype)
    config = variants[0].model.config
    hw = (config.sample_size // config.patch_size,) * 2
    flops = {v.name: pixart_forward_flops(config, args.batch, hw, config.model_max_length,
                                         v.graft) for v in variants}
    for v in variants:
        check_flops(config, args.batch, hw, v.graft, flops[v.name]["total"])
    inputs = random_inputs(config, args.batch, device, dtype)
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    results = {mode: measure_mode(mode, variants, args, device, inputs) for mode in modes}
    train_memory = ({v.name: training_memory(v.model, inputs, device) for v in variants} if args.train_memory
                    else {})
    profiles = {}
    if args.profile:
        with torch.inference_mode():
            clock = args.clock if device.type != "cuda" else "wall"
            profiles = {v.name: op_profile(lambda m=v.model: m(*inputs), device, clock=clock) for v in variants}
    missing = {f"{mode}: {name}": r["missing_kernels"] for mode in modes for name, r in results[mode].items()
               if r["missing_kernels"]}
    base_flops = flops["baseline"]["total"]
    return {
        "setup": {
            "model": kind, "preset": FULL_PRESET, "overrides": {"proxy": PROXY_OVERRIDES,
                                                                "dry-run": DRY_RUN_OVERRIDES}.get(kind, {}),
            "tokens": hw[0] * hw[1], "latent_side": config.sample_size, "hidden_size": config.hidden_size,
            "depth": config.depth, "num_heads": config.num_heads, "batch": args.batch, "dtype": str(dtype),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpus": torch.get_num_threads() if device.type != "cuda" else None, "torch": torch.__version__,
            "steps": args.steps, "cfg": args.cfg, "warmup": args.warmup, "repeats": args.repeats,
            "sampling_repeats": args.sampling_repeats, "compile_mode": args.compile_mode,
            "clock": args.clock if device.type != "cuda" else "wall",
            "weights": str(args.ckpt) if args.ckpt else "random",
            "load_average": [load_before, machine_load()], "cpu_count": os.cpu_count(),
        },
        "modes": modes,
        "rows": [{"name": v.name, "graft": v.graft.to_dict() if v.graft else None,
                  "forward_flops": flops[v.name]["total"], "flops_by_component": flops[v.name],
                  "flop_bound": base_flops / flops[v.name]["total"],
                  "weights_bytes": sum(p.numel() * p.element_size() for p in v.model.parameters()),
                  "train_memory": train_memory.get(v.name),
                  **{mode: results[mode][v.name] for mode in modes}} for v in variants],
        "speedups": {mode: speedups(results[mode]) for mode in modes},
        "missing_kernels": missing,
        "withheld": bool(missing) and not args.allow_missing_kernels,
        "profile": profiles,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type != "cuda":
        warn_cpu_clock_threads(args.clock)
    kind = "dry-run" if args.dry_run else args.model if args.model != "auto" else (
        "full" if device.type == "cuda" else "proxy")
    args.model = kind
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    if args.compile is None:
        args.compile = device.type == "cuda"
    what = ("the full depth and tokens at width 384, not the real model" if args.parallel_pairs else
            "this is not PixArt-Sigma XL/2 at 2048²")
    if kind == "proxy":
        log.warning("CPU PROXY: %s (%s); run on a CUDA machine for real numbers.",
                    "no CUDA device" if device.type != "cuda" else "--model proxy", what)
    if args.parallel_pairs:
        report, stem = speed_pairs.measure(args, kind, device, dtype), speed_pairs.REPORT
        table = speed_pairs.markdown_report(report)
    else:
        report, stem = measure(args, kind, device, dtype), "speed"
        table = markdown_report(report)
    save_json(report, args.out / f"{stem}.json")
    save_text(table + "\n", args.out / f"{stem}.md")
    print(table)
    log.info("wrote %s and %s", args.out / f"{stem}.json", args.out / f"{stem}.md")
    if report.get("withheld"):
        raise SystemExit("speed-ups withheld: modules ran the pure-PyTorch path where a CUDA kernel was expected "
                         f"({'; '.join(f'{k}: {len(v)} modules' for k, v in report['missing_kernels'].items())}). "
                         "Install requirements-gpu.txt, or pass --allow-missing-kernels to print them anyway")
    return report


if __name__ == "__main__":
    main()
