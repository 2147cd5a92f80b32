"""`sbatch slurm/dit_xl2.sh RECIPE` on a real Slurm: a tiny DiT graft from class folders of images to FID, on 2
ranks — latent shards, both stages, FID samples from the export and their score."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data.shard_writer import finished_shards
from tests.conftest import REPO
from tests.slurm.conftest import TWO_RANKS

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = REPO / "slurm" / "dit_xl2.sh"
SETS = ["data.reader.num_workers=1", "stage1.steps=10", "stage1.eval_every=10", "stage1.checkpoint_every=10",
        "stage2.steps=10", "stage2.checkpoint_every=10"]


@pytest.fixture(scope="module")
def dit_inputs(tmp_path_factory):
    """Two classes of 64² images, a tiny VAE, a random FID Inception and a reference batch."""
    from eval.fid.inception import build_fid_inception
    from models.tiny import build_vae

    root = tmp_path_factory.mktemp("dit-inputs")
    rng = np.random.default_rng(0)
    for name in ("n01440764", "n01443537"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    build_vae().save_pretrained(root / "vae")
    torch.manual_seed(0)
    torch.save(build_fid_inception().state_dict(), root / "inception.pth")
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8))
    return root


def test_dit_script_from_images_to_fid(cluster, dit_inputs, tmp_path):
    from models.dit import DiT
    from models.operators.hyena import HyenaY

    out, data = tmp_path / "run", tmp_path / "data"
    images = dit_inputs / "images"
    env = {**cluster.env, "PYTHON": sys.executable, "OUT": str(out), "DATA": str(data),
           "IMAGES": f"{images} {images} {images}", "VAE": str(dit_inputs / "vae"),
           "PRECOMPUTE_ARGS": "--resolution 64 --flip --shard-size 2 --batch-size 4 --device cpu",
           "FID_ARGS": "--num-samples 10 --chunk-size 5 --batch-size 5 --steps 2 --device cpu",
           "FID_REF": str(dit_inputs / "ref.npz"), "INCEPTION": str(dit_inputs / "inception.pth")}
    job = cluster.run("sbatch", "--parsable", *TWO_RANKS, f"--output={tmp_path}/slurm-%j.out", str(SCRIPT),
                      str(REPO / "recipes" / "tiny_dit_hyena_y.yaml"), "--set", "data.source=shards",
                      *(x for s in SETS for x in ("--set", s)), env=env).stdout.strip()
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-5000:]

    for split in ("train8k", "train128k", "val8k"):
        shards = finished_shards(data / split)
        assert len(shards) == 4 and {p.name[:10] for p in shards.values()} == {"shard-r000", "shard-r001"}
        assert json.loads((data / split / "classes.json").read_text())["classes"] == ["n01440764", "n01443537"]
    model = DiT.from_pretrained(out / "export")
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.attn, HyenaY)] == [1, 3]
    with np.load(out / "fid" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (10, 64, 64, 3) and samples["arr_1"].tolist() == list(range(10))
    results = json.loads((out / "fid" / "fid_results.json").read_text())
    assert results["num_samples"] == results["num_reference_images"] == 10 and results["image_size"] == [64, 64]
    assert all(math.isfinite(value) for value in results["metrics"].values())  # a random Inception: values mean nothing
