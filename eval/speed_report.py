"""The speed report as Markdown: forward and sampling tables with eager and compiled side by side, peak memory,
the kernels that ran, and (optionally) where the time went per op."""
from __future__ import annotations

import statistics

from common.tables import markdown_table

MIB = 2**20
PROFILE_ROWS = 15  # ops shown in the profile table, by their largest time over the models


def markdown_report(report: dict) -> str:
    """Heading that says what ran and under what load, then one section per table."""
    sections = [heading(report), forward_table(report)]
    if any(row[mode]["sampling"] for row in report["rows"] for mode in report["modes"]):
        sections.append(sampling_table(report))
    sections += [memory_table(report), kernels_section(report)]
    if report["profile"]:
        sections.append(profile_table(report))
    return "\n\n".join(sections)


def heading(report: dict) -> str:
    s = report["setup"]
    lines = []
    if s["model"] != "full":
        what = ("DRY RUN — tiny shapes on the CPU, to check the command; the numbers mean nothing."
                if s["model"] == "dry-run" else
                f"CPU PROXY — not PixArt-Σ XL/2 at 2048². 2K-shaped stand-in: width {s['hidden_size']}, "
                f"{s['num_heads']} heads, depth {s['depth']}, {s['tokens']} tokens (tokens/width "
                f"{s['tokens'] / s['hidden_size']:.1f}, as XL/2 at 2048²). Real numbers need a GPU.")
        lines += [f"**{what}**", ""]
    cfg_batch = s["batch"] * (2 if s["cfg"] > 1 else 1)
    load = s["load_average"]
    load_text = (f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end ({s['cpu_count']} CPUs)"
                 if None not in load else "")
    threads = f", {s['cpus']} threads" if s["cpus"] else ""
    lines.append(f"{s['device']}{threads}, {s['dtype'].removeprefix('torch.')}, batch {s['batch']}, {s['tokens']} "
                 f"tokens (latent {s['latent_side']}²), depth {s['depth']}, width {s['hidden_size']}, {s['weights']} "
                 f"weights, torch {s['torch']}; medians over {s['repeats']} forward / {s['sampling_repeats']} "
                 f"sampling rounds ({s['steps']} steps, CFG {s['cfg']}: transformer batch {cfg_batch}){load_text}. "
                 "Speed-ups: median of the per-round ratios to the baseline of the same mode, (lowest–highest)."
                 + (" **Times are process CPU time**, not the wall clock." if s["clock"] == "cpu" else ""))
    if report["withheld"]:
        lines += ["", "**Speed-ups withheld:** modules ran the pure-PyTorch path where a CUDA kernel was expected ("
                  + "; ".join(f"{k}: {', '.join(v)}" for k, v in report["missing_kernels"].items())
                  + "). Install requirements-gpu.txt, or pass `--allow-missing-kernels`."]
    elif report["missing_kernels"]:
        lines += ["", "**Missing kernels (speed-ups printed on request):** "
                  + "; ".join(f"{k}: {len(v)} modules" for k, v in report["missing_kernels"].items()) + "."]
    return "\n".join(lines)


def ratio_text(ratio: dict | None, withheld: bool) -> str:
    if withheld:
        return "withheld"
    if ratio is None:
        return "–"
    return f"{ratio['median']:.2f}× ({ratio['low']:.2f}–{ratio['high']:.2f})"


def of_bound(ratio: dict | None, bound: float, withheld: bool) -> str:
    return "–" if withheld or ratio is None else f"{ratio['median'] / bound:.2f}"


def clocks(report: dict) -> tuple[str, str | None]:
    """(the clock the tables use, the other one measured, if any): `wall` / `cpu`."""
    main = report["setup"]["clock"]
    other = "wall" if main == "cpu" else "cpu"
    measured = any(row[mode]["forward"][other] for row in report["rows"] for mode in report["modes"])
    return main, other if measured else None


def ratio_key(what: str, clock: str) -> str:
    return what + ("_cpu" if clock == "cpu" else "")


def other_clock_line(report: dict, what: str) -> str:
    """The speed-ups in the clock the table does not use, as one sentence."""
    main, other = clocks(report)
    if other is None or report["withheld"]:
        return ""
    ratios = [f"{mode} {row['name']} {r['median']:.2f}× ({r['low']:.2f}–{r['high']:.2f})"
              for mode in report["modes"] for row in report["rows"][1:]
              if (r := report["speedups"][mode][row["name"]][ratio_key(what, other)])]
    label = "process CPU time" if other == "cpu" else "wall-clock time"
    return f"\n\nThe same rounds in {label}: " + "; ".join(ratios) + "." if ratios else ""


def forward_table(report: dict) -> str:
    """Per model: FLOPs and bound, then per mode latency, speed-up, share of the bound and TFLOP/s."""
    clock, _ = clocks(report)
    headers, align = ["model", "fwd TFLOP", "FLOP bound"], "lrr"
    for mode in report["modes"]:
        headers += [f"{mode} ms", "speed-up", "of bound", "TFLOP/s"]
        align += "rrrr"
    rows = []
    for row in report["rows"]:
        tflop = row["forward_flops"] / 1e12
        line = [row["name"], f"{tflop:.3g}", f"{row['flop_bound']:.3f}×"]
        for mode in report["modes"]:
            median = statistics.median(row[mode]["forward"][clock])
            ratio = report["speedups"][mode][row["name"]][ratio_key("forward", clock)]
            line += [f"{median * 1e3:.1f}", ratio_text(ratio, report["withheld"]),
                     of_bound(ratio, row["flop_bound"], report["withheld"]), f"{tflop / median:.3g}"]
        rows.append(line)
    return "### One forward pass\n\n" + markdown_table(headers, rows, align=align) + other_clock_line(report,
                                                                                                     "forward")


def sampling_table(report: dict) -> str:
    s = report["setup"]
    clock, _ = clocks(report)
    headers, align = ["model"], "l"
    for mode in report["modes"]:
        headers += [f"{mode} s", "speed-up", "of bound"]
        align += "rrr"
    rows = []
    for row in report["rows"]:
        line = [row["name"]]
        for mode in report["modes"]:
            sampling = row[mode]["sampling"]
            ratio = report["speedups"][mode][row["name"]][ratio_key("sampling", clock)]
            line += [f"{statistics.median(sampling[clock]):.2f}" if sampling else "–",
                     ratio_text(ratio, report["withheld"]), of_bound(ratio, row["flop_bound"], report["withheld"])]
        rows.append(line)
    return (f"### {s['steps']}-step sampling (DPM-Solver++, CFG {s['cfg']})\n\n"
            + markdown_table(headers, rows, align=align) + other_clock_line(report, "sampling"))


def memory_table(report: dict) -> str:
    """Weights, then what a forward (each mode) and a training step allocate at their peak, and the change from
    the baseline."""
    headers, align = ["model", "weights MiB"], "lr"
    for mode in report["modes"]:
        headers += [f"forward, {mode} MiB", "vs baseline"]
        align += "rr"
    train = any(row["train_memory"] is not None for row in report["rows"])
    if train:
        headers += ["training step, eager MiB", "vs baseline"]
        align += "rr"
    base = report["rows"][0]
    rows = []
    for row in report["rows"]:
        line = [row["name"], f"{row['weights_bytes'] / MIB:.1f}"]
        for mode in report["modes"]:
            line += [f"{row[mode]['forward_memory'] / MIB:.1f}",
                     change(row[mode]["forward_memory"], base[mode]["forward_memory"])]
        if train:
            line += [f"{row['train_memory'] / MIB:.1f}" if row["train_memory"] is not None else "out of memory",
                     change(row["train_memory"], base["train_memory"])]
        rows.append(line)
    return ("### Peak memory above the weights\n\n" + markdown_table(headers, rows, align=align)
            + "\n\nForward: one inference forward pass (activations and temporaries). Training step: one forward + "
            "backward with every weight trainable (activations and gradients). GPU: torch's allocator peak; CPU: "
            "the peak of torch's CPU allocations recorded by the profiler.")


def change(value: int | None, baseline: int | None) -> str:
    if value is None or not baseline:
        return "–"
    return f"{(value - baseline) / baseline:+.1%}"


def kernels_section(report: dict) -> str:
    lines = ["### Kernels that ran", "", "`torch` is the pure-PyTorch path, `compiled` the pure path fused by "
             "torch.compile."]
    for mode in report["modes"]:
        lines.append(f"- {mode}: " + "; ".join(f"{row['name']}: {row[mode]['backend_summary']}"
                                                for row in report["rows"]))
    return "\n".join(lines)


def profile_table(report: dict) -> str:
    """Self time per op of one eager forward, the ops that took longest in any model first."""
    names = [row["name"] for row in report["rows"]]
    profiles = report["profile"]
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in
                                                                                   profiles.values()))
    rows = [[f"`{op}`", *(f"{profiles[n].get(op, 0):.1f}" for n in names)] for op in ops[:PROFILE_ROWS]]
    rows.append(["all ops", *(f"{sum(profiles[n].values()):.1f}" for n in names)])
    cpu = report["setup"]["clock"] == "cpu"
    how = "CPU ms per op (`eval.measure.OpCpuTimer`)" if cpu else "torch.profiler, self ms per op"
    note = ("The calling thread's CPU time inside each ATen op." if cpu else
            "Self time is wall time inside each op: on a loaded machine it includes waiting to run.")
    return (f"### Where one eager forward spends its time ({how}, median of 3 calls)\n\n"
            + markdown_table(["op", *names], rows, align="l" + "r" * len(names)) + "\n\n" + note)
