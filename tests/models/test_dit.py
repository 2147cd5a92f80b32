"""DiT: original numerics by default, diffusers numerics on request, both formats, CFG as the original."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiTTransformer2DModel

from models.dit import DIFFUSERS_NUMERICS, DiT
from models.weights import CheckpointError
from tests.conftest import max_rel_err

TOL = 1e-5


def diffusers_dit(seed=0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    state = model.state_dict()
    for key in state:  # the official conversion writes one shared embedder into every block
        if ".norm1.emb." in key:
            state[key] = state["transformer_blocks.0." + key.split(".", 2)[2]]
    model.load_state_dict(state)
    return model


def original_numerics(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Patch a diffusers DiT to facebookresearch/DiT numerics: frequency shift 0, pre-MLP LayerNorm eps 1e-6."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    return model


def inputs(batch=3):
    return torch.randn(batch, 4, 8, 8), torch.tensor([0.0, 321.0, 999.0][:batch]), torch.tensor([1, 5, 10][:batch])


def run(ref, ours, x, t, y):
    with torch.no_grad():
        return ours(x, t, y), ref(x, timestep=t, class_labels=y).sample


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit_diffusers")
    diffusers_dit().save_pretrained(path)
    return path


def test_diffusers_numerics_match_diffusers(folder):
    ours = DiT.from_pretrained(folder, numerics="diffusers")
    assert (ours.config.timestep_freq_shift, ours.config.mlp_norm_eps) == (1.0, 1e-5)
    got, expected = run(DiTTransformer2DModel.from_pretrained(folder).eval(), ours, *inputs())
    assert max_rel_err(got, expected) <= TOL


def test_original_numerics_match_patched_diffusers(folder):
    ours = DiT.from_pretrained(folder)  # default: the numerics the weights were trained with
    assert (ours.config.timestep_freq_shift, ours.config.mlp_norm_eps) == (0.0, 1e-6)
    ref = DiTTransformer2DModel.from_pretrained(folder).eval()
    got, expected = run(original_numerics(ref), ours, *inputs())
    assert max_rel_err(got, expected) <= TOL


@pytest.mark.parametrize("difference, at_least", [("timestep_freq_shift", 1e-2), ("mlp_norm_eps", 1e-7)])
def test_each_numeric_difference_is_real(folder, difference, at_least):
    """Each documented difference alone changes the output: the frequency shift by percents, the LayerNorm eps
    slightly at unit-scale activations (more where pre-MLP activations are small)."""
    ours = DiT.from_pretrained(folder, **{difference: DIFFUSERS_NUMERICS[difference]})
    ref = original_numerics(DiTTransformer2DModel.from_pretrained(folder).eval())
    got, expected = run(ref, ours, *inputs())
    assert max_rel_err(got, expected) > at_least


def test_original_checkpoint_round_trip(folder, tmp_path):
    ours = DiT.from_pretrained(folder)
    path = ours.save_original(tmp_path / "DiT-tiny.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["pos_embed"].shape == (1, 16, 64)  # the original stores its fixed pos_embed
    again = DiT.from_pretrained(path, preset="tiny")
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_checkpoint_for_another_resolution_is_refused(folder, tmp_path):
    ours = DiT.from_pretrained(folder)
    path = ours.save_original(tmp_path / "DiT-tiny.pt")
    with pytest.raises(CheckpointError, match="pos_embed"):
        DiT.from_pretrained(path, preset="tiny", input_size=16)


def test_diffusers_round_trip(folder, tmp_path):
    ours = DiT.from_pretrained(folder, numerics="diffusers")
    ours.save_diffusers(tmp_path)
    ref = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    got, expected = run(ref, ours, *inputs())
    assert max_rel_err(got, expected) <= TOL


def test_diverged_block_embedders_are_refused(tmp_path):
    model = diffusers_dit()
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="copies of t_embedder.mlp.0.weight differ"):
        DiT.from_pretrained(tmp_path)


def test_cfg_guides_first_three_channels_like_the_original(folder):
    model = DiT.from_pretrained(folder)
    z = torch.randn(2, 4, 8, 8)
    x, t = torch.cat([z, z]), torch.full((4,), 500.0)
    y = torch.tensor([3, 7, 10, 10])
    with torch.no_grad():
        plain = model(x, t, y)
        guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        guided_all = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guidance_channels=None)
    cond, uncond = plain[:2], plain[2:]
    mix = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(guided[:2, :3], mix[:, :3], atol=1e-5)
    assert torch.equal(guided[:2, 3:], cond[:, 3:])  # channel 3 and the variance: unguided
    assert torch.allclose(guided_all[:2, :4], mix[:, :4], atol=1e-5)
    assert torch.equal(guided[2:, :3], guided[:2, :3])


def test_label_dropout_only_in_training(folder):
    model = DiT.from_pretrained(folder)
    labels = torch.zeros(4096, dtype=torch.long)
    embed = model.y_embedder
    assert torch.equal(embed(labels), embed.embedding_table.weight[labels])
    embed.train()
    dropped = (embed(labels) == embed.embedding_table.weight[10]).all(dim=1).float().mean().item()
    assert 0.07 < dropped < 0.13


def test_xl2_parameter_count():
    with torch.device("meta"):
        model = DiT(DiT.make_config("DiT-XL/2"))
    assert sum(p.numel() for p in model.parameters()) == 674_834_720
    assert model.original_extra_tensors()["pos_embed"].shape == (1, 256, 1152)  # the fixed extra 294,912
