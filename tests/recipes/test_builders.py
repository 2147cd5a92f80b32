"""A recipe's `data.reader` is the shard reader's own config: every option reaches the reader (and the synthetic
stream), and the recipe fills in the shards and the seed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from data.sample_format import LATENT, LATENT_FLIP
from recipes.batches import BatchSource
from recipes.builders import build_source, build_teacher, check_held_out
from recipes.config import load_recipe
from tests.data.conftest import write_synthetic

RECIPE = """
name: r
seed: 4
model: {family: dit, preset: tiny}
graft: {grafts: [{type: mha, name: hyena_y, config: {}, layers: {ratio: 0.5}}]}
"""


def recipe_with(tmp_path: Path, data: str, overrides: list[str] = ()):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + data)
    recipe = load_recipe(path, list(overrides))
    return recipe, build_teacher(recipe)


def epoch(source, batches: int) -> list[dict]:
    return [batch for _, batch in zip(range(batches), source)]


def test_every_reader_option_reaches_the_shard_reader(tmp_path):
    written = write_synthetic(tmp_path / "shards", 24, 3, kind="class", flip=True)  # 8 shards
    recipe, model = recipe_with(tmp_path, f"""
data:
  source: shards
  train: {tmp_path / "shards"}
  reader: {{batch_size: 3, num_workers: 0, flip: true, latent_size: [8, 8], dtype: fp32, shuffle_buffer: 4}}
stage1: {{select_on: train}}
""")
    halves = [build_source(recipe, model, rank, 2) for rank in range(2)]
    assert isinstance(halves[0], BatchSource)
    assert halves[1].config.seed == recipe.seed and halves[1].config.shuffle_buffer == 4
    read = [epoch(source, 4) for source in halves]  # one epoch: 12 samples a rank
    keys = [[k for b in batches for k in b["keys"]] for batches in read]
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(written)
    flipped = 0
    for batch in read[0] + read[1]:
        assert batch["latent"].dtype == torch.float32
        for key, latent in zip(batch["keys"], batch["latent"]):
            stored = {name: tensor.float() for name, tensor in written[key].items()}
            assert torch.equal(latent, stored[LATENT]) or torch.equal(latent, stored[LATENT_FLIP])
            flipped += torch.equal(latent, stored[LATENT_FLIP])
    assert 0 < flipped < 24  # the flip is drawn per sample

    val = build_source(recipe, model, 0, 2, "val")  # no data.val: the training shards, unshuffled, unflipped
    assert (val.config.seed, val.config.shuffle_buffer, val.config.flip) == (recipe.seed + 1, 0, False)
    for batch in epoch(val, 4):
        for key, latent in zip(batch["keys"], batch["latent"]):
            assert torch.equal(latent, written[key][LATENT].float())

    resumed = build_source(recipe, model, 1, 2)
    resumed.load_state_dict(halves[1].state_dict())
    assert [b["keys"] for b in epoch(resumed, 2)] == [b["keys"] for b in epoch(halves[1], 2)]
    assert [len(b["keys"]) for b in epoch(build_source(recipe, model, 0, 2, batch_size=2), 3)] == [2, 2, 2]


def test_stage_1_refuses_to_pick_its_students_on_training_data(tmp_path):
    write_synthetic(tmp_path / "train", 6, 3, kind="class")
    write_synthetic(tmp_path / "val", 6, 3, kind="class")
    shards = f"data: {{source: shards, train: {tmp_path / 'train'}"
    with pytest.raises(ConfigError, match=r"data.val: is not set.*stage1.select_on=train"):
        recipe_with(tmp_path, shards + "}\n")
    recipe, _ = recipe_with(tmp_path, shards + f", val: {tmp_path / 'val'}}}\n")
    check_held_out(recipe, None)
    recipe, _ = recipe_with(tmp_path, shards + f", val: {tmp_path / 'train'}/*.tar}}\n")
    with pytest.raises(ConfigError, match="data.val: shares 2 shard"):
        check_held_out(recipe, None)


def test_the_synthetic_stream_batches_as_the_reader_says(tmp_path):
    recipe, model = recipe_with(tmp_path, "data: {source: synthetic, reader: {batch_size: 3, latent_size: [8, 6], "
                                          "dtype: bf16}}\n")
    batch = next(iter(build_source(recipe, model, 0, 1)))
    assert batch["latent"].shape == (3, 4, 8, 6) and batch["latent"].dtype == torch.bfloat16


def test_reader_settings_that_contradict_the_model_are_named(tmp_path):
    recipe, model = recipe_with(tmp_path, "data: {source: synthetic, reader: {latent_channels: 8}}\n")
    with pytest.raises(ConfigError, match="data.reader.latent_channels is 8, but the model takes 4"):
        build_source(recipe, model, 0, 1)


def test_training_reads_only_samples_of_the_models_shapes(tmp_path):
    """A tiny PixArt-Sigma takes (4, 8, 8) latents and 32-wide T5 features: 16×16 latents and 24-wide features in
    the shards are skipped and counted, not trained on (nor a matmul error that names no sample)."""
    from data.sample_format import TEXT, shard_sample
    from data.shard_writer import write_shard

    def tensors(i: int) -> dict[str, torch.Tensor]:
        side, width = {1: (16, 32), 2: (8, 24)}.get(i % 4, (8, 32))
        return {LATENT: torch.randn(4, side, side).bfloat16(), TEXT: torch.randn(3, width).bfloat16()}

    for shard in range(2):
        ids = range(shard * 8, shard * 8 + 8)
        write_shard(tmp_path / "shards" / f"s-{shard}.tar", shard, ids,
                    [shard_sample(i, tensors(i), {"index": i}, caption="c") for i in ids])
    path = tmp_path / "p.yaml"
    path.write_text(f"""
name: p
model: {{family: pixart, preset: tiny}}
graft: {{grafts: [{{type: mha, name: hyena_x, config: {{}}, layers: {{ratio: 0.5}}}}]}}
data: {{source: shards, train: {tmp_path / "shards"}, reader: {{batch_size: 2, num_workers: 0, caption_tokens: 4}}}}
stage1: {{select_on: train}}
""")
    recipe = load_recipe(path)
    source = build_source(recipe, build_teacher(recipe), 0, 1)
    batches = epoch(source, 5)  # an epoch of 4 batches, and one of the next (its counts come with it)
    assert sorted(int(k) for b in batches[:4] for k in b["keys"]) == [i for i in range(16) if i % 4 in (0, 3)]
    assert source.config.latent_size == (8, 8) and source.config.text_dim == 32
    assert set(source.skipped) == {"bad_shape"} and source.skipped["bad_shape"] >= 8
