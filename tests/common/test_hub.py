"""Hub repo ids as paths: resolved offline from a cache in the Hub client's own layout, with errors that say what
to download."""
from __future__ import annotations

import pytest

from common.hub import RepoRef, local_path
from tests.conftest import add_to_hub_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = tmp_path / "repo"
    (source / "transformer").mkdir(parents=True)
    (source / "transformer" / "config.json").write_text("{}")
    (source / "weights.pth").write_bytes(b"tensors")
    add_to_hub_cache(cache, "org/name", source)
    add_to_hub_cache(cache, "org/name", source / "weights.pth", commit="1" * 40, ref="v1")
    return cache


def test_repo_ids_resolve_to_the_cached_snapshot(cache, tmp_path, monkeypatch):
    snapshot = cache / "models--org--name" / "snapshots" / ("0" * 40)
    assert local_path("org/name") == snapshot
    assert local_path("org/name/transformer") == snapshot / "transformer"
    assert local_path("org/name/weights.pth").read_bytes() == b"tensors"
    tagged = cache / "models--org--name" / "snapshots" / ("1" * 40) / "weights.pth"
    assert local_path("org/name@v1/weights.pth") == tagged
    # a local path of the same spelling wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert local_path("org/name").resolve() == tmp_path / "org" / "name"


def test_errors_name_the_repo_the_cache_and_the_download_command(cache):
    with pytest.raises(FileNotFoundError) as err:
        local_path("org/absent", "VAE folder")
    message = str(err.value)
    assert "VAE folder org/absent" in message and str(cache) in message and "`hf download org/absent`" in message
    with pytest.raises(FileNotFoundError, match=r"holds no 'vae' .*hf download org/name --include \"vae\*\""):
        local_path("org/name/vae")
    with pytest.raises(FileNotFoundError, match=r"revision v2.*--revision v2"):
        local_path("org/name@v2")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        local_path("/no/such/folder")


@pytest.mark.parametrize("spec, ref", [
    ("org/name", RepoRef("org/name")),
    ("PixArt-alpha/PixArt-Sigma/PixArt-Sigma-XL-2-2K-MS.pth", RepoRef("PixArt-alpha/PixArt-Sigma",
                                                                      inner="PixArt-Sigma-XL-2-2K-MS.pth")),
    ("org/name@v1.0/sub/dir/", RepoRef("org/name", "v1.0", "sub/dir")),
    ("/abs/path", None), ("./rel", None), ("../up/x", None), ("~/x", None), ("single", None),
])
def test_repo_ref_parsing(spec, ref):
    assert RepoRef.parse(spec) == ref
