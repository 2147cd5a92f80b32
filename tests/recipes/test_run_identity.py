"""A run folder records what its run was started with; later jobs continue it only with the same settings, or
with changes named by --allow-change that can take effect; a new run over an old one needs --start-over."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.files import save_json
from models.weights import save_safetensors
from recipes.config import load_recipe
from recipes.run_identity import (
    HASH_CACHE,
    RUN_FILE,
    HashCache,
    RunFolderError,
    current_record,
    mark_done,
    open_run,
    stage_status,
)
from tests.conftest import REPO
from tests.data.conftest import write_synthetic

TINY = REPO / "recipes" / "tiny_pixart_hyena_x.yaml"


def record_for(out: Path, sets: list[str] = (), world_size: int = 1, students: Path | None = None):
    recipe = load_recipe(TINY, [f"output_dir={out}", *sets])
    return current_record(recipe, world_size, students, out / HASH_CACHE)


def start(out: Path, sets: list[str] = (), resume: str = "auto", allow: list[str] = (), start_over: bool = False,
          world_size: int = 1, students: Path | None = None):
    return open_run(out, record_for(out, sets, world_size, students), resume, allow, start_over)


def checkpoint(out: Path, stage: str, step: int, run_id: str) -> Path:
    """A stand-in for a complete checkpoint of `run_id` (only its COMPLETE stamp matters here)."""
    path = out / stage / "checkpoints" / f"step{step:08d}"
    save_json({"step": step, "run_id": run_id}, path / "COMPLETE")
    return path


def test_the_same_settings_continue_the_run(tmp_path):
    first = start(tmp_path)
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    assert saved["run_id"] == first.run_id and saved["recipe"]["stage1"]["optim"]["lr"] == 2e-3
    assert saved["world_size"] == 1 and len(saved["recipe_sha256"]) == 64
    again = start(tmp_path)
    assert again.run_id == first.run_id and again.changes == []


def test_a_changed_setting_is_refused_with_a_diff(tmp_path):
    start(tmp_path)
    with pytest.raises(RunFolderError, match=r"Changed: stage1.optim.lr: 0.002 → 0.001; stage1.steps: 200 → 300\. "
                                             r".*--allow-change stage1.optim.lr --allow-change stage1.steps"):
        start(tmp_path, ["stage1.optim.lr=1e-3", "stage1.steps=300"])
    with pytest.raises(RunFolderError, match=r"Changed: stage1.steps"):  # one of two allowed is not enough
        start(tmp_path, ["stage1.optim.lr=1e-3", "stage1.steps=300"], allow=["stage1.optim.lr"])


def test_an_allowed_change_is_recorded_and_becomes_the_runs_setting(tmp_path):
    first = start(tmp_path)
    checkpoint(tmp_path, "stage1", 100, first.run_id)
    changed = start(tmp_path, ["stage1.optim.lr=1e-3"], allow=["stage1.optim"])  # a section allows its keys
    assert changed.run_id == first.run_id and changed.recipe["stage1"]["optim"]["lr"] == 1e-3
    assert changed.changes[0]["changed"] == {"stage1.optim.lr": {"from": 2e-3, "to": 1e-3}}
    assert changed.changes[0]["status"] == {"stage1": "started", "stage2": "not started"}
    assert start(tmp_path, ["stage1.optim.lr=1e-3"]).run_id == first.run_id  # the new value is the run's now
    with pytest.raises(RunFolderError, match="stage1.optim.lr: 0.001 → 0.002"):
        start(tmp_path)


def test_allowed_changes_that_cannot_take_effect_are_refused(tmp_path):
    run = start(tmp_path)
    checkpoint(tmp_path, "stage1", 100, run.run_id)
    with pytest.raises(RunFolderError, match=r"graft.grafts: cannot change in the middle of stage1"):
        start(tmp_path, ["graft.grafts=[{type: mha, name: hyena_x, config: {}, layers: {ratio: 1.0}}]"],
              allow=["graft"])
    with pytest.raises(RunFolderError, match=r"world_size: cannot change in the middle of stage1"):
        start(tmp_path, world_size=2, allow=["world_size"])
    assert start(tmp_path, ["stage2.lora.rank=4"], allow=["stage2.lora"]).recipe["stage2"]["lora"]["rank"] == 4
    mark_done(tmp_path, "stage1", run)
    with pytest.raises(RunFolderError, match=r"stage1.optim.lr: stage1 has finished with the old value"):
        start(tmp_path, ["stage2.lora.rank=4", "stage1.optim.lr=1e-3"], allow=["stage1.optim.lr"])
    assert start(tmp_path, world_size=2, allow=["world_size"], sets=["stage2.lora.rank=4"]).world_size == 2
    checkpoint(tmp_path, "stage2", 20, run.run_id)
    base = ["stage2.lora.rank=4"]
    with pytest.raises(RunFolderError, match=r"stage2.ema_decay: cannot change in the middle of stage2"):
        start(tmp_path, [*base, "stage2.ema_decay=null"], allow=["stage2.ema_decay"], world_size=2)
    changed = start(tmp_path, [*base, "stage2.ema_decay=0.999", "stage2.optim.lr=5e-4", "stage2.log_every=1"],
                    allow=["stage2.ema_decay", "stage2.optim.lr", "stage2.log_every"], world_size=2)
    assert changed.recipe["stage2"]["ema_decay"] == 0.999
    with pytest.raises(RunFolderError, match=r"--allow-change stage2.optim.lrr: no such setting"):
        start(tmp_path, allow=["stage2.optim.lrr"])


def test_a_new_run_in_a_used_folder_needs_start_over(tmp_path):
    run = start(tmp_path)
    checkpoint(tmp_path, "stage1", 100, run.run_id)
    with pytest.raises(RunFolderError, match=rf"{tmp_path} already holds run {run.run_id} .*stage1: started, "
                                             r"stage2: not started\). --resume auto continues it, --start-over"):
        start(tmp_path, resume="none")
    (tmp_path / "notes.txt").write_text("mine")
    for derived in ("slurm/stage1.done", "geneval/scores.json"):  # what slurm/ pipelines made of the old run
        (tmp_path / derived).parent.mkdir()
        (tmp_path / derived).write_text("old")
    fresh = start(tmp_path, ["stage1.optim.lr=1e-3"], resume="none", start_over=True)
    assert fresh.run_id != run.run_id and not (tmp_path / "stage1").exists()
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "geneval").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert stage_status(tmp_path, "stage1", fresh.run_id) == "not started"


def test_a_folder_with_outputs_but_no_record_is_refused(tmp_path):
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "stage1" / "DONE").write_text("done\n")
    with pytest.raises(RunFolderError, match=r"holds stage1 but no run.json: the outputs of a run that kept no "
                                             r"record .*--start-over"):
        start(tmp_path)
    assert start(tmp_path, start_over=True).run_id


def test_input_file_contents_are_part_of_the_run(tmp_path):
    null = tmp_path / "null.safetensors"
    save_safetensors({"embedding": torch.zeros(4, 32), "mask": torch.ones(4)}, null)
    sets = ["data.caption_dropout=0.1", f"data.null_caption={null}"]
    out = tmp_path / "run"
    start(out, sets)
    save_safetensors({"embedding": torch.ones(4, 32), "mask": torch.ones(4)}, null)  # same path, new contents
    with pytest.raises(RunFolderError, match=r"data.null_caption#sha256: sha256 \w{12}… → sha256 \w{12}…"):
        start(out, sets)
    assert start(out, sets, allow=["data.null_caption"]).changes


def test_shard_hashes_are_cached_by_size_and_mtime(tmp_path):
    write_synthetic(tmp_path / "shards", 8, 4)
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    cache = HashCache(tmp_path / "cache.json")
    first = cache.files(shards)
    cache.save()
    cache = HashCache(tmp_path / "cache.json")
    cache.known[str(shards[0].resolve())][2] = "remembered"
    remembered = cache.files(shards)
    assert remembered != first  # the remembered hash was used: the file was not read again
    data = bytearray(shards[0].read_bytes())
    data[600] ^= 1
    shards[0].write_bytes(bytes(data))
    assert HashCache(tmp_path / "cache.json").files(shards) not in (first, remembered)  # changed: read again


def test_resume_path_must_be_a_checkpoint_of_this_run_and_an_unfinished_stage(tmp_path):
    run = start(tmp_path)
    mine = checkpoint(tmp_path, "stage1", 100, run.run_id)
    assert start(tmp_path, resume=str(mine)).run_id == run.run_id
    other = checkpoint(tmp_path, "stage1", 200, "another")
    with pytest.raises(RunFolderError, match=rf"--resume {other}: a checkpoint of run 'another', not of this "
                                             rf"folder's run {run.run_id}"):
        start(tmp_path, resume=str(other))
    with pytest.raises(RunFolderError, match=r"not a checkpoint folder of this run's stages"):
        start(tmp_path, resume=str(tmp_path / "elsewhere" / "step00000100"))
    mark_done(tmp_path, "stage1", run)
    with pytest.raises(RunFolderError, match=r"stage1 has finished; resuming it from an earlier checkpoint"):
        start(tmp_path, resume=str(mine))
    with pytest.raises(RunFolderError, match=r"--start-over starts a new run; it cannot --resume"):
        start(tmp_path, resume=str(mine), start_over=True)
