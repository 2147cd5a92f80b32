"""The demo's one Markdown report: what the graft keeps of its teacher (GenEval per tag with baselines, fidelity,
samples side by side), what stage 1 reached per layer, the loss curves, and the speed of both."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from common.files import save_text
from common.tables import markdown_table
from eval.geneval.prompts import tag_order
from recipes.config import Recipe


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _link(target: Path, report_dir: Path) -> str:
    return os.path.relpath(target, report_dir)


def _section(path: Path, heading: str, missing: str) -> list[str]:
    body = path.read_text(encoding="utf-8").strip() if path.is_file() else f"_{missing}_"
    return [f"## {heading}", "", body, ""]


def headline(teacher: dict, graft: dict, fidelity: dict, speed: dict | None, proxy: dict | None) -> list[list]:
    """The numbers the demo is about, one row each."""
    rows = [["toy GenEval overall (held-out prompts)", f"{teacher['overall']:.3f}", f"{graft['overall']:.3f}",
             f"{graft['overall'] / teacher['overall']:.3f}" if teacher["overall"] else "–"],
            ["prompt-agnostic baseline", f"{teacher['overall_prompt_agnostic_baseline']:.3f}",
             f"{graft['overall_prompt_agnostic_baseline']:.3f}", ""],
            ["fidelity: detections match the teacher's", "1", f"{fidelity['detection_match']:.3f}", ""],
            ["fidelity: PSNR to the teacher's images (dB)", "∞", f"{fidelity['psnr_db']:.2f}", ""]]
    for name, report in (("this model", speed), ("2K-shaped CPU proxy", proxy)):
        if report is None:
            continue
        base, grafted = report["rows"][:2]  # the baseline, then the one graft the demo times
        ups = report["speedups"]["eager"][grafted["name"]]
        for what, label, scale, digits in (("forward", "forward latency, {} (ms)", 1e3, 1),
                                           ("sampling", "20-step sampling, {} (s)", 1, 2)):
            if ups[what]:
                base_s, graft_s = (eager_median(row, what) * scale for row in (base, grafted))
                rows.append([label.format(name), f"{base_s:.{digits}f}", f"{graft_s:.{digits}f}",
                             f"{ups[what]['median']:.2f}× faster"])
        rows.append([f"forward GFLOP, {name}", f"{base['forward_flops'] / 1e9:.3g}",
                     f"{grafted['forward_flops'] / 1e9:.3g}", f"{grafted['flop_bound']:.2f}× bound"])
    return rows


def eager_median(row: dict, what: str) -> float:
    """Median wall-clock seconds of a speed.json row's eager `forward` or `sampling`."""
    return statistics.median(row["eager"][what]["wall"])


def tag_table(teacher: dict, graft: dict, fidelity: dict) -> str:
    """A row per GenEval tag: both scores, both prompt-agnostic baselines, the fidelity of the graft."""
    rows = []
    for tag in tag_order(list(teacher["tags"])):
        t, g, f = teacher["tags"][tag], graft["tags"][tag], fidelity["tags"][tag]
        rows.append([tag, t["images"], f"{t['score']:.3f}", f"{g['score']:.3f}", f"{t['prompt_agnostic_baseline']:.3f}",
                     f"{g['prompt_agnostic_baseline']:.3f}", f"{f['detection_match']:.3f}", f"{f['psnr_db']:.2f}"])
    rows.append(["**overall** (mean of tags)", teacher["images"], f"**{teacher['overall']:.3f}**",
                 f"**{graft['overall']:.3f}**", f"{teacher['overall_prompt_agnostic_baseline']:.3f}",
                 f"{graft['overall_prompt_agnostic_baseline']:.3f}", f"{fidelity['detection_match_mean_of_tags']:.3f}",
                 f"{fidelity['psnr_db']:.2f}"])
    return markdown_table(["tag", "images", "teacher", "graft", "teacher baseline", "graft baseline",
                           "detections match", "PSNR dB"], rows, align="lrrrrrrr")


def write_report(out: Path, shared: Path, teacher_dir: Path, recipe: Recipe, title: str, seconds: float) -> Path:
    """OUT/report.md from the files the demo's steps wrote; returns its path."""
    teacher = _load(shared / "geneval_teacher" / "scores.json")
    graft = _load(out / "geneval_graft" / "scores.json")
    fidelity = _load(out / "fidelity" / "fidelity.json")
    speed_file, proxy_file = out / "speed" / "speed.json", out / "speed_proxy" / "speed.json"
    speed = _load(speed_file) if speed_file.is_file() else None
    proxy = _load(proxy_file) if proxy_file.is_file() else None
    graft_dir = out / "graft"
    timings = _load(out / "timings.json") if (out / "timings.json").is_file() else {}
    generation = teacher["run"].get("generation") or {}
    lines = [
        f"# {title}", "",
        f"Teacher: `{teacher_dir}` (PixArt-Sigma, {teacher_dir.name}). Graft: `{graft_dir / 'export'}` "
        f"({recipe.name}: {_graft_words(recipe)}; stage 1 {recipe.stage1.steps} steps, stage 2 "
        f"{recipe.stage2.steps} steps, {recipe.stage2.mode}). Toy GenEval: the shapes world's held-out prompts "
        f"× {generation.get('samples_per_prompt', 4)} seeds ({generation.get('seed', 42)}…), "
        f"{generation.get('steps', '?')} DPM-Solver++ steps, CFG {generation.get('cfg_scale', '?')}, exact detector, "
        "official rules. Fidelity: the same prompts and seeds through teacher and graft.", "",
        markdown_table(["measure", "teacher", "graft", "graft / teacher"],
                       headline(teacher, graft, fidelity, speed, proxy), align="lrrr"), "",
        "## Toy GenEval per tag", "", tag_table(teacher, graft, fidelity), "",
        "Baseline: each image scored against every prompt of its tag (what ignoring the prompt would score). "
        "Detections match: the graft's image shows the same objects, colours and relations as the teacher's.", "",
        "## Samples: teacher (left four) and graft (right four), same prompts and seeds", "",
        f"Two prompts per tag, one per row, in the order of the table above: "
        f"![teacher | graft]({_link(out / 'fidelity' / 'side_by_side.png', out)})", "",
        "GenEval grids (green frame: correct): "
        f"[teacher]({_link(shared / 'geneval_teacher' / 'grid.png', out)}), "
        f"[graft]({_link(out / 'geneval_graft' / 'grid.png', out)}).", "",
    ]
    lines += _section(graft_dir / "stage1" / "layers.md", "Stage 1: per-layer distillation error",
                      "stage 1 did not run (fresh operators)")
    lines += ["## Loss curves", ""]
    for stage in ("stage1", "stage2"):
        png = graft_dir / stage / "loss_curves.png"
        if png.is_file():
            lines += [f"![{stage} losses]({_link(png, out)})", ""]
    for name, path in (("Speed at the teacher's size", out / "speed" / "speed.md"),
                       ("Speed of the same graft on the 2K-shaped CPU proxy", out / "speed_proxy" / "speed.md")):
        lines += _section(path, name, "not measured")
    if timings:
        rows = [[name, f"{t:.0f}"] for name, t in timings.items()]
        lines += ["## Time per step (this machine)", "", markdown_table(["step", "seconds"], rows, align="lr"), "",
                  f"The whole command took {seconds:.0f} s in this invocation (steps done earlier are skipped).", ""]
    path = out / "report.md"
    save_text("\n".join(lines), path)
    return path


def _graft_words(recipe: Recipe) -> str:
    if recipe.graft is None:
        return "no graft"
    return "; ".join(f"{g['type']} → {g['name']} {g.get('layers')}" for g in recipe.graft["grafts"])
