"""Reproduce the shipped shapes teacher (models/shapes_teacher/) with one command:

    python -m recipes.shapes_teacher                       # ≈ 2 h on 2 CPU cores → runs/shapes_teacher/, then the
                                                           # teacher folder models/shapes_teacher/
    python -m recipes.shapes_teacher --out runs/quick --dest runs/quick/teacher --scenes 2000 \\
        --set stage2.steps=100 --set stage2.eval.every=50  # a quick check of the whole chain

Steps, each skipped when its output exists (so a killed run resumes):
1. the frozen components → OUT/pipeline: a word-level tokenizer over the world's vocabulary, a small T5 encoder
   pretrained for a minute to encode each word's context (then frozen, as PixArt-Sigma's T5), the pixel codec
   (no weights) and the sampler's noise schedule (v-prediction, cosine, x0 clipped to the pixel range);
2. the T5 features of the empty prompt (caption dropout) → OUT/null_caption.safetensors;
3. ground-truth renders of training scenes → OUT/shards;
4. training: `torchrun --nproc_per_node N -m recipes.train recipes/shapes_teacher.yaml` (stage 2 from random
   weights, GenEval every few hundred steps, best checkpoint on the validation prompts) → OUT/train;
5. the teacher folder DEST: the components, the best transformer, its learning curve and a README with hashes
   (`--assemble-only` does only this, from a run stopped early).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common.files import file_sha256, read_json_object, save_json, save_text
from common.runtime import setup_logging
from data.shapes import MAX_TOKENS, split_prompts, vocabulary
from data.shapes_data import write_scene_shards
from models.codec import PixelCodec
from models.context_t5 import OFFSETS, pretrain_context
from models.diffusion import NoiseSchedule
from models.teachers import SHAPES_TEACHER
from models.tiny import build_t5, build_tokenizer
from recipes.config import Recipe, dump_recipe, load_recipe
from recipes.distributed import free_port
from recipes.evaluation import write_curve
from recipes.null_caption import main as write_null_caption
from recipes.reporting import read_metrics

log = logging.getLogger("shapes_teacher")
RECIPE = Path(__file__).resolve().parent / "shapes_teacher.yaml"
TEXT_DIM = 64  # the T5 encoder's width = the teacher's caption_channels
TEXT_SEED = 0
TEXT_STEPS = 400  # full-batch AdamW steps of the context pretraining (about a minute on one core)
SCHEDULE = NoiseSchedule(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", clip_sample=1.0)
COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")


def write_components(folder: Path, text_dim: int = TEXT_DIM, text_steps: int = TEXT_STEPS) -> Path:
    """The teacher's frozen parts. The tokenizer, codec and scheduler are byte-identical on every run; the T5
    encoder's short pretraining on the training prompts is deterministic for a machine and thread count (tests
    build smaller, unpretrained ones)."""
    tokenizer = build_tokenizer(vocabulary())
    tokenizer.model_max_length = MAX_TOKENS
    tokenizer.save_pretrained(folder / "tokenizer")  # before use: encoding leaves padding state in tokenizer.json
    t5 = build_t5(len(tokenizer), d_model=text_dim, seed=TEXT_SEED)
    texts = [record["prompt"] for record in split_prompts("train")]
    if text_steps:
        losses = pretrain_context(t5, tokenizer, texts, steps=text_steps, seed=TEXT_SEED, max_length=MAX_TOKENS)
        save_json({"objective": "predict each token and its neighbours at offsets", "offsets": list(OFFSETS),
                   "texts": "the shapes world's training prompts", "num_texts": len(texts), "steps": text_steps,
                   "first_loss": losses[0], "final_loss": losses[-1]}, folder / "text_encoder" / "pretraining.json")
    t5.save_pretrained(folder / "text_encoder")
    PixelCodec(factor=2).save_pretrained(folder / "vae")
    SCHEDULE.save(folder)
    return folder


def train(recipe: Path, overrides: list[str], nproc: int) -> None:
    """Stage 2 from random weights under torchrun (resumes from its newest checkpoint)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "recipes.train", str(recipe)]
    for item in overrides:
        cmd += ["--set", item]
    log.info("training: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def assemble(pipeline: Path, recipe: Recipe, dest: Path, command: str) -> Path:
    """DEST = components + the best transformer of the run in `recipe.out` (complete or stopped early) + its
    learning curve (from the evaluations it logged) + the recipe + a README that records every hash."""
    stage2 = recipe.out / "stage2"
    best = stage2 / "best"
    if not (best / "model.safetensors").is_file():
        raise FileNotFoundError(f"{best}: no best checkpoint; did training run its evaluations?")
    chosen = read_json_object(best / "geneval.json")
    write_curve(stage2, recipe.stage2.eval, {"score": chosen["scores"][chosen["selected_on"]],
                                            "step": chosen["step"]}, stage2 / "metrics.jsonl")
    staging = dest.with_name(f".{dest.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(pipeline, staging)
    (staging / "transformer").mkdir()
    for name in ("config.json", "model.safetensors", "geneval.json"):
        shutil.copy2(best / name, staging / "transformer" / name)
    for name in ("geneval_curve.md", "geneval_curve.png"):
        shutil.copy2(stage2 / name, staging / name)
    save_text(dump_recipe(recipe), staging / "recipe.yaml")
    selected = f"eval/{chosen['selected_on']}/overall"
    evaluated = [r["step"] for r in read_metrics(stage2 / "metrics.jsonl") if selected in r]
    stopped = (f"The run stopped after its evaluation at step {max(evaluated)} of {recipe.stage2.steps}; this is its "
               "best checkpoint up to there (`--assemble-only` assembles a stopped run).\n"
               if evaluated and max(evaluated) < recipe.stage2.steps else "")
    save_text(readme(staging, command, stopped), staging / "README.md")
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    return dest


def component_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of the teacher folder that decides what it computes (README and curves aside)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent != folder)
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


def readme(folder: Path, command: str, stopped: str = "") -> str:
    hashes = component_hashes(folder)
    curve = (folder / "geneval_curve.md").read_text(encoding="utf-8").split("\n", 2)[2]
    rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in hashes.items())
    return f"""# The shapes teacher

A PixArt-Sigma of the repo's own class (`models/pixart.py`) with a tiny config, trained from random weights on the
shapes world (`data/shapes.py`, docs/shapes.md). Load it like any pipeline folder:
`TextToImage.from_paths("models/shapes_teacher")`; score it with `python eval/geneval.py --world shapes --out OUT`.

- `transformer/`: the trained model (our export format), chosen on the validation prompts (`geneval.json`).
- `text_encoder/`, `tokenizer/`: a frozen 2-layer T5 encoder (width {TEXT_DIM}), pretrained for {TEXT_STEPS} steps
  to predict each token and its neighbours (`models/context_t5.py`, `pretraining.json`), and a word-level
  tokenizer over the world's {len(vocabulary())} words.
- `vae/`: the pixel codec (pixel unshuffle by 2, no weights): 32×32×3 images ↔ 12×16×16 latents.
- `scheduler/`: DPM-Solver++ on the cosine schedule with v-prediction, clipping x0 to [−1, 1].

Reproduce it: `{command}` (recipe: `recipe.yaml`).
{stopped}
## Learning curve

![GenEval vs step](geneval_curve.png)

{curve}
## Files

| file | sha256 |
|---|---|
{rows}
"""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/shapes_teacher"), help="work folder")
    parser.add_argument("--dest", type=Path, default=SHAPES_TEACHER, help="where the teacher folder goes")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--scenes", type=int, default=200_000, help="ground-truth training scenes")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe overrides, e.g. --set stage2.steps=100")
    parser.add_argument("--assemble-only", action="store_true",
                        help="skip steps 1-4: assemble DEST from the run already in OUT (e.g. one stopped early: its "
                             "best checkpoint so far and the evaluations it logged)")
    args = parser.parse_args(argv)
    setup_logging()
    out = args.out
    pipeline, shards, null = out / "pipeline", out / "shards", out / "null_caption.safetensors"
    overrides = [f"output_dir={out / 'train'}", f"data.train={shards}", f"data.null_caption={null}",
                 f"stage2.eval.pipeline={pipeline}", *args.overrides]
    recipe = load_recipe(args.recipe, overrides)  # fail before training on a bad override
    if not args.assemble_only:
        if not (pipeline / "scheduler").is_dir():
            write_components(pipeline)
        if not null.is_file():
            write_null_caption(["--pipeline", str(pipeline), "--out", str(null), "--max-length", str(MAX_TOKENS)])
        write_scene_shards(pipeline, shards, args.scenes)
        train(args.recipe, overrides, args.nproc)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m recipes.shapes_teacher", *[a for a in given if a != "--assemble-only"]])
    dest = assemble(pipeline, recipe, args.dest, command)
    log.info("teacher → %s", dest)
    print(dest)
    return dest


if __name__ == "__main__":
    main()
