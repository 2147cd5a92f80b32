"""FID sampling: class balance, per-sample seeds, rank sharding, packing by rank 0, resuming, refusing mixed
settings, and the ADM `.npz` format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.fid.npz import iter_npz_batches, npz_array_shape, write_npz_streaming
from models.dit import DiT
from models.graft import GraftSpec
from models.tiny import build_vae


def test_npz_streaming_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 5, 3), dtype=np.uint8)
    path = tmp_path / "batch.npz"
    write_npz_streaming(path, images.shape, np.uint8, [images[:2], images[2:]], extra={"arr_1": np.arange(7)})
    with np.load(path) as data:  # an ordinary npz, as ADM's evaluator and numpy read it
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], np.arange(7))
    assert npz_array_shape(path) == ((7, 4, 5, 3), np.dtype(np.uint8))
    assert np.array_equal(np.concatenate(list(iter_npz_batches(path, 3))), images)
    with pytest.raises(ValueError, match="wrote 2 rows"):
        write_npz_streaming(tmp_path / "short.npz", images.shape, np.uint8, [images[:2]])
    assert not (tmp_path / "short.npz").exists()  # atomic: nothing half-written is left
    with pytest.raises(KeyError, match="no array 'mu'"):
        npz_array_shape(path, "mu")


@pytest.fixture(scope="module")
def grafted_dit(tmp_path_factory):
    """A tiny DiT (10 classes, 64² images) with Hyena-X in half its blocks, as an export folder, and a tiny VAE."""
    folder = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    model = DiT(DiT.make_config("tiny")).eval()
    GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_x", "config": {},
                                     "layers": {"ratio": 0.5}}]}).apply(model)
    model.save_pretrained(folder / "model")
    build_vae().save_pretrained(folder / "vae")
    build_vae(seed=1).save_pretrained(folder / "other-vae")
    return folder


def sample(folder, out, *extra, vae="vae"):
    from eval.fid.cli import main

    return main(["sample", "--ckpt", str(folder / "model"), "--vae", str(folder / vae), "--out", str(out),
                 "--num-samples", "20", "--chunk-size", "8", "--steps", "3", "--device", "cpu", *extra])


def test_sampling_is_sharded_resumable_and_batch_independent(grafted_dit, tmp_path, monkeypatch):
    out = tmp_path / "fid"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TimeoutError, match="1 chunks still missing"):  # rank 0 draws chunks 0 and 2, then waits
        sample(grafted_dit, out, "--batch-size", "4", "--rank-wait", "0")
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["000000.npz", "000002.npz"]
    monkeypatch.setenv("RANK", "1")
    assert sample(grafted_dit, out, "--batch-size", "4") is None  # draws chunk 1; packing is rank 0's
    assert len(list((out / "chunks").iterdir())) == 3 and not (out / "samples.npz").exists()
    monkeypatch.setenv("RANK", "0")
    packed = sample(grafted_dit, out, "--batch-size", "4", "--rank-wait", "0")  # every chunk exists: packs
    assert packed == out / "samples.npz"
    with np.load(packed) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(20)]  # 2 per class
    with np.load(out / "chunks" / "000002.npz") as chunk:
        assert chunk["seeds"].tolist() == list(range(16, 20))
    packed_at = packed.stat().st_mtime_ns
    assert sample(grafted_dit, out, "--batch-size", "4") == packed  # nothing to draw, nothing to pack again
    assert packed.stat().st_mtime_ns == packed_at

    # Resume in one process with another batch size: only the missing chunk is drawn, and it comes out the same
    # (up to a rounding step of a few pixels: matmul kernels round differently for other batch sizes).
    (out / "chunks" / "000001.npz").unlink()
    untouched = (out / "chunks" / "000000.npz").stat().st_mtime_ns
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with np.load(sample(grafted_dit, out, "--batch-size", "3")) as data:
        diff = np.abs(data["arr_0"].astype(int) - images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert (out / "chunks" / "000000.npz").stat().st_mtime_ns == untouched
    assert packed.stat().st_mtime_ns > packed_at  # packed again: chunk 1 is newer than the old samples.npz

    with pytest.raises(ValueError, match="cfg_scale"):
        sample(grafted_dit, out, "--cfg", "4.0")
    with pytest.raises(ValueError, match="vae_sha256"):  # another decoder would mix its samples with these
        sample(grafted_dit, out, vae="other-vae")
    with pytest.raises(ValueError, match="arch"):
        sample(grafted_dit, out, "--arch", "mlp_norm_eps=1e-5")  # same weights, other numerics


def test_sampling_refuses_unbalanced_counts(grafted_dit, tmp_path):
    from eval.fid.cli import main

    with pytest.raises(ValueError, match="multiple of the model's 10 classes"):
        main(["sample", "--ckpt", str(grafted_dit / "model"), "--vae", str(grafted_dit / "vae"),
              "--out", str(tmp_path), "--num-samples", "15", "--device", "cpu"])
