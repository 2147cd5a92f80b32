"""No file is ever unpickled: a crafted pickle (one that creates a marker file when unpickled) fed to every path
that reads torch files is refused with an error naming the file, and the marker never appears. Training
checkpoints (LocalEngine, extra state) are covered in tests/recipes/test_checkpoints.py, DeepSpeed's files on
`--resume` in tests/recipes/test_train.py."""
from __future__ import annotations

import json

import pytest

from common.config import ConfigError
from models.dit import DiT
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.weights import CheckpointError, read_state_dict
from tests.recipes.test_checkpoints import craft


@pytest.fixture
def crafted(tmp_path):
    """(make(path) → a crafted file at path, marker path); asserts after the test that nothing ran."""
    marker = tmp_path / "MARKER"

    def make(path, legacy=False):
        path.parent.mkdir(parents=True, exist_ok=True)
        craft(path, marker, legacy)
        return path

    yield make
    assert not marker.exists(), "a crafted pickle was unpickled"


@pytest.mark.parametrize("name", ["w.pt", "w.pth", "w.bin", "legacy.pt"])
def test_state_dict_files(tmp_path, crafted, name):
    path = crafted(tmp_path / name, legacy=name.startswith("legacy"))
    with pytest.raises(CheckpointError, match=rf"{path}: refused: it holds Python objects beyond tensors"):
        read_state_dict(path)


def test_original_checkpoints_of_both_families(tmp_path, crafted):
    with pytest.raises(CheckpointError, match="refused"):
        PixArtSigma.from_pretrained(crafted(tmp_path / "PixArt-Sigma.pth"), preset="tiny")
    with pytest.raises(CheckpointError, match="refused"):
        DiT.from_pretrained(crafted(tmp_path / "DiT.pt"), preset="tiny")


def test_a_diffusers_folder_with_legacy_bin_weights(tmp_path, crafted):
    folder = PixArtSigma(PixArtSigma.make_config("tiny")).save_diffusers(tmp_path / "transformer")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    crafted(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin: refused"):
        PixArtSigma.from_pretrained(folder)


def test_operator_weights_of_a_graft_spec(tmp_path, crafted):
    weights = crafted(tmp_path / "block1.pt")
    spec = GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_x", "config": {},
                                            "layers": {"indexes": [1]}, "weights": {1: str(weights)}}]})
    with pytest.raises(CheckpointError, match="block1.pt: refused"):
        spec.build_operators(PixArtSigma(PixArtSigma.make_config("tiny")))


def test_a_null_caption_file(tmp_path, crafted):
    from recipes.config import read_recipe
    from recipes.preflight import check_inputs

    null = crafted(tmp_path / "null.pt")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: p\nmodel: {family: pixart, preset: tiny}\n"
                           "graft: {grafts: [{type: mha, name: hyena_x, config: {}, layers: {ratio: 0.5}}]}\n"
                           f"data: {{source: synthetic, caption_dropout: 0.1, null_caption: {null}}}\n")
    recipe, sources = read_recipe(recipe_file)
    with pytest.raises(ConfigError, match=r"data.null_caption: .*null.pt: refused"):
        check_inputs(recipe, sources, 1)


def test_fid_inception_weights(tmp_path, crafted):
    from eval.fid.inception import load_fid_inception

    with pytest.raises(CheckpointError, match="refused"):
        load_fid_inception(crafted(tmp_path / "pt_inception-2015-12-05.pth"))


def test_a_clip_state_dict_file(tmp_path, crafted):
    import open_clip

    from eval.geneval.colours import ClipColorClassifier
    from tests.eval.geneval.tiny_models import TINY_CLIP

    config = tmp_path / "tiny-geneval-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        ClipColorClassifier.from_path(crafted(tmp_path / "clip.pt"), arch="tiny-geneval-clip")
