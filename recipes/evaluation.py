"""GenEval during training: every few steps the current (EMA) model samples each prompt set of the recipe, the
images split across ranks, rank 0 scores them with the world's exact detector, and the checkpoint that scores
best on the selection set is exported to `stage2/best/`. The curve (GenEval vs step) is a Markdown table and a
PNG."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from common.config import ConfigError, to_dict
from common.files import save_json, save_text
from common.runtime import Rank, pick_device
from common.tables import markdown_table
from eval.geneval.cli import report
from eval.geneval.detections import detect_images
from eval.geneval.generation import GenerationSettings, generate
from eval.geneval.layout import list_images
from eval.geneval.prompts import TAGS, check_records
from eval.geneval.rules import ScoringOptions
from eval.geneval.worlds import get_world, prompt_set
from models.codec import load_codec
from models.diffusion import NoiseSchedule
from models.pretrained import PretrainedModel
from models.sampling import TextToImage
from models.text_encoder import T5TextEncoder
from recipes.config import EvalSection, Recipe
from recipes.distributed import barrier, broadcast_tensors
from recipes.reporting import read_metrics

log = logging.getLogger(__name__)
TRAINED_KEYS = ("prediction_type", "beta_schedule", "beta_start", "beta_end", "train_steps")


class PeriodicGenEval:
    """Called from stage 2's step hook; collective (every rank generates its share of the images)."""

    def __init__(self, recipe: Recipe, trained_schedule: NoiseSchedule, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = recipe.stage2.eval, rank, world_size
        self.root = recipe.out / "stage2"
        self.world = get_world(self.cfg.world)
        pipeline = Path(self.cfg.pipeline)
        self.schedule = NoiseSchedule.from_pipeline(pipeline)
        differ = [k for k in TRAINED_KEYS if getattr(self.schedule, k) != getattr(trained_schedule, k)]
        if differ:
            raise ConfigError(f"stage2.eval.pipeline {pipeline} samples with {self.schedule} but the model trains on "
                              f"{trained_schedule} (they differ in {differ}); set the recipe's diffusion keys or "
                              "point the evaluation at the matching pipeline")
        self.sets = {name: list(enumerate(prompt_set(spec))) for name, spec in self.cfg.sets.items()}
        for name, prompts in self.sets.items():
            check_records([r for _, r in prompts], self.world.class_names, f"stage2.eval.sets.{name}")
        self.best = {"score": -1.0, "step": 0}

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.best = {"score": float(state["score"]), "step": int(state["step"])}

    def __call__(self, step: int, build_model: Callable[[], PretrainedModel]) -> dict[str, float]:
        """Evaluate the model `build_model()` returns (collective) at `step`; returns metrics to log (rank 0)."""
        device = pick_device()
        model = build_model().to(device)
        pipeline = Path(self.cfg.pipeline)
        pipe = TextToImage(model, T5TextEncoder(pipeline, max_length=model.config.model_max_length, device=device),
                           load_codec(pipeline, device=device), self.schedule)
        folder = self.root / "evals" / f"step{step:08d}"
        settings = GenerationSettings(
            ckpt=f"{self.root} step {step}", pipeline=str(pipeline.resolve()), preset=None,
            grafted=model.graft is not None, seed=self.cfg.seed, samples_per_prompt=self.cfg.samples_per_prompt,
            steps=self.cfg.steps, cfg_scale=self.cfg.cfg, negative_prompt="", height=None, width=None, dtype="fp32")
        rank = Rank(self.rank, self.world_size)
        for name, prompts in self.sets.items():
            generate(lambda: pipe, prompts, folder / name / "images", settings, self.cfg.batch_size, rank,
                     progress=False)
        barrier()
        scores = {name: -1.0 for name in self.sets}
        metrics: dict[str, float] = {}
        if self.rank == 0:
            for name in self.sets:
                summary = self._score(folder / name, step)
                scores[name] = summary.overall
                metrics[f"eval/{name}/overall"] = summary.overall
                metrics[f"eval/{name}/baseline"] = summary.overall_baseline
                metrics.update({f"eval/{name}/{tag}": t.score for tag, t in summary.tags.items()})
            selected = scores[self.cfg.select]
            log.info("step %d GenEval: %s", step, ", ".join(f"{n} {s:.3f}" for n, s in scores.items()))
            if selected > self.best["score"]:
                self.best = {"score": selected, "step": step}
                model.save_pretrained(self.root / "best")
                save_json({"step": step, "selected_on": self.cfg.select, "scores": scores},
                          self.root / "best" / "geneval.json")
                log.info("new best checkpoint (%s %.4f) → %s", self.cfg.select, selected, self.root / "best")
        best = torch.tensor([self.best["score"], self.best["step"]], dtype=torch.float64)
        score, best_step = broadcast_tensors({"best": best})["best"].tolist()
        self.best = {"score": score, "step": int(best_step)}
        barrier()
        return metrics

    def _score(self, folder: Path, step: int):
        options = ScoringOptions()
        images = list_images(folder / "images")
        detections = detect_images(images, self.world.detector(), self.world.classifier(), options, progress=False)
        run = {"world": self.world.name, "step": step, "evaluation": to_dict(self.cfg)}
        return report(detections, options, run, folder)

    def write_curve(self, metrics: Path) -> Path:
        """GenEval vs step of every set, from the run's metrics (rank 0)."""
        return write_curve(self.root, self.cfg, self.best, metrics)


def write_curve(stage2: Path, cfg: EvalSection, best: dict, metrics: Path) -> Path:
    """GenEval vs step of every set in `metrics` (a stage-2 metrics.jsonl): `stage2/geneval_curve.md` (a table per
    set) and `stage2/geneval_curve.png`; `best` is the selected checkpoint's {"score", "step"}."""
    rows = [r for r in read_metrics(metrics) if any(k.startswith("eval/") for k in r)]
    lines = ["# GenEval during training", "",
             f"World {cfg.world}; {cfg.samples_per_prompt} images per prompt, seeds {cfg.seed}…, {cfg.steps} steps, "
             f"CFG {cfg.cfg}. Checkpoints are chosen on `{cfg.select}`; best: step {best['step']} "
             f"({best['score']:.4f}).", ""]
    for name, spec in cfg.sets.items():
        tags = [t for t in TAGS if any(f"eval/{name}/{t}" in r for r in rows)]
        table = [[r["step"], f"{r[f'eval/{name}/overall']:.3f}", f"{r[f'eval/{name}/baseline']:.3f}",
                  *[f"{r.get(f'eval/{name}/{t}', float('nan')):.2f}" for t in tags]]
                 for r in rows if f"eval/{name}/overall" in r]
        lines += [f"## `{name}` ({spec})", "", markdown_table(["step", "overall", "baseline", *tags], table), ""]
    save_text("\n".join(lines), stage2 / "geneval_curve.md")
    plot_geneval_curve(rows, list(cfg.sets), stage2 / "geneval_curve.png")
    return stage2 / "geneval_curve.md"


def plot_geneval_curve(rows: list[dict], sets: list[str], png: Path) -> None:
    """Overall GenEval (solid) and its prompt-agnostic baseline (dashed) per set, against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in sets:
        points = [(r["step"], r[f"eval/{name}/overall"], r[f"eval/{name}/baseline"]) for r in rows
                  if f"eval/{name}/overall" in r]
        if not points:
            continue
        steps, overall, baseline = zip(*points)
        line, = ax.plot(steps, overall, marker="o", label=f"{name}")
        ax.plot(steps, baseline, linestyle="--", color=line.get_color(), label=f"{name} baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("GenEval overall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)

