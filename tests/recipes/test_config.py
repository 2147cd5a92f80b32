"""Recipe loading: inheritance, overrides, validation with the key and file named; every shipped recipe loads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from common.config import ConfigError
from models.graft import BLOCKS, GraftSpec
from models.operators import SETTINGS_DIR, load_settings, operator_info, settings_operator
from models.parallel_blocks import ParallelPair
from recipes.builders import FAMILIES
from recipes.config import load_recipe
from recipes.distributed import deepspeed_config
from recipes.precision import Precision
from recipes.schedules import lr_factor
from tests.conftest import REPO

GRAFT_SPECS = REPO / "recipes" / "grafts"  # graft specs, not recipes
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if not p.name.startswith("_") and p.parent not in (SETTINGS_DIR, GRAFT_SPECS))
PRETRAINED = {"dit": "DiT-XL/2", "pixart": "PixArt-Sigma-XL-2-2K-MS"}  # what the recipes' checkpoints hold


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_recipes_load_and_their_operators_build(path):
    """Every recipe names its operator settings by file (never inline), loads, and builds its operators (or parallel
    pairs) for its model's architecture (on the meta device)."""
    recipe = load_recipe(path)
    assert recipe.name == path.stem if path.parent.name == "recipes" else recipe.name.endswith(path.stem)
    if recipe.graft is None:  # a model trained as it is (the shapes teacher): nothing to build
        assert yaml.safe_load(path.read_text())["graft"] is None
        return
    raw = [g for g in yaml.safe_load(path.read_text())["graft"]["grafts"] if g["type"] != BLOCKS]
    settings = [(path.parent / g["config_filepath"]).resolve() for g in raw]
    assert all("config" not in g for g in raw) and all(s.parent == SETTINGS_DIR for s in settings)
    for graft, file in zip([g for g in recipe.graft["grafts"] if g["type"] != BLOCKS], settings):
        assert graft["config"] == load_settings(file.stem) and graft["name"] == settings_operator(file.stem)
    family = FAMILIES[recipe.model.family]
    with torch.device("meta"):
        model = family(family.make_config(recipe.model.preset or PRETRAINED[recipe.model.family],
                                          **recipe.model.arch))
        operators = GraftSpec.from_dict(recipe.graft).build_operators(model)
    grafts = GraftSpec.from_dict(recipe.graft).targets(model)
    assert operators and set(operators) == set(grafts)
    for p, op in operators.items():
        config = grafts[p].config
        if grafts[p].type == BLOCKS:
            assert isinstance(op, ParallelPair) and op.merge.in_features == 2 * model.config.hidden_size
        elif grafts[p].name == "mlp":
            assert op.fc1.out_features == model.config.hidden_size * config["expansion_ratio"]
        else:
            assert isinstance(op, operator_info(grafts[p].name).factory())


def test_operator_files_are_named_relative_to_the_recipe_that_names_them(tmp_path, monkeypatch):
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "y.yaml").write_text("inner_filter_len: 3\nl_max: 4096\n")
    base = write(tmp_path / "ops", "base.yaml", BASE.replace("config: {}", "config_filepath: y.yaml"))
    child = write(tmp_path, "child.yaml", f"base: {base.relative_to(tmp_path)}\nname: child\n")
    monkeypatch.chdir(tmp_path.parent)  # neither the recipe's folder nor the base's
    assert load_recipe(child).graft["grafts"][0]["config"] == {"inner_filter_len": 3, "l_max": 4096}
    monkeypatch.chdir(tmp_path)
    overriding = BASE.replace("config: {}", "config_filepath: ops/y.yaml, config: {inner_filter_len: 2}")
    assert load_recipe(write(tmp_path, "o.yaml", overriding)).graft["grafts"][0]["config"] == {
        "inner_filter_len": 2, "l_max": 4096}
    given = load_recipe(write(tmp_path, "g.yaml", BASE), [
        "graft.grafts=[{type: mha, name: hyena_y, config_filepath: ops/y.yaml, layers: {ratio: 0.5}}]"])
    assert given.graft["grafts"][0]["config"] == {"inner_filter_len": 3, "l_max": 4096}  # from the working dir
    with pytest.raises(ConfigError, match="'nowhere.yaml' not found"):
        load_recipe(write(tmp_path, "bad.yaml", BASE.replace("config: {}", "config_filepath: nowhere.yaml")))


def test_dit_family_covers_the_papers_table():
    names = {p.stem for p in (REPO / "recipes" / "dit_xl2").glob("*.yaml")} - {"_base"}
    for op in ("hyena_se", "hyena_x", "hyena_y", "swa", "mamba2"):
        assert {f"mha_{op}_50", f"mha_{op}_75"} <= names
    assert {"mlp_r3_50", "mlp_r3_75", "mlp_r3_100", "mlp_r6_50", "mlp_r6_75", "mlp_hyena_x_50",
            "mlp_hyena_x_75", "mha_self_100", "mlp_self_r4_100"} <= names


def test_headline_recipe_grafts_14_odd_self_attention_layers():
    from models.pixart import PixArtSigma

    recipe = load_recipe(REPO / "recipes" / "pixart_sigma_2k_hyena_x_50.yaml")
    with torch.device("meta"):
        model = PixArtSigma(PixArtSigma.make_config("PixArt-Sigma-XL-2-2K-MS"))
    targets = GraftSpec.from_dict(recipe.graft).targets(model)
    assert sorted(targets, key=lambda p: int(p.split(".")[1])) == [f"blocks.{i}.attn" for i in range(1, 28, 2)]
    assert recipe.stage2.mode == "lora" and recipe.stage2.lora.rank == 64 and recipe.deepspeed.zero_stage == 2


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


BASE = """
name: base
model: {family: dit, preset: tiny}
graft: {grafts: [{type: mha, name: hyena_y, config: {}, layers: {ratio: 0.5}}]}
data: {source: synthetic, reader: {batch_size: 2}}
stage2: {optim: {lr: 1.0e-4}}
"""


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\nstage2: {steps: 7}\n")
    recipe = load_recipe(child, ["stage2.optim.lr=5e-5", "deepspeed.zero_stage=3"])
    assert (recipe.name, recipe.stage2.steps, recipe.stage2.optim.lr) == ("child", 7, 5e-5)
    assert recipe.model.preset == "tiny" and recipe.deepspeed.zero_stage == 3
    ds = deepspeed_config(recipe, recipe.stage2.optim, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4
    assert ds["optimizer"]["params"]["lr"] == 5e-5
    assert deepspeed_config(recipe, recipe.stage2.optim, world_size=2, batch_size=3)["train_batch_size"] == 6
    auto = Precision("bf16-mixed" if torch.cuda.is_available() else "fp32").deepspeed()
    assert {k: ds[k] for k in auto} == auto
    mixed = deepspeed_config(load_recipe(child, ["deepspeed.precision=bf16-mixed"]), recipe.stage2.optim, 1)
    assert mixed["torch_autocast"]["enabled"] and not mixed["bf16"]["enabled"]


def test_deepspeed_overrides_merge_into_the_derived_config(tmp_path):
    path = write(tmp_path, "r.yaml", BASE + "deepspeed: {overrides: {zero_optimization: {overlap_comm: true}}}\n")
    recipe = load_recipe(path)
    ds = deepspeed_config(recipe, recipe.stage1.optim, world_size=1)
    assert ds["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                       "reduce_scatter": True}


@pytest.mark.parametrize("extra, message", [
    ("stage2: {optimm: {}}\n", r"\.stage2: unknown key\(s\) \['optimm'\]"),
    ("deepspeed: {zero_stage: 5}\n", "deepspeed.zero_stage: must be one of 0, 1, 2, 3, got 5"),
    ("stage1: {loss: {mha: l3}}\n", "stage1.loss"),
    ("data: {source: shards}\n", "data.train"),
    ("data: {source: synthetic, reader: {batch_sise: 2}}\n", r"\.data\.reader: unknown key\(s\) \['batch_sise'\]"),
    ("data: {source: synthetic, reader: {seed: 3}}\n", "data.reader.seed: is set by the recipe"),
    ("data: {source: shards, train: a.tar, reader: {shards: [b.tar]}}\n", "data.reader.shards: is set by the recipe"),
    ("data: {source: synthetic, reader: {epochs: 1}}\n", "data.reader.epochs: is set by the recipe"),
    ("data: {source: synthetic, reader: {kind: text}}\n", "data.reader.kind: 'text' does not match a dit model"),
    ("data: {source: synthetic, reader: {flip: true}}\n", "data.reader.flip: needs shards"),
    ("data: {source: shards, train: a.tar}\n", "data.val: is not set, so stage 1 would pick"),
    ("stage1: {optim: {schedule: multistep}}\n", "stage1.optim.milestones: must be increasing"),
    ("stage1: {optim: {schedule: multistep, milestones: [5, 2]}}\n", "stage1.optim.milestones: must be increasing"),
    ("stage2: {optim: {plateau: {factor: 0.5}}}\n", "stage2.optim.plateau: stage 1 only"),
    ("stage1: {optim: {plateau: {factor: 2}}}\n", "stage1.optim.plateau: stage 1 only, with 0 < factor < 1"),
    ("stage1: {batch_size: 0}\n", "stage1.batch_size: must be an integer ≥ 1"),
    ("stage1: {optim: {gamma: 0}}\n", r"stage1.optim.gamma: must be a number in \(0, 1\]"),
    ("deepspeed: {precision: bf16, zero_stage: 0}\n", "deepspeed.precision: bf16 needs deepspeed.zero_stage ≥ 1"),
    ("deepspeed: {overrides: {gradient_clipping: 1.0}}\n", "optim.grad_clip instead"),
    ("deepspeed: {precision: bf16_mixed}\n", r"deepspeed.precision: 'bf16_mixed' is not one of"),
])
def test_bad_recipes_name_the_key_and_file(tmp_path, extra, message):
    path = write(tmp_path, "bad.yaml", BASE + extra)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert "bad.yaml" in str(err.value)


def test_bad_override_is_named(tmp_path):
    path = write(tmp_path, "r.yaml", BASE)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\]"):
        load_recipe(path, ["stage2.optim.lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(path, ["stage2.optim.lr"])


def test_bad_graft_in_a_recipe_is_named(tmp_path):
    path = write(tmp_path, "r.yaml", BASE.replace("hyena_y", "hyena_q"))
    with pytest.raises(ConfigError, match="unknown operator 'hyena_q'"):
        load_recipe(path)


def test_lr_schedule_warmup_then_cosine(tmp_path):
    recipe = load_recipe(write(tmp_path, "r.yaml", BASE + "stage1: {optim: {lr: 1.0, warmup_steps: 4, "
                                                         "schedule: cosine, min_lr: 0.1}}\n"))
    factor = lr_factor(recipe.stage1.optim, total_steps=104)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(54) == pytest.approx(0.55) and factor(104) == pytest.approx(0.1)
