"""What a run was started with, recorded in its folder (`run.json`), and the checks that keep every later job in
that folder the same run.

A run folder records its run id, the resolved recipe and its hash, the content hashes of every input file (the
pretrained model, the shards of each stage, the null caption, operator weights, an explicit students folder) and
the world size. A later job there:
- with the same settings continues the run (`--resume auto`, the default: a requeued job just goes on);
- with other settings is refused with a diff, unless each changed key is named by `--allow-change KEY` (then the
  change is recorded in `run.json` and takes effect); a change that cannot take effect is refused even then: one
  that alters the results of a finished stage, or the structure of a stage's checkpoints in the middle of it;
- with `--resume none` is refused: a new run in a used folder needs `--start-over`, which deletes the old run.
Each stage's `DONE` marker and each checkpoint name the run id, so nothing of another run is ever taken as this
run's.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.config import to_dict
from common.files import file_sha256, json_sha256, save_json
from data.reader import resolve_shards
from models.pretrained import model_sha256
from recipes.checkpoints import read_stamp
from recipes.config import Recipe
from recipes.validation import flatten

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
HASH_CACHE = ".input_hashes.json"  # not a run's output: valid for any run, kept by --start-over
DONE = "DONE"
STAGES = ("stage1", "stage2")
#: what a run writes into its folder; `--start-over` deletes exactly these
RUN_OUTPUTS = (*STAGES, "export", RUN_FILE, RECIPE_FILE)
#: what the pipelines of slurm/ derive from a run in its folder: their finished-step markers and the evaluations of
#: its export; deleted with the run, so that none is taken for the new run's
DERIVED_OUTPUTS = ("slurm", "geneval", "speed")
CONTENTS = "#sha256"  # settings key suffix: the contents of the files a key names
NOT_COMPARED = ("output_dir",)  # a moved run folder is the same run
FORMAT = 1


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says why and what to do instead."""


# ---- what may change, and when -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChangeRule:
    """How changing the keys matching `pattern` (fnmatch over dotted keys) acts on `stages`: whether it changes
    their results (so a finished stage cannot take it), and whether a stage in progress can take it on resume
    (`live`; a callable decides from the old and new values)."""

    pattern: str
    stages: tuple[str, ...]
    changes_results: bool
    live: bool | Callable[[Any, Any], bool]


S1, S2, BOTH = ("stage1",), ("stage2",), STAGES
CHANGE_RULES: tuple[ChangeRule, ...] = (  # the first matching rule applies
    ChangeRule("name", (), False, True),
    ChangeRule("keep_checkpoints", BOTH, False, True),
    ChangeRule("world_size", BOTH, False, False),  # one optimizer partition and data position per rank
    ChangeRule("stage1.log_every", S1, False, True),
    ChangeRule("stage2.log_every", S2, False, True),
    ChangeRule("stage1.checkpoint_every", S1, False, True),
    ChangeRule("stage2.checkpoint_every", S2, False, True),
    ChangeRule("stage2.gradient_checkpointing", S2, False, True),
    ChangeRule("data.reader.pin_memory", BOTH, False, True),
    ChangeRule("data.reader.dtype", BOTH, True, True),
    ChangeRule("stage1.steps", S1, True, True),
    ChangeRule("stage1.optim.*", S1, True, True),
    ChangeRule("stage1.loss.*", S1, True, True),
    ChangeRule("stage1.huber_delta", S1, True, True),
    ChangeRule("stage1.eval_every", S1, True, True),
    ChangeRule("stage1.eval_batches", S1, True, True),
    ChangeRule("stage1.teacher_precision", S1, True, True),  # only the precision of the recorded targets
    ChangeRule("stage1.select_on", S1, True, True),  # where the best students are picked, like data.val
    ChangeRule("data.val*", S1, True, True),
    ChangeRule("data.synthetic_val_samples", S1, True, True),
    ChangeRule("stage2.steps", S2, True, True),
    ChangeRule("stage2.optim.*", S2, True, True),
    ChangeRule("stage2.ema_decay", S2, True, lambda old, new: old is not None and new is not None),
    ChangeRule("data.caption_dropout", S2, True, True),
    ChangeRule("data.null_caption*", S2, True, True),  # its file, and data.null_caption_mask
    ChangeRule("stage1.*", S1, True, False),
    ChangeRule("stage2.*", S2, True, False),
    ChangeRule("students*", S2, True, False),
    ChangeRule("*", BOTH, True, False),  # the model, the graft, the data and its order, the engine
)


def change_rule(key: str) -> ChangeRule:
    return next(r for r in CHANGE_RULES if fnmatchcase(key.split("#")[0], r.pattern))


def allows(allowed: str, key: str) -> bool:
    """`--allow-change allowed` covers `key`: the key itself, a section above it, and the contents of the files it
    names."""
    base = key.split("#")[0]
    return base == allowed or base.startswith(allowed + ".")


# ---- the record ----------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """`run.json`: what the run was started with, and every change allowed since."""

    run_id: str
    recipe: dict[str, Any]
    inputs: dict[str, str | None]  # settings key + CONTENTS → sha256 of the files it names
    world_size: int
    students: str | None = None  # --students given to stage 2, if any
    started: str = ""
    host: str = ""
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def recipe_sha256(self) -> str:
        return json_sha256(self.recipe)

    def settings(self) -> dict[str, Any]:
        """Everything compared between jobs, as dotted keys."""
        flat = {k: v for k, v in flatten(self.recipe).items() if k.split(".")[0] not in NOT_COMPARED}
        return {**flat, **self.inputs, "world_size": self.world_size, "students": self.students}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "run_id": self.run_id, "started": self.started, "host": self.host,
                "recipe_sha256": self.recipe_sha256, "world_size": self.world_size, "students": self.students,
                "inputs": self.inputs, "recipe": self.recipe, "changes": self.changes}

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return cls(data["run_id"], data["recipe"], data["inputs"], data["world_size"], data.get("students"),
                       data.get("started", ""), data.get("host", ""), data.get("changes", []))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise RunFolderError(f"{path}: not a readable run record ({err}); restore it, or pass --start-over to "
                                 "delete this folder's run and start afresh") from None


def current_record(recipe: Recipe, world_size: int, students: Path | str | None, cache: Path) -> RunRecord:
    """The record this job would write: the resolved recipe, the content hashes of its inputs, the world size.
    `students`: the --students folder, or a word such as `fresh` recorded as it is."""
    folder = students if isinstance(students, Path) else None
    return RunRecord(run_id="", recipe=json.loads(json.dumps(to_dict(recipe))), world_size=world_size,
                     inputs=input_hashes(recipe, folder, HashCache(cache)),
                     students=str(folder.resolve()) if folder else students)


# ---- input hashes --------------------------------------------------------------------------------------------
class HashCache:
    """sha256 of files, remembered by (path, size, mtime) in the run folder: a resumed job re-reads only the
    files that changed, not terabytes of shards."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except ValueError:
            self.known = {}

    def remembered(self, file: Path) -> str | None:
        """The hash of `file` if it has not changed since it was hashed."""
        stat, entry = file.stat(), self.known.get(str(file.resolve()))
        return entry[2] if entry and entry[:2] == [stat.st_size, stat.st_mtime_ns] else None

    def file(self, file: Path) -> str:
        digest = self.remembered(file)
        if digest is None:
            stat = file.stat()
            digest = file_sha256(file)
            self.known[str(file.resolve())] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def files(self, files: Sequence[Path]) -> str:
        """One digest for a list of files: their names and contents, in order."""
        new = [f for f in files if self.remembered(f) is None]
        if new:
            log.info("hashing %d files (%.1f GB) for the run record; later jobs re-read only files that change",
                     len(new), sum(f.stat().st_size for f in new) / 1e9)
        return json_sha256([[f.name, self.file(f)] for f in tqdm(files, desc="hashing inputs", leave=False,
                                                                    disable=len(new) < 100)])

    def save(self) -> None:
        if self.path.parent.is_dir():
            save_json(self.known, self.path)


def input_hashes(recipe: Recipe, students: Path | None, cache: HashCache) -> dict[str, str | None]:
    """Content hashes of every file the recipe reads, by the key that names it."""
    hashes: dict[str, str | None] = {}
    if recipe.model.pretrained:
        hashes["model.pretrained" + CONTENTS] = model_sha256(recipe.model.pretrained, "transformer")
    if recipe.data.null_caption:
        hashes["data.null_caption" + CONTENTS] = cache.file(Path(recipe.data.null_caption))
    grafts = (recipe.graft or {}).get("grafts", [])
    weights = [Path(w) for g in grafts for _, w in sorted((g.get("weights") or {}).items())]
    if weights:
        hashes["graft.grafts" + CONTENTS] = cache.files(weights)
    if recipe.data.source == "shards":
        for key in ("data.train", "data.val", "stage1.shards", "stage2.shards"):
            section, name = key.split(".")
            patterns = getattr(getattr(recipe, section), name)
            if patterns:
                patterns = [patterns] if isinstance(patterns, str) else list(patterns)
                hashes[key + CONTENTS] = cache.files([Path(p) for p in resolve_shards(patterns)])
    if students is not None:
        hashes["students" + CONTENTS] = cache.files(sorted(Path(students).glob("*.safetensors")))
    cache.save()
    return hashes


# ---- stages --------------------------------------------------------------------------------------------------
def stage_done(out: Path, stage: str, run_id: str) -> bool:
    """Whether `stage` of run `run_id` finished (its DONE marker names the run)."""
    try:
        return json.loads((out / stage / DONE).read_text(encoding="utf-8")).get("run_id") == run_id
    except (OSError, ValueError, AttributeError):
        return False


def mark_done(out: Path, stage: str, record: RunRecord) -> None:
    save_json({"run_id": record.run_id, "recipe_sha256": record.recipe_sha256}, out / stage / DONE)


def stage_status(out: Path, stage: str, run_id: str) -> str:
    """`done`, `started` (it has a checkpoint of this run) or `not started`."""
    if stage_done(out, stage, run_id):
        return "done"
    folder = out / stage / "checkpoints"
    if folder.is_dir() and any((read_stamp(p) or {}).get("run_id") == run_id for p in folder.iterdir()):
        return "started"
    return "not started"


# ---- opening a run folder ------------------------------------------------------------------------------------
def open_run(out: Path, current: RunRecord, resume: str, allow: Iterable[str] = (), start_over: bool = False
             ) -> RunRecord:
    """The record of the run this job continues or starts in `out`, after every check; written to `out`. Rank 0
    only, holding the run lock."""
    allow = list(allow)
    if start_over:
        if resume not in ("auto", "none"):
            raise RunFolderError("--start-over starts a new run; it cannot --resume from a checkpoint")
        delete_run(out)
    path = out / RUN_FILE
    if not path.is_file():
        left = [name for name in RUN_OUTPUTS if (out / name).exists()]
        if left:
            raise RunFolderError(f"{out} holds {', '.join(left)} but no {RUN_FILE}: the outputs of a run that kept "
                                 "no record (an older version, or another tool). Pass --start-over to delete them "
                                 "and start afresh, or use another output_dir")
        if resume not in ("auto", "none"):
            raise RunFolderError(f"--resume {resume}: {out} holds no run to continue")
        record = replace(current, run_id=uuid.uuid4().hex[:16], started=_now(), host=socket.gethostname())
        save_json(record.to_json(), path)
        log.info("new run %s in %s", record.run_id, out)
        return record
    record = RunRecord.read(path)
    status = {stage: stage_status(out, stage, record.run_id) for stage in STAGES}
    if resume == "none":
        raise RunFolderError(f"{out} already holds run {record.run_id} (started {record.started}; "
                             + ", ".join(f"{s}: {v}" for s, v in status.items()) + "). --resume auto continues it, "
                             "--start-over deletes it and starts a new run; or use another output_dir")
    if resume != "auto":
        check_resume_path(out, Path(resume), record.run_id, status)
    changes = diff(record.settings(), current.settings())
    check_changes(changes, allow, status, record.settings())
    if changes:
        record.changes.append({"time": _now(), "status": status,
                               "changed": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}})
        record.recipe, record.inputs = current.recipe, current.inputs
        record.world_size, record.students = current.world_size, current.students
        save_json(record.to_json(), path)
        log.warning("run %s continues with changed settings: %s", record.run_id, describe(changes))
    return record


def delete_run(out: Path) -> None:
    """Remove what a run wrote into `out` (and only that)."""
    removed = []
    for name in (*RUN_OUTPUTS, *DERIVED_OUTPUTS):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.warning("--start-over: deleted %s from %s", ", ".join(removed), out)


def check_resume_path(out: Path, path: Path, run_id: str, status: dict[str, str]) -> None:
    """`--resume PATH` names a checkpoint of this run, of a stage that has not finished."""
    stage = next((s for s in STAGES if path.resolve().parent == (out / s / "checkpoints").resolve()), None)
    if stage is None:
        raise RunFolderError(f"--resume {path}: not a checkpoint folder of this run's stages "
                             f"({out}/stage1/checkpoints/stepNNNNNNNN or stage2/…)")
    stamp = read_stamp(path)
    if stamp is None:
        raise RunFolderError(f"--resume {path}: not a complete checkpoint (no readable COMPLETE marker)")
    if stamp.get("run_id") != run_id:
        raise RunFolderError(f"--resume {path}: a checkpoint of run {stamp.get('run_id')!r}, not of this folder's "
                             f"run {run_id}; a run resumes only from its own checkpoints")
    if status[stage] == "done":
        raise RunFolderError(f"--resume {path}: {stage} has finished; resuming it from an earlier checkpoint would "
                             "leave later outputs made from another history. Pass --start-over to redo the run")


def diff(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Changed keys → (recorded, current)."""
    return {k: (recorded.get(k), current.get(k)) for k in sorted(recorded.keys() | current.keys())
            if recorded.get(k) != current.get(k)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    def show(key: str, value: Any) -> str:
        return f"sha256 {value[:12]}…" if key.endswith(CONTENTS) and isinstance(value, str) else repr(value)
    return "; ".join(f"{k}: {show(k, old)} → {show(k, new)}" for k, (old, new) in changes.items())


def check_changes(changes: dict[str, tuple[Any, Any]], allow: list[str], status: dict[str, str],
                  recorded: dict[str, Any]) -> None:
    """Refuse changes not named by `--allow-change`, and allowed ones that cannot take effect."""
    unknown = [a for a in allow if not any(allows(a, k) for k in recorded)]
    if unknown:
        raise RunFolderError(f"--allow-change {', '.join(unknown)}: no such setting (settings are recipe keys such "
                             "as stage1.optim.lr or a section such as stage1.optim, world_size, students)")
    refused = {k: v for k, v in changes.items() if not any(allows(a, k) for a in allow)}
    if refused:
        keys = sorted({k.split("#")[0] for k in refused})
        raise RunFolderError("this run was started with other settings. Changed: " + describe(refused)
                             + ". Resume with the recorded settings (recipe.yaml in the run folder), or allow the "
                             + "change with " + " ".join(f"--allow-change {k}" for k in keys)
                             + ", or --start-over")
    problems = []
    for key, (old, new) in changes.items():
        rule = change_rule(key)
        live = rule.live(old, new) if callable(rule.live) else rule.live
        for stage in rule.stages:
            if status[stage] == "done" and rule.changes_results:
                problems.append(f"{key}: {stage} has finished with the old value, so its results cannot take it")
            elif status[stage] == "started" and not live:
                problems.append(f"{key}: cannot change in the middle of {stage} (its checkpoints hold the model, "
                                "optimizer partitions and data order made with the old value)")
    if problems:
        raise RunFolderError("allowed changes that cannot take effect: " + "; ".join(problems)
                             + ". Undo them, or --start-over to redo the run with the new settings")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
