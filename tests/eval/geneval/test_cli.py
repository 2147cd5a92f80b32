"""The whole GenEval command on a tiny PixArt-Sigma, a tiny Mask2Former and a tiny CLIP: every output file,
re-scoring from saved detections, resuming, refusing mixed settings, and splitting work across ranks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from eval.geneval import cli as geneval
from eval.geneval.prompts import read_object_names
from eval.rank_wait import wait_for
from tests.conftest import shared_file
from tests.eval.geneval.tiny_models import write_tiny_clip, write_tiny_mask2former


def metadata_file():
    return shared_file("geneval/evaluation_metadata.jsonl")


def names_file():
    return shared_file("geneval/object_names.txt")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny detector and CLIP folders; every query says "fire hydrant", the class of the first colors prompt."""
    names = read_object_names(names_file())
    root = tmp_path_factory.mktemp("geneval-models")
    detector = write_tiny_mask2former(root / "mask2former", names, confident_class=names.index("fire hydrant"))
    return detector, write_tiny_clip(root / "clip")


def command(out, pipeline, models, *extra) -> list[str]:
    detector, clip = models
    return ["--ckpt", str(pipeline / "transformer"), "--pipeline", str(pipeline), "--out", str(out),
            "--limit", "1", "--samples-per-prompt", "2", "--steps", "2", "--batch-size", "4",
            "--metadata", str(metadata_file()), "--object-names", str(names_file()),
            "--detector-path", str(detector), "--clip", str(clip), "--detector-resize", "64", "128", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pipeline, models):
    out = tmp_path_factory.mktemp("geneval-run")
    geneval.main(command(out, tiny_pipeline, models))
    return out


def test_the_whole_command_writes_every_file(run):
    records = [json.loads(line) for line in metadata_file().read_text().splitlines()]
    indices = [0, 80, 179, 259, 353, 453]  # the first prompt of each tag
    for index in indices:
        folder = run / "images" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == records[index]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        with Image.open(folder / "samples" / "0000.png") as image:
            assert image.size == (64, 64)
    settings = json.loads((run / "images" / "generation.json").read_text())
    assert (settings["height"], settings["steps"], settings["seed"], settings["grafted"]) == (64, 2, 42, False)
    assert settings["world_size"] == 1

    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and list(rows[0]) == ["filename", "tag", "prompt", "correct", "reason", "metadata",
                                                 "details"]
    assert [json.loads(r["metadata"]) for r in rows[::2]] == [records[i] for i in indices]

    detections = json.loads((run / "detections.json").read_text())
    colors_entry = next(e for e in detections["images"] if e["metadata"]["tag"] == "colors")
    assert colors_entry["objects"]["fire hydrant"][0]["color"] in detections["colors"]
    assert detections["run"]["detector"]["backend"] == "mask2former-transformers"

    scores = json.loads((run / "scores.json").read_text())
    assert list(scores["tags"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert scores["overall"] == pytest.approx(np.mean([t["score"] for t in scores["tags"].values()]))
    assert scores["overall_prompt_agnostic_baseline"] is not None and scores["run"]["generation"] == settings
    summary = (run / "summary.md").read_text()
    assert "| colors | 2 |" in summary and "prompt-agnostic baseline" in summary and "- steps: `2`" in summary
    with Image.open(run / "grid.png") as grid:
        assert grid.size == (2 * 72, 6 * 72)  # a row per prompt (one per tag here), 2 framed samples each


def test_saved_detections_rescore_to_the_same_results(run, tmp_path):
    geneval.main(["--from-detections", str(run / "detections.json"), "--out", str(tmp_path)])
    assert (tmp_path / "results.jsonl").read_bytes() == (run / "results.jsonl").read_bytes()
    assert json.loads((tmp_path / "scores.json").read_text())["run"]["rescored"]["from"].endswith("detections.json")
    geneval.main(["--from-detections", str(run / "detections.json"), "--out", str(tmp_path / "strict"),
                  "--options", "threshold=0.99"])
    assert json.loads((tmp_path / "strict" / "scores.json").read_text())["tags"]["colors"]["score"] == 0


def test_a_restarted_run_regenerates_missing_images_identically(run, tiny_pipeline, models, tmp_path):
    victim = run / "images" / "00259" / "samples" / "0001.png"
    shutil.copy(victim, tmp_path / "before.png")
    victim.unlink()
    geneval.main(command(run, tiny_pipeline, models, "--stage", "generate"))
    assert victim.read_bytes() == (tmp_path / "before.png").read_bytes()


def test_adding_images_made_with_other_settings_is_refused(run, tiny_pipeline, models):
    with pytest.raises(ValueError, match="other settings"):
        geneval.main(command(run, tiny_pipeline, models, "--stage", "generate", "--steps", "3", "--limit", "2"))


def test_ranks_split_prompts_and_any_folder_can_be_scored(run, tiny_pipeline, models, tmp_path, monkeypatch):
    out = tmp_path / "ranked"
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        geneval.main(command(out, tiny_pipeline, models, "--stage", "generate", "--tags", "counting", "colors"))
    images = sorted(p.relative_to(out) for p in (out / "images").rglob("*.png"))
    assert [str(p) for p in images] == [f"images/{i:05d}/samples/{j:04d}.png" for i in (179, 259) for j in (0, 1)]
    for path in images:  # other batches, same seeds: equal up to rounding
        ours, single = (np.asarray(Image.open(root / path), dtype=int) for root in (out, run))
        assert np.abs(ours - single).max() <= 1
    assert json.loads((out / "images" / "generation.json").read_text())["world_size"] == 2
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # The world size decides the batches: one process may not regenerate a lost image of a 2-rank folder...
    (out / images[0]).rename(tmp_path / "lost.png")
    with pytest.raises(ValueError, match="world_size: 2 → 1"):
        geneval.main(command(out, tiny_pipeline, models, "--stage", "generate", "--tags", "counting", "colors"))
    # ...but with nothing left to generate, it may check the folder (the world size then decides no pixel).
    (tmp_path / "lost.png").rename(out / images[0])
    geneval.main(command(out, tiny_pipeline, models, "--stage", "generate", "--tags", "counting", "colors"))
    detector, clip = models
    geneval.main(["--stage", "score", "--images", str(out / "images"), "--out", str(out), "--detector-path",
                  str(detector), "--clip", str(clip), "--detector-resize", "64", "128",
                  "--object-names", str(names_file()), "--no-prompt-agnostic-baseline"])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["images"] == 4 and list(scores["tags"]) == ["counting", "colors"]
    assert scores["overall_prompt_agnostic_baseline"] is None


def test_rank_zero_waits_for_the_other_ranks_images():
    wait_for(lambda: [], 0, "images", "Score later with --stage score")
    with pytest.raises(TimeoutError, match="1 images still missing .* --stage score"):
        wait_for(lambda: ["images/00080/samples/0000.png"], 0, "images", "Score later with --stage score")


def test_missing_model_paths_stop_the_run_before_generation(tiny_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="--clip"):
        geneval.main(["--ckpt", str(tiny_pipeline / "transformer"), "--pipeline", str(tiny_pipeline), "--out",
                      str(tmp_path), "--detector-path", str(tmp_path)])
    assert not (tmp_path / "images").exists()
    with pytest.raises(SystemExit, match="--ckpt"):
        geneval.main(["--stage", "generate", "--out", str(tmp_path)])


def test_a_grafted_export_folder_generates_and_is_recorded_as_grafted(tiny_pipeline, models, tmp_path):
    from models.graft import GraftSpec
    from models.pixart import PixArtSigma

    model = PixArtSigma.from_pretrained(tiny_pipeline / "transformer")
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_y", "config": {},
                                     "layers": {"ratio": 0.5}}]}).apply(model)
    model.save_pretrained(tmp_path / "export")
    args = command(tmp_path / "out", tiny_pipeline, models, "--stage", "generate", "--tags", "single_object",
                   "--samples-per-prompt", "1")
    args[args.index("--ckpt") + 1] = str(tmp_path / "export")
    geneval.main(args)
    assert json.loads((tmp_path / "out" / "images" / "generation.json").read_text())["grafted"] is True
    assert (tmp_path / "out" / "images" / "00000" / "samples" / "0000.png").is_file()
