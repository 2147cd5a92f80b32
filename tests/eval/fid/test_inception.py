"""The FID Inception: TF-graph pooling and resize, loading from a local weight file, feature layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.fid.inception import (
    FID_POOLS,
    InceptionFeatures,
    build_fid_inception,
    load_fid_inception,
    resize_bilinear_tf1,
)
from tests.conftest import add_to_hub_cache


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised FID Inception saved as pytorch-fid saves its port (no num_batches_tracked)."""
    torch.manual_seed(0)
    net = build_fid_inception()
    for module in net.modules():  # non-trivial BN statistics, so loading them is checked too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return path, net


def test_tf1_resize_is_the_legacy_tensorflow_one():
    """2× upsampling without half-pixel centres: out[2i] = x[i], out[2i+1] = (x[i] + x[i+1]) / 2, the last
    column repeats the edge. torch's half-pixel `interpolate` gives other values."""
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = resize_bilinear_tf1(x, 8)
    assert torch.equal(out[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert torch.equal(out[0, 0, :, 3], torch.full((8,), 1.5))
    assert not torch.allclose(out, F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False))
    same = torch.rand(1, 3, 5, 5)
    assert torch.equal(resize_bilinear_tf1(same, 5), same)


def test_fid_blocks_pool_like_the_tf_graph():
    """Mixed_5b's pool branch averages without counting padding; Mixed_7c max-pools."""
    net = build_fid_inception()
    x = torch.rand(1, 192, 5, 5) + 1
    block = net.Mixed_5b
    expected = block.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    assert torch.allclose(block._forward(x)[-1], expected)
    assert set(FID_POOLS) == {"Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                              "Mixed_7b", "Mixed_7c"}
    y = torch.rand(1, 2048, 3, 3)
    assert torch.allclose(net.Mixed_7c._forward(y)[-1], net.Mixed_7c.branch_pool(F.max_pool2d(y, 3, 1, 1)))


def test_loaded_network_gives_the_saved_networks_features(weights):
    path, original = weights
    extractor = InceptionFeatures(load_fid_inception(path))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    features = extractor(images)
    assert features["pool"].shape == (2, 2048) and features["spatial"].shape == (2, 7 * 17 * 17)
    assert features["logits"].shape == (2, 1008)

    with torch.no_grad():  # the same numbers straight from the original module
        x = (resize_bilinear_tf1(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 299) - 128) / 128
        captured = {}
        hook = original.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
        original.fc.bias.zero_()  # IS logits carry no bias
        logits = original(x)
        hook.remove()
    assert np.allclose(features["logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
    spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's (h, w, c) order
    assert np.allclose(features["spatial"], spatial.numpy(), atol=1e-5)


def test_loader_names_what_is_wrong(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "missing.pth")
    state = torch.load(weights[0])
    torch.save({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="torchvision's ImageNet Inception-v3"):
        load_fid_inception(tmp_path / "tv.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("Mixed_7c")}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \(\d+\)"):
        load_fid_inception(tmp_path / "partial.pth")


def test_a_file_of_a_cached_hub_repo_loads(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    add_to_hub_cache(tmp_path, "org/fid-weights", weights[0])
    net = load_fid_inception("org/fid-weights/pt_inception-2015-12-05-6726825d.pth")
    assert torch.equal(net.Conv2d_1a_3x3.conv.weight, weights[1].Conv2d_1a_3x3.conv.weight)


def test_extractor_refuses_float_images(weights):
    extractor = InceptionFeatures(load_fid_inception(weights[0]))
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_score_cli_end_to_end(weights, tmp_path):
    """Samples scored against a reference batch holding the same images: FID and sFID ≈ 0, precision = recall =
    1; stored reference statistics (ADM's `mu`, `sigma`, `mu_s`, `sigma_s`) are used when present."""
    from eval.fid.cli import main
    from eval.fid.npz import write_npz_streaming

    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    write_npz_streaming(tmp_path / "samples.npz", images.shape, np.uint8, [images[:3], images[3:]])
    np.savez(tmp_path / "ref.npz", arr_0=images)
    results = main(["score", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
                    "--inception", str(weights[0]), "--batch-size", "3", "--device", "cpu"])
    metrics = results["metrics"]
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert metrics["precision"] == metrics["recall"] == 1.0 and metrics["inception_score"] >= 1.0
    assert results["reference_statistics"]["fid"] == "ref.npz:arr_0 features"
    assert (tmp_path / "fid_results.json").is_file() and "| FID |" in (tmp_path / "fid_results.md").read_text()


def test_stored_reference_statistics_are_preferred(tmp_path):
    """ADM's reference batches carry `mu`, `sigma` (pool_3) and `mu_s`, `sigma_s` (spatial) beside `arr_0`."""
    from eval.fid.cli import reference_statistics

    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.ones(4), sigma=np.eye(4),
             mu_s=np.ones(3), sigma_s=np.eye(3))
    features = {"pool": np.zeros((5, 4)), "spatial": np.zeros((5, 3))}
    mu, sigma, source = reference_statistics(tmp_path / "ref.npz", features, "pool")
    assert source == "ref.npz:mu,sigma" and np.array_equal(mu, np.ones(4))
    assert reference_statistics(tmp_path / "ref.npz", features, "spatial")[2] == "ref.npz:mu_s,sigma_s"
    np.savez(tmp_path / "bare.npz", mu=np.ones(4))
    with pytest.raises(ValueError, match="neither mu_s/sigma_s nor images"):
        reference_statistics(tmp_path / "bare.npz", None, "spatial")
