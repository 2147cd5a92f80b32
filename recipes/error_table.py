"""docs/errors.md: every error a user of `recipes.train` can hit, and what it says. Each message in the table is
produced here by doing what the row says (on a tiny recipe, in a temporary folder), so the table cannot drift from
the code: tests/recipes/test_error_table.py regenerates it and compares.

    python -m recipes.error_table > docs/errors.md
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from common.files import save_json
from common.hub import hub_cache_dir
from common.runtime import Rank
from common.tables import markdown_table
from data.reader import ReaderConfig, ShardLoader
from eval.geneval.detections import load_detections
from eval.geneval.layout import list_images, write_metadata
from eval.geneval.rules import ScoringOptions
from models.dit import DiT
from models.weights import save_safetensors
from recipes import loop
from recipes.checkpoints import CheckpointManager
from recipes.config import OptimSection, read_recipe
from recipes.engine import LocalEngine
from recipes.precision import Precision
from recipes.preflight import check_inputs
from recipes.reporting import RunLog
from recipes.run_identity import HASH_CACHE, current_record, mark_done, open_run
from recipes.run_lock import LOCK_FILE, Holder, RunLock
from recipes.validation import RULES

RECIPE = """name: r
model: {family: dit, preset: tiny}
graft: {grafts: [{type: mha, name: hyena_y, config: {}, layers: {ratio: 0.5}}]}
data: {source: synthetic}
"""
PIXART = RECIPE.replace("dit", "pixart").replace("hyena_y", "hyena_x")
Row = tuple[str, Callable[[Path], None]]  # (what the user did, doing it in a fresh folder)


def recipe_file(folder: Path, text: str = RECIPE) -> Path:
    (folder / "recipe.yaml").write_text(text)
    return folder / "recipe.yaml"


def load(folder: Path, sets: list[str] = (), text: str = RECIPE, world_size: int = 1, students=None) -> None:
    """Read and check a recipe as `train` does before starting any process's work."""
    recipe, sources = read_recipe(recipe_file(folder, text), list(sets))
    check_inputs(recipe, sources, world_size, students)


def open_folder(folder: Path, sets: list[str] = (), resume: str = "auto", allow: list[str] = (),
                world_size: int = 1, start_over: bool = False):
    recipe, _ = read_recipe(recipe_file(folder), [f"output_dir={folder / 'run'}", *sets])
    current = current_record(recipe, world_size, None, folder / "run" / HASH_CACHE)
    return open_run(folder / "run", current, resume, allow, start_over)


def started_run(folder: Path) -> str:
    """A run with a checkpoint in stage 1; returns its id."""
    run_id = open_folder(folder).run_id
    save_json({"step": 100, "run_id": run_id}, folder / "run" / "stage1" / "checkpoints" / "step00000100" /
              "COMPLETE")
    return run_id


def value_rows() -> Iterator[Row]:
    for rule in RULES:  # a rule of both stages (`stage[12]`) is shown for stage 1
        item = f"{rule.pattern.replace('[12]', '1')}={rule.bad_example}"
        yield f"`--set {item}`", lambda f, item=item: load(f, [item])


def recipe_rows() -> Iterator[Row]:
    yield "a YAML syntax error in the recipe", lambda f: load(f, text=RECIPE + "stage1: {steps: 3\n")
    yield "a misspelt key", lambda f: load(f, ["stage2.optim.lrr=1e-4"])
    yield "a value of the wrong type", lambda f: load(f, ["stage1.steps=many"])
    yield "`--set` without `=`", lambda f: load(f, ["stage1.steps"])
    yield "a `base:` file that is not there", lambda f: load(f, text="base: other.yaml\n")
    yield "an unknown operator", lambda f: load(f, text=RECIPE.replace("hyena_y", "hyena_q"))
    yield "a graft ratio that is not a number", lambda f: load(f, text=RECIPE.replace("ratio: 0.5", "ratio: half"))
    yield "`min_lr` above `lr`", lambda f: load(f, ["stage1.optim.min_lr=1"])
    yield "a reader setting the recipe sets itself", lambda f: load(f, ["data.reader.seed=3"])
    yield "a reader kind of the other model family", lambda f: load(f, ["data.reader.kind=text"])
    yield "flips on the synthetic stream", lambda f: load(f, ["data.reader.flip=true"])
    yield "caption dropout without a null caption", lambda f: load(f, ["data.caption_dropout=0.1"], PIXART)
    yield "`data.source: shards` without shards", lambda f: load(f, ["data.source=shards"])
    yield "stage 1 on shards without held-out shards", lambda f: load(f, ["data.source=shards",
                                                                            "data.train=data/train-*.tar"])
    yield "a multistep schedule without milestones", lambda f: load(f, ["stage1.optim.schedule=multistep"])
    yield "a plateau schedule in stage 2", lambda f: load(f, ["stage2.optim.plateau={factor: 0.5}"])
    yield "pure bf16 without ZeRO", lambda f: load(f, ["deepspeed.precision=bf16", "deepspeed.zero_stage=0"])
    yield "DeepSpeed's global gradient clipping", lambda f: load(f, ["deepspeed.overrides={gradient_clipping: 1.0}"])


def input_rows() -> Iterator[Row]:
    yield "a graft block beyond the model's depth", lambda f: load(
        f, ["graft.grafts=[{type: mha, name: hyena_y, config: {}, layers: {indexes: [2, 9]}}]"])
    yield "more ranks than students in `split` mode", lambda f: load(f, ["stage1.mode=split"], world_size=4)
    yield "a pretrained model that is not there", lambda f: load(f, ["model.pretrained=./weights/dit"])
    yield "a Hub id of a model not in the local Hugging Face cache", \
        lambda f: load(f, ["model.pretrained=someone/dit-not-downloaded"])

    def truncated(folder: Path) -> None:
        export = DiT(DiT.make_config("tiny")).save_pretrained(folder / "export")
        (export / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:500])
        load(folder, [f"model.pretrained={export}"])

    yield "a truncated pretrained model (an interrupted copy)", truncated
    yield "a null caption file that is not there", lambda f: load(
        f, ["data.caption_dropout=0.1", "data.null_caption=null.safetensors"], PIXART)

    def wrong_width(folder: Path) -> None:
        save_safetensors({"embedding": torch.zeros(4, 16), "mask": torch.ones(4)}, folder / "null.safetensors")
        load(folder, ["data.caption_dropout=0.1", f"data.null_caption={folder / 'null.safetensors'}"], PIXART)

    yield "a null caption of another text encoder", wrong_width
    yield "shards that match no file", lambda f: load(f, ["data.source=shards", "data.train=data/none-*.tar",
                                                          "data.val=data/none-val-*.tar"])

    def few_shards(folder: Path) -> None:
        (folder / "shards").mkdir()
        for n in range(2):
            (folder / "shards" / f"s-{n}.tar").write_bytes(b"")
        load(folder, ["data.source=shards", f"data.train={folder / 'shards'}", "stage1.select_on=train"],
             world_size=2)

    yield "fewer shards than reader slots", few_shards

    def shared_val(folder: Path) -> None:
        (folder / "shards").mkdir()
        for n in range(4):
            (folder / "shards" / f"s-{n}.tar").write_bytes(b"")
        load(folder, ["data.source=shards", f"data.train={folder / 'shards'}", f"data.val={folder / 'shards'}/s-3.tar",
                      "data.reader.num_workers=0"])

    yield "held-out shards (`data.val`) that are training shards", shared_val
    yield "a DiT latent size other than the model's", lambda f: load(f, ["data.reader.latent_size=[16, 16]"])
    yield "T5 features of another width", lambda f: load(f, ["data.reader.text_dim=4096"], PIXART)
    yield "LoRA targets that match nothing", lambda f: load(f, ["stage2.mode=lora",
                                                                "stage2.lora.target_modules=[.*q_proj]"])
    yield "`--stage 2` without stage-1 students", lambda f: load(f, students=f / "stage1" / "best")


def run_folder_rows() -> Iterator[Row]:
    def used(folder: Path) -> None:
        started_run(folder)
        open_folder(folder, resume="none")

    yield "`--resume none` in a folder that holds a run", used

    def changed(folder: Path) -> None:
        started_run(folder)
        open_folder(folder, ["stage1.optim.lr=1e-3"])

    yield "another setting on resume", changed

    def finished(folder: Path) -> None:
        run_id = started_run(folder)
        mark_done(folder / "run", "stage1", replace(open_folder(folder), run_id=run_id))
        open_folder(folder, ["stage1.optim.lr=1e-3"], allow=["stage1.optim.lr"])

    yield "an allowed change that a finished stage cannot take", finished

    def structural(folder: Path) -> None:
        started_run(folder)
        open_folder(folder, ["deepspeed.zero_stage=3"], allow=["deepspeed"])

    yield "an allowed change that a stage cannot take midway", structural

    def midway_world(folder: Path) -> None:
        started_run(folder)
        open_folder(folder, world_size=2, allow=["world_size"])

    yield "another number of ranks midway through a stage", midway_world

    def unknown(folder: Path) -> None:
        started_run(folder)
        open_folder(folder, allow=["stage1.optim.lrr"])

    yield "`--allow-change` of a key that does not exist", unknown

    def unrecorded(folder: Path) -> None:
        (folder / "run" / "stage1").mkdir(parents=True)
        open_folder(folder)

    yield "a folder with outputs but no run record", unrecorded

    def foreign_checkpoint(folder: Path) -> None:
        started_run(folder)
        other = folder / "run" / "stage1" / "checkpoints" / "step00000200"
        save_json({"step": 200, "run_id": "0123456789abcdef"}, other / "COMPLETE")
        open_folder(folder, resume=str(other))

    yield "`--resume` with another run's checkpoint", foreign_checkpoint

    def locked(folder: Path) -> None:
        (folder / LOCK_FILE).write_text(json.dumps(asdict(Holder.me())))
        RunLock(folder).acquire()

    yield "a second job while one runs in the folder", locked


class _Ones:
    """Constant batches for the toy stage."""

    def __init__(self):
        self.done = 0

    def __iter__(self):
        while True:
            self.done += 1
            yield {"x": torch.ones(2, 1), "keys": [f"sample-{self.done}"]}

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]


def toy_run(folder: Path, steps: int = 40, lr: float = 4.0, loss=None, after_step=lambda step: {}) -> None:
    """A one-weight stage through the real loop and checkpoints (one process)."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    engine = LocalEngine(model, OptimSection(lr=lr, grad_clip=0.0), steps, 1, 0, Precision("fp32"))

    def micro_step(batch, generator):
        out = engine(batch["x"])
        value = loss(out) if loss else (-out + 0 * torch.exp(out)).mean()
        return value, {"train/loss": value.item()}

    stage = loop.Stage(name="stage2", engine=engine, source=_Ones(), total_steps=steps, log_every=1,
                       checkpoint_every=1, micro_step=micro_step, after_step=after_step)
    loop.run(stage=stage, checkpoints=CheckpointManager(folder / "checkpoints", 2, 0, "0123456789abcdef"),
             runlog=RunLog(folder, enabled=False), seed=0, accumulation=1, rank=0, resume="auto")


def training_rows() -> Iterator[Row]:
    yield "weights that blow up (lr far too high)", lambda f: toy_run(f)
    yield "a loss that turns NaN", lambda f: toy_run(f, loss=lambda out: (out * float("nan")).mean())
    yield "a validation metric that turns NaN", lambda f: toy_run(
        f, after_step=lambda step: {"val/rel_err/blocks.1.attn": float("nan")} if step == 2 else {})

    def fewer_steps(folder: Path) -> None:
        toy_run(folder, steps=2, lr=1e-3)
        toy_run(folder, steps=1, lr=1e-3)

    yield "fewer steps than the checkpoint resumed from", fewer_steps

    def crafted(folder: Path) -> None:
        toy_run(folder, steps=1, lr=1e-3)
        torch.save({"module": Crafted()}, folder / "checkpoints" / "step00000001" / "local_rank0.pt")
        toy_run(folder, steps=2, lr=1e-3)

    yield "a checkpoint file that holds code (a crafted pickle)", crafted

    def other_world(folder: Path) -> None:
        toy_run(folder, steps=1, lr=1e-3)
        (folder / "checkpoints" / "step00000001" / "extra_rank0.pt").unlink()
        toy_run(folder, steps=2, lr=1e-3)

    yield "resuming with another number of ranks", other_world


class Crafted:
    """What a hostile checkpoint holds: unpickling it would run a command (it is never unpickled)."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def data_rows() -> Iterator[Row]:
    def barren(folder: Path) -> None:
        (folder / "bad.tar").write_bytes(b"not a tar" * 100)
        next(iter(ShardLoader(ReaderConfig(shards=[str(folder / "bad.tar")], kind="text", num_workers=0))))

    yield "shards without one valid sample", barren

    def other_setup(folder: Path) -> None:
        (folder / "bad.tar").write_bytes(b"")
        config = ReaderConfig(shards=[str(folder / "bad.tar")], kind="text", num_workers=0)
        state = ShardLoader(config, Rank()).state_dict()
        ShardLoader(replace(config, batch_size=4), Rank(), state)

    yield "a reader position of another set-up", other_setup

    def unknown_tag(folder: Path) -> None:
        write_metadata(folder, 0, {"tag": "shapes", "prompt": "a circle", "include": []})
        list_images(folder)

    yield "GenEval: a prompt record of an unknown tag", unknown_tag

    def malformed(folder: Path) -> None:
        record = {"tag": "single_object", "prompt": "a cat", "include": [{"class": "cat", "count": 1}]}
        save_json({"format": "grafting-geneval-detections/1", "stored_above": 0.3, "max_objects": 16,
                   "bgcolor": "#999", "crop": True, "colors": list(ScoringOptions().colors), "run": {},
                   "images": [{"filename": "00000/samples/0000.png", "metadata": record,
                               "objects": {"cat": [{"box": [0, 0, 8], "score": 0.9, "color": None}]}}]},
                  folder / "detections.json")
        load_detections(folder / "detections.json", ScoringOptions())

    yield "GenEval: a malformed detections file", malformed


SECTIONS: list[tuple[str, Callable[[], Iterator[Row]]]] = [
    ("Recipe values (checked before any process starts)", value_rows),
    ("Recipe files and overrides", recipe_rows),
    ("The model and the input files (checked before any process starts)", input_rows),
    ("The run folder (checked by rank 0 before any work)", run_folder_rows),
    ("Training and checkpoints", training_rows),
    ("Data and evaluation", data_rows),
]


def message_of(what: str, action: Callable[[Path], None]) -> str:
    """The error `action` raises in a fresh temporary folder, with run-specific details replaced by names."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            action(folder)
        except Exception as err:  # noqa: BLE001 (every error is what the row shows)
            text = f"{type(err).__name__}: {err}"
        else:
            raise AssertionError(f"{what!r} raised nothing: the table would show an error that does not happen")
        finally:
            os.chdir(cwd)
    for pattern, name in ((re.escape(str(folder.resolve())), "…"), (re.escape(tmp), "…"),
                          (re.escape(str(hub_cache_dir())), "HF_CACHE"), (re.escape(socket.gethostname()), "HOST"),
                          (rf"\bpid {os.getpid()}\b", "pid PID"),
                          (r"\b[0-9a-f]{16}\b", "RUN_ID"), (r"\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4}", "TIME"),
                          (r"sha256 [0-9a-f]{12}…", "sha256 HASH…")):
        text = re.sub(pattern, name, text)
    return " ".join(text.split())


def table() -> str:
    """The whole of docs/errors.md."""
    parts = ["# Errors and what they say", "",
             "Every error a user of `python -m recipes.train` can hit, with the message it prints (`…` stands for "
             "the run's folder). Written by `python -m recipes.error_table > docs/errors.md`, which makes each "
             "error happen; `tests/recipes/test_error_table.py` checks this file is current. Errors of the recipe "
             "and its inputs stop every process before any work, with exit status 2; so do refusals of the run "
             "folder. A job whose run lock another job took over stops at once with exit status 75 (logged as "
             "critical).", ""]
    for title, rows in SECTIONS:
        parts += [f"## {title}", "", markdown_table(["What you did", "What it says"],
                                                    [[what, message_of(what, action).replace("|", "\\|")]
                                                     for what, action in rows()]), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(table())
