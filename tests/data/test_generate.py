"""Teacher generation: exact contents, resumption after SIGKILL, rank splits and settings checks."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from common.runtime import Rank
from data import generate
from data.prompts import read_prompts
from data.reader import ReaderConfig, ShardLoader
from data.shard_writer import finished_shards
from models.sampling import TextToImage, to_uint8
from models.tiny import build_tokenizer, build_vae, words_of, write_tiny_pipeline
from tests.conftest import REPO

PROMPTS = ["a red cat", "two blue dogs on the left", "a green tree next to a house", "the yellow car",
           "a photo of a bird above a cup", "three purple circles", "an orange apple"]
SHARD_SIZE, BATCH, STEPS = 2, 2, 2


def run_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["--tiny", "--prompts", str(prompts), "--out", str(out), "--steps", str(STEPS), "--shard-size",
            str(SHARD_SIZE), "--batch-size", str(BATCH), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory) -> Path:
    """An uninterrupted single-rank run."""
    out = tmp_path_factory.mktemp("reference")
    generate.main(run_args(prompts_file, out))
    return out


def shard_bytes(out: Path) -> dict[int, bytes]:
    return {index: path.read_bytes() for index, path in finished_shards(out).items()}


def test_shards_hold_exactly_what_the_teacher_produced(reference, tmp_path):
    assert sorted(finished_shards(reference)) == [0, 1, 2, 3]
    pipe = TextToImage.from_paths(write_tiny_pipeline(tmp_path, words=words_of(PROMPTS)))
    expected = {}
    for start in range(0, len(PROMPTS), BATCH):  # the same batches as the generator: a shard's first index on
        batch = PROMPTS[start:start + BATCH]
        seeds = list(range(start, start + len(batch)))
        features, mask = pipe.text_encoder.encode(batch)
        latents, images = pipe(batch, seeds, 64, 64, steps=STEPS, cfg_scale=4.5, progress=False)
        for j, i in enumerate(seeds):
            expected[f"{i:09d}"] = (latents[j], features[j, :int(mask[j].sum())], to_uint8(images)[j])

    loader = ShardLoader(ReaderConfig(shards=[str(reference)], batch_size=1, epochs=1, num_workers=0))
    for batch in loader:
        latent, text, _ = expected[batch["keys"][0]]
        n = int(batch["text_mask"][0].sum())
        assert torch.equal(batch["latent"][0].view(torch.int16), latent.bfloat16().view(torch.int16))
        assert n == len(text)
        assert torch.equal(batch["text"][0, :n].view(torch.int16), text.bfloat16().view(torch.int16))
    assert loader.batches == len(PROMPTS)

    for sample in wds.WebDataset(str(reference / "shard-r000-{000000..000003}.tar"), shardshuffle=False):
        i = int(sample["__key__"])
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == PROMPTS[i] == meta["prompt"]
        assert meta["seed"] == i and meta["steps"] == STEPS and meta["cfg"] == 4.5
        assert (meta["height"], meta["width"], meta["t5_length"]) == (64, 64, len(expected[sample["__key__"]][1]))
        assert len(meta["teacher_sha256"]) == 64
        png = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert np.array_equal(png, expected[sample["__key__"]][2].numpy())
    index = json.loads((reference / "shard-r000-000003.json").read_text())
    assert index["keys"] == ["000000006"] and index["samples"] == 1


KILL_DURING_SECOND_SHARD = """
import os, signal, sys
import torch
torch.set_num_threads(int(os.environ["TEST_THREADS"]))  # as in the test process: same numerics, same bytes
from data import generate
teacher_samples = generate.teacher_samples
def killed_after_first_shard(pipe, prompts, indices, settings, batch_size):
    for sample in teacher_samples(pipe, prompts, indices, settings, batch_size):
        yield sample
        if indices.start > 0:  # one sample of the second shard is in its temporary file
            os.kill(os.getpid(), signal.SIGKILL)
generate.teacher_samples = killed_after_first_shard
generate.main(sys.argv[1:])
"""


def test_a_killed_run_resumes_to_the_same_shards(prompts_file, reference, tmp_path):
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SHARD, *run_args(prompts_file, out)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                           "TEST_THREADS": str(torch.get_num_threads())},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(finished_shards(out)) == [0]
    assert list(out.glob(".shard-r000-000001.tar.*")), "the killed run should leave a partial shard behind"
    first = (out / "shard-r000-000000.tar").stat()

    written = generate.main(run_args(prompts_file, out))
    assert [p.name for p in written] == [f"shard-r000-00000{i}.tar" for i in (1, 2, 3)]
    assert (out / "shard-r000-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # finished: not rewritten
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # partial files cleaned up
    assert shard_bytes(out) == shard_bytes(reference)  # byte-identical: same samples, none twice
    assert generate.main(run_args(prompts_file, out)) == []  # all done: nothing to write


def test_ranks_split_the_shards_and_match_a_single_rank_run(prompts_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "ranks"
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        generate.main(run_args(prompts_file, out))
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["shard-r000-000000.tar", "shard-r000-000002.tar", "shard-r001-000001.tar",
                     "shard-r001-000003.tar"]
    assert shard_bytes(out) == shard_bytes(reference)


def test_changed_settings_are_refused(prompts_file, reference):
    with pytest.raises(ValueError, match=r"steps: 2 → 3"):
        generate.main(run_args(prompts_file, reference, "--steps", "3"))


def test_dataset_json_records_every_model_file_and_refuses_other_ones(prompts_file, reference, tmp_path):
    recorded = json.loads((reference / "dataset.json").read_text())
    assert len(recorded["text_encoder_sha256"]) == len(recorded["vae_sha256"]) == 64 and recorded["preset"] is None
    pipeline = write_tiny_pipeline(tmp_path / "pipeline", words=words_of(PROMPTS))  # the same files as --tiny's

    def rerun() -> list[Path]:
        return generate.generate(read_prompts(prompts_file), reference, Rank(), pipeline, steps=STEPS,
                                 shard_size=SHARD_SIZE, batch_size=BATCH, device="cpu")

    assert rerun() == []  # same files: nothing changed, all shards finished
    build_vae(seed=1).save_pretrained(pipeline / "vae")
    with pytest.raises(ValueError, match="vae_sha256"):
        rerun()
    build_vae(seed=0).save_pretrained(pipeline / "vae")
    build_tokenizer(words_of(PROMPTS) + ["zebra"]).save_pretrained(pipeline / "tokenizer")
    with pytest.raises(ValueError, match=r"\(text_encoder_sha256: [^,]*\);"):  # the only change
        rerun()
