"""Recipes are checked before any process starts work: every number in its range, the graft against the model's
depth, the reader and LoRA against the model, every input file present and whole. Errors name the key and the
file or `--set` that set it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from models.dit import DiT
from models.pixart import PixArtSigma
from models.weights import save_safetensors
from recipes.config import read_recipe
from recipes.preflight import check_inputs
from recipes.validation import RULES
from tests.data.conftest import write_synthetic

DIT = """name: v
model: {family: dit, preset: tiny}
graft: {grafts: [{type: mha, name: hyena_y, config: {}, layers: {ratio: 0.5}}]}
data: {source: synthetic}
"""
PIXART = """name: p
model: {family: pixart, preset: tiny}
graft: {grafts: [{type: mha, name: hyena_x, config: {}, layers: {ratio: 0.5}}]}
data: {source: synthetic, reader: {caption_tokens: 4}}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def preflight(tmp_path: Path, text: str, overrides: list[str] = (), world_size: int = 1, students=None) -> None:
    recipe, sources = read_recipe(write(tmp_path, text), list(overrides))
    check_inputs(recipe, sources, world_size, students)


@pytest.mark.parametrize("key, bad", [(r.pattern.replace("[12]", n), r.bad_example) for r in RULES
                                      for n in ("12" if "[12]" in r.pattern else "-")])
def test_every_number_out_of_range_names_the_key_and_the_set(tmp_path, key, bad):
    item = f"{key}={bad}"
    with pytest.raises(ConfigError) as err:
        read_recipe(write(tmp_path, DIT), [item])
    assert str(err.value).startswith(f"--set {item!r}: {key}: must be"), err.value


def test_a_bad_value_in_the_recipe_names_the_file_and_a_base_its_own_file(tmp_path):
    base = write(tmp_path, DIT + "stage2: {ema_decay: 1.5}\n", "base.yaml")
    child = write(tmp_path, "base: base.yaml\nstage1: {checkpoint_every: 0}\n", "child.yaml")
    with pytest.raises(ConfigError, match=rf"^{child}: stage1.checkpoint_every: must be an integer ≥ 1, got 0"):
        read_recipe(child)
    with pytest.raises(ConfigError, match=rf"^{base}: stage2.ema_decay: must be a number in \[0, 1\)"):
        read_recipe(child, ["stage1.checkpoint_every=5"])
    with pytest.raises(ConfigError, match=r"stage1.optim.min_lr: must not exceed stage1.optim.lr \(0.01\), got 0.1"):
        read_recipe(write(tmp_path, DIT + "stage1: {optim: {lr: 0.01, min_lr: 0.1}}\n"))
    with pytest.raises(ConfigError, match=r"stage1.optim.lr: must be a finite number > 0, got nan"):
        read_recipe(write(tmp_path, DIT + "stage1: {optim: {lr: .nan}}\n"))


def test_type_errors_from_a_set_blame_the_set(tmp_path):
    path = write(tmp_path, DIT)
    with pytest.raises(ConfigError, match=r"^--set 'stage1.steps=abc': stage1.steps: expected int, got 'abc'"):
        read_recipe(path, ["stage2.steps=5", "stage1.steps=abc"])
    with pytest.raises(ConfigError, match=r"^--set 'graft.grafts=\[\{type: mha, name: hyena_y, config: \{\}, "
                                          r"layers: \{ratio: half\}\}\]': .*ratio: expected a number, got 'half'"):
        read_recipe(path, ["graft.grafts=[{type: mha, name: hyena_y, config: {}, layers: {ratio: half}}]"])
    bad_file = write(tmp_path, DIT.replace("ratio: 0.5", "ratio: half"), "half.yaml")
    with pytest.raises(ConfigError, match=rf"{bad_file}: graft: grafts\[0\].layers.ratio: expected a number"):
        read_recipe(bad_file)


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path, DIT + "stage1: {steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML at line \d+, column \d+"):
        read_recipe(path)
    child = write(tmp_path, "base: missing.yaml\n", "child.yaml")
    with pytest.raises(ConfigError, match=rf"recipe not found: {tmp_path}/missing.yaml \(the base of "):
        read_recipe(child)


def test_graft_layers_are_checked_against_the_models_depth(tmp_path):
    with pytest.raises(ConfigError, match=r"graft: grafts\[0\].layers: block indexes \[4, 9\] are outside 0..3 "
                                          r"\(model depth 4\)"):
        preflight(tmp_path, DIT, ["graft.grafts=[{type: mha, name: hyena_y, config: {}, "
                                  "layers: {indexes: [1, 4, 9]}}]"])
    with pytest.raises(ConfigError, match="split gives each rank its own students, but 2 students cannot cover 3"):
        preflight(tmp_path, DIT, ["stage1.mode=split"], world_size=3)
    preflight(tmp_path, DIT, ["stage1.mode=split"], world_size=2)


def test_the_pretrained_model_must_exist_and_be_whole(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set 'model.pretrained=nowhere': model.pretrained: model nowhere: no "
                                          r"such file or folder"):
        preflight(tmp_path, DIT, ["model.pretrained=nowhere"])
    folder = DiT(DiT.make_config("tiny")).save_pretrained(tmp_path / "export")
    preflight(tmp_path, DIT, [f"model.pretrained={folder}"])
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ConfigError, match=rf"model.pretrained: {weights}: not a readable safetensors file .*"
                                          "truncated"):
        preflight(tmp_path, DIT, [f"model.pretrained={folder}"])


def test_input_files_are_checked_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set 'data.null_caption=none.safetensors': data.null_caption: no such "
                                          r"file none.safetensors"):
        preflight(tmp_path, PIXART, ["data.caption_dropout=0.1", "data.null_caption=none.safetensors"])
    null = tmp_path / "null.safetensors"
    save_safetensors({"embedding": torch.zeros(4, 16), "mask": torch.ones(4)}, null)
    with pytest.raises(ConfigError, match=r"holds \{'embedding': \[4, 16\], 'mask': \[4\]\}; expected embedding "
                                          r"\(L, 32\)"):
        preflight(tmp_path, PIXART, ["data.caption_dropout=0.1", f"data.null_caption={null}"])
    with pytest.raises(ConfigError, match=r"^--set 'data.train=.*nothing-\*.tar': data.train: no shards for"):
        preflight(tmp_path, DIT, ["data.source=shards", f"data.train={tmp_path}/nothing-*.tar",
                                  "stage1.select_on=train"])
    write_synthetic(tmp_path / "shards", 8, 4, kind="class")  # 2 shards
    with pytest.raises(ConfigError, match=r"data.train: has 2 shards, fewer than the 2 ranks × 2 reader workers"):
        preflight(tmp_path, DIT, ["data.source=shards", f"data.train={tmp_path / 'shards'}",
                                  "stage1.select_on=train"], world_size=2)
    with pytest.raises(ConfigError, match=r"data.val: shares 2 shard\(s\) with the training data"):
        preflight(tmp_path, DIT, ["data.source=shards", f"data.train={tmp_path / 'shards'}",
                                  f"data.val={tmp_path / 'shards'}"])
    with pytest.raises(ConfigError, match=r"data.reader.latent_size: \[8, 6\], but the DiT model takes \[8, 8\]"):
        preflight(tmp_path, DIT, ["data.reader.latent_size=[8, 6]"])
    with pytest.raises(ConfigError, match=r"stage2.lora.target_modules: \['nothing'\] match no module"):
        preflight(tmp_path, DIT, ["stage2.mode=lora", "stage2.lora.target_modules=[nothing]"])
    with pytest.raises(ConfigError, match=r"data.reader.text_dim is 64, but the model takes 32-wide"):
        preflight(tmp_path, PIXART, ["data.reader.text_dim=64"])
    with pytest.raises(ConfigError, match=r"--students .*: no stage-1 student for blocks.1.attn"):
        preflight(tmp_path, PIXART, students=tmp_path / "students")


def test_pixart_students_folder_passes(tmp_path):
    folder = tmp_path / "students"
    model = PixArtSigma(PixArtSigma.make_config("tiny"))
    from models.graft import GraftSpec

    spec = GraftSpec.from_dict({"grafts": [{"type": "mha", "name": "hyena_x", "config": {}, "layers": {"ratio": 0.5}}]})
    for path, operator in spec.build_operators(model).items():
        save_safetensors(operator.state_dict(), folder / f"{path}.safetensors")
    preflight(tmp_path, PIXART, students=folder)


@pytest.mark.parametrize("sets, message", [
    (["stage1.steps=-5"], "error: --set 'stage1.steps=-5': stage1.steps: must be an integer ≥ 1, got -5"),
    (["data.caption_dropout=0.1", "data.null_caption=missing.safetensors"],
     "error: --set 'data.null_caption=missing.safetensors': data.null_caption: no such file missing.safetensors"),
])
def test_train_refuses_a_bad_recipe_before_any_work(tmp_path, capsys, sets, message):
    from recipes.train import main

    out = tmp_path / "run"
    argv = [str(write(tmp_path, PIXART)), "--set", f"output_dir={out}"]
    for item in sets:
        argv += ["--set", item]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert not out.exists()  # nothing was started, nothing written
