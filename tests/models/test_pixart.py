"""PixArt-Sigma: numerical parity with diffusers, both weight formats, presets and loud errors."""
from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from common.config import ConfigError
from models.pixart import PIXART_PRESETS, PixArtSigma
from models.weights import CheckpointError, KeyMap, KeyRule
from tests.conftest import max_rel_err

TOL = 1e-5


def diffusers_pixart(sample_size=8, interpolation_scale=1, layers=2, seed=0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=layers, cross_attention_dim=64, sample_size=sample_size,
                                     patch_size=2, caption_channels=32, interpolation_scale=interpolation_scale,
                                     use_additional_conditions=False).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every tensor clearly non-trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs(batch=3, h=8, w=8, tokens=16):
    x = torch.randn(batch, 4, h, w)
    t = torch.tensor([1.0, 500.0, 999.0][:batch] + [250.0] * max(0, batch - 3))
    y = torch.randn(batch, tokens, 32)
    mask = torch.ones(batch, tokens)
    for i in range(batch):
        mask[i, 3 + 4 * i:] = 0  # partial masks of different lengths
    return x, t, y, mask


def run_both(ref, ours, x, t, y, mask):
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        got = ours(x, t, y, mask)
    return got, expected


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart_diffusers")
    ref = diffusers_pixart()
    ref.save_pretrained(folder)
    return ref, folder


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (12, 8), (16, 16)])
def test_forward_matches_diffusers(reference, hw):
    ref, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    got, expected = run_both(ref, ours, *inputs(3, *hw))
    assert got.shape == (3, 8, *hw)
    assert max_rel_err(got, expected) <= TOL


def test_2k_shaped_interpolation_matches_diffusers(tmp_path):
    """2K-style position embedding (interpolation scale 4, base size = sample_size / 2) at a non-square size."""
    ref = diffusers_pixart(sample_size=32, interpolation_scale=4)
    ref.save_pretrained(tmp_path)
    ours = PixArtSigma.from_pretrained(tmp_path)
    assert ours.config.interpolation_scale == 4 and ours.config.base_size == 16
    got, expected = run_both(ref, ours, *inputs(2, 16, 24))
    assert max_rel_err(got, expected) <= TOL


def test_wrong_qk_mapping_breaks_parity(reference, monkeypatch):
    """The parity check is sensitive to the weight map: swapping q and k in the qkv split must fail it."""
    ref, folder = reference
    good = PixArtSigma.key_map

    def swapped(config):
        rules = [KeyRule(r.original, (r.diffusers[1], r.diffusers[0], r.diffusers[2]), r.mode)
                 if r.original.endswith("attn.qkv.weight") else r for r in good(config).rules]
        return KeyMap(rules)

    monkeypatch.setattr(PixArtSigma, "key_map", classmethod(lambda cls, config: swapped(config)))
    ours = PixArtSigma.from_pretrained(folder)
    got, expected = run_both(ref, ours, *inputs())
    assert max_rel_err(got, expected) > 1e-3


def test_text_mask_excludes_padding(reference):
    """Changing the features of masked-out caption tokens must not change the output."""
    _, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    x, t, y, mask = inputs()
    y2 = y.clone()
    y2[mask == 0] = 100 * torch.randn_like(y2[mask == 0])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, y, mask), ours(x, t, y2, mask), atol=1e-6)
        assert not torch.allclose(ours(x, t, y, None), ours(x, t, y2, None), atol=1e-3)


def test_empty_text_mask_is_an_error(reference):
    _, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    x, t, y, mask = inputs()
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        ours(x, t, y, mask)


def test_original_format_round_trip(reference, tmp_path):
    _, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    path = ours.save_original(tmp_path / "PixArt-Sigma-tiny.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict"} and "blocks.0.attn.qkv.weight" in raw["state_dict"]
    again = PixArtSigma.from_pretrained(path, preset="tiny", caption_channels=32, model_max_length=300)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    # original files may carry the null caption and a fixed pos_embed: both recomputed, so ignored
    raw["state_dict"]["y_embedder.y_embedding"] = torch.randn(300, 32)
    raw["state_dict_ema"] = {k: v + 1 for k, v in raw["state_dict"].items()}
    torch.save(raw, tmp_path / "with_ema.pth")
    ema = PixArtSigma.from_pretrained(tmp_path / "with_ema.pth", preset="tiny", ema=True)
    assert torch.equal(ema.blocks[0].mlp.fc1.weight, ours.blocks[0].mlp.fc1.weight + 1)


def test_diffusers_format_round_trip(reference, tmp_path):
    ref, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    ours.save_diffusers(tmp_path / "transformer")
    reloaded = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    for key, tensor in ref.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[key]), key
    got, expected = run_both(reloaded, ours, *inputs())
    assert max_rel_err(got, expected) <= TOL
    # a pipeline root with a transformer/ subfolder is accepted too
    assert PixArtSigma.from_pretrained(tmp_path).config == ours.config


def test_export_folder_round_trip(reference, tmp_path):
    _, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "export")
    again = PixArtSigma.from_pretrained(tmp_path / "export")
    assert again.config == ours.config
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key


def test_mismatched_checkpoint_names_the_tensors(reference, tmp_path):
    _, folder = reference
    ours = PixArtSigma.from_pretrained(folder)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.extra.weight"] = torch.zeros(1)
    state["final_layer.linear.weight"] = torch.zeros(7, 64)
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        PixArtSigma.from_pretrained(tmp_path / "bad.pth", preset="tiny")
    message = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in message and "blocks.0.attn.extra.weight" in message
    assert "final_layer.linear.weight: checkpoint (7, 64) vs model (32, 64)" in message


def test_original_file_needs_an_architecture(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "model.pth")
    with pytest.raises(ConfigError, match="preset"):
        PixArtSigma.from_pretrained(tmp_path / "model.pth")
    assert PixArtSigma.preset_from_filename(tmp_path / "PixArt-Sigma-XL-2-2K-MS.pth") == "PixArt-Sigma-XL-2-2K-MS"


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        PixArtSigma.make_config("tiny", hiden_size=3)
    with pytest.raises(ConfigError, match="unknown PixArtSigma preset"):
        PixArtSigma.make_config("XL-9")


def test_micro_conditioned_diffusers_config_is_refused():
    with pytest.raises(ConfigError, match="use_additional_conditions"):
        PixArtSigma.config_from_diffusers({"sample_size": 128, "caption_channels": 4096})


@pytest.mark.parametrize("preset", [p for p in PIXART_PRESETS if p.startswith("PixArt-Sigma")])
def test_released_presets_parameter_count(preset):
    with torch.device("meta"):
        model = PixArtSigma(PixArtSigma.make_config(preset))
    assert sum(p.numel() for p in model.parameters()) == 610_856_096


def test_2k_preset_geometry():
    config = PixArtSigma.make_config("PixArt-Sigma-XL-2-2K-MS")
    assert (config.interpolation_scale, config.base_size) == (4.0, 128)
    assert (config.sample_size // config.patch_size) ** 2 == 16384


def test_qk_norm_and_kv_compress_switches():
    model = PixArtSigma(PixArtSigma.make_config("tiny", qk_norm=True, kv_compress=True, kv_compress_layers=(1,)))
    keys = model.state_dict().keys()
    assert "blocks.1.attn.sr.weight" in keys and "blocks.1.attn.norm.weight" in keys
    assert "blocks.0.attn.sr.weight" not in keys
    assert model.blocks[0].attn.q_norm.normalized_shape == (64,)  # full width, before the head split
    x, t, y, mask = inputs(2, 8, 12)
    assert model(x, t, y, mask).shape == (2, 8, 8, 12)
    with pytest.raises(ConfigError, match="KV compression"):
        model.save_diffusers("/nonexistent")


def test_kv_compress_is_an_average_pool_at_init():
    """At its initialisation (weights 1/s², bias 0) the conv compression averages s×s key/value patches."""
    from models.pixart import PixArtSelfAttention

    attn = PixArtSelfAttention(16, 2, sr_ratio=2)
    with torch.no_grad():
        attn.norm.weight.fill_(1.0)
        attn.norm.bias.zero_()
    tokens = torch.randn(1, 4 * 6, 16)
    pooled = torch.nn.functional.avg_pool2d(tokens.transpose(1, 2).reshape(1, 16, 4, 6), 2)
    expected = torch.nn.functional.layer_norm(pooled.flatten(2).transpose(1, 2), (16,))
    assert torch.allclose(attn._compress(tokens, (4, 6)), expected, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(reference):
    _, folder = reference
    grads = []
    x, t, y, mask = inputs()
    for checkpointing in (False, True):
        model = PixArtSigma.from_pretrained(folder).train()
        model.gradient_checkpointing = checkpointing
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
