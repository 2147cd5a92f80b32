"""DiT (Peebles & Xie) with the numerics of facebookresearch/DiT, which its weights were trained with, loading the
original `DiT-XL-2-*.pt` files and diffusers `DiTTransformer2DModel` folders.

diffusers' DiT differs numerically in two places, both config switches here:
- `timestep_freq_shift`: diffusers divides the sinusoid exponent by (128 - 1) instead of 128 (shift 1, original 0);
- `mlp_norm_eps`: diffusers' pre-MLP LayerNorm uses the config's norm_eps (1e-5), the original 1e-6.
`DiT.from_pretrained(folder, numerics="diffusers")` reproduces diffusers exactly; the default is the original.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from common.config import ConfigError
from models.graft import GraftSpec
from models.layers import (
    Mlp,
    PatchEmbed,
    SinCosPositions,
    TimestepEmbedder,
    gated_residual,
    modulate,
    run_blocks,
    sincos_pos_embed_2d,
    unpatchify,
)
from models.operators.attention import MultiHeadAttention
from models.pretrained import PretrainedModel
from models.weights import CheckpointError, KeyMap, KeyRule, StateDict


@dataclass
class DiTConfig:
    """Architecture of a class-conditional DiT; defaults are DiT-XL/2 at 256×256 with original numerics."""

    input_size: int = 32  # latent side: image_size // 8
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    timestep_freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        """Tokens at the trained resolution."""
        return (self.input_size // self.patch_size) ** 2


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=patch)
    for size, (d, h, n) in _SIZES.items() for patch in (2, 4, 8)
}
DIT_PRESETS.update({
    "DiT-XL-2-256x256": dict(DIT_PRESETS["DiT-XL/2"], input_size=32),
    "DiT-XL-2-512x512": dict(DIT_PRESETS["DiT-XL/2"], input_size=64),
    "tiny": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10),
})
DIFFUSERS_NUMERICS = dict(timestep_freq_shift=1.0, mlp_norm_eps=1e-5)


class LabelEmbedder(nn.Module):
    """Class label → vector; the extra last row is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: per-block modulation from the (timestep + class) vector."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, mlp_norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        mod = self.adaLN_modulation(c)[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw))
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class DiTFinalLayer(nn.Module):
    """Final adaLN and linear to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(PretrainedModel):
    """Class-conditional DiT. `model(latents, timestep, class_labels)` → (B, out_channels, H, W)."""

    config_class = DiTConfig
    presets = DIT_PRESETS
    dropin_class_name = "GraftedDiTTransformer2DModel"
    diffusers_class_names = ("DiTTransformer2DModel", "Transformer2DModel")
    original_extras = ("pos_embed",)

    def __init__(self, config: DiTConfig):
        super().__init__(config)
        c = config
        if c.hidden_size % c.num_heads:
            raise ConfigError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size, freq_shift=c.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp_norm_eps)
                                     for _ in range(c.depth)])
        self.final_layer = DiTFinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        self.pos_embed = SinCosPositions(c.hidden_size)  # plain arange grid: the original's fixed pos_embed
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) latents, timestep (B,) or scalar, class_labels (B,) (num_classes = null class)."""
        b, _, height, width = x.shape
        p = self.config.patch_size
        hw = (height // p, width // p)
        tokens = self.x_embedder(x)
        # the residual stream in the weights' dtype: fp32 under bf16 autocast, whose patch conv gives bf16
        tokens = (tokens + self.pos_embed(hw, tokens.device)).to(self.x_embedder.proj.weight.dtype)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        c = self.t_embedder(timestep) + self.y_embedder(class_labels)
        tokens = run_blocks(self.blocks, self.gradient_checkpointing, tokens, c, hw)
        return unpatchify(self.final_layer(tokens, c), hw, p, self.config.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                         cfg_scale: float, guidance_channels: int | None = 3) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half is the null class, as the original does.

        The original guides only the first 3 latent channels ("for exact reproducibility"); pass
        `guidance_channels=None` to guide all `in_channels` (diffusers' DiTPipeline).
        """
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), timestep, class_labels)
        k = self.config.in_channels if guidance_channels is None else guidance_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    # ---- formats ---------------------------------------------------------------------------------------------
    def check_original_extras(self, extras: StateDict, source: str) -> None:
        if "pos_embed" not in extras:
            return
        stored = extras["pos_embed"].float().reshape(-1, self.config.hidden_size)
        grid = self.config.input_size // self.config.patch_size
        expected = sincos_pos_embed_2d(self.config.hidden_size, (grid, grid))
        if stored.shape != expected.shape or not torch.allclose(stored, expected, atol=1e-5):
            raise CheckpointError(f"{source}: pos_embed {tuple(extras['pos_embed'].shape)} does not match a "
                                  f"{grid}×{grid} token grid (input_size {self.config.input_size}); "
                                  "is this a checkpoint for another resolution?")

    def original_extra_tensors(self) -> StateDict:
        grid = self.config.input_size // self.config.patch_size
        return {"pos_embed": sincos_pos_embed_2d(self.config.hidden_size, (grid, grid))[None]}

    @classmethod
    def key_map(cls, config: DiTConfig) -> KeyMap:
        blocks = [f"transformer_blocks.{i}" for i in range(config.depth)]
        rules = [
            ("x_embedder.proj", ["pos_embed.proj"], "split"),
            ("t_embedder.mlp.0", [f"{b}.norm1.emb.timestep_embedder.linear_1" for b in blocks], "replicate"),
            ("t_embedder.mlp.2", [f"{b}.norm1.emb.timestep_embedder.linear_2" for b in blocks], "replicate"),
            ("final_layer.adaLN_modulation.1", ["proj_out_1"], "split"),
            ("final_layer.linear", ["proj_out_2"], "split"),
        ]
        for i, d in enumerate(blocks):
            o = f"blocks.{i}"
            rules += [
                (f"{o}.adaLN_modulation.1", [f"{d}.norm1.linear"], "split"),
                (f"{o}.attn.qkv", [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"], "split"),
                (f"{o}.attn.proj", [f"{d}.attn1.to_out.0"], "split"),
                (f"{o}.mlp.fc1", [f"{d}.ff.net.0.proj"], "split"),
                (f"{o}.mlp.fc2", [f"{d}.ff.net.2"], "split"),
            ]
        key_rules = [KeyRule(f"{o}.{s}", tuple(f"{n}.{s}" for n in d), mode)
                     for o, d, mode in rules for s in ("weight", "bias")]
        key_rules.append(KeyRule("y_embedder.embedding_table.weight",
                                 tuple(f"{b}.norm1.emb.class_embedder.embedding_table.weight" for b in blocks),
                                 "replicate"))
        return KeyMap(key_rules)

    @classmethod
    def config_from_diffusers(cls, dc: dict[str, Any], numerics: str = "original", **overrides) -> DiTConfig:
        if dc.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ConfigError(f"diffusers DiT config has norm_type {dc['norm_type']!r}; expected 'ada_norm_zero'")
        if numerics not in ("original", "diffusers"):
            raise ConfigError(f"numerics must be 'original' or 'diffusers', got {numerics!r}")
        in_channels = dc.get("in_channels", 4)
        out_channels = dc.get("out_channels") or in_channels
        if out_channels not in (in_channels, 2 * in_channels):
            raise ConfigError(f"out_channels {out_channels} must be in_channels or 2 × in_channels")
        config = dict(
            input_size=dc.get("sample_size", 32), patch_size=dc.get("patch_size", 2), in_channels=in_channels,
            hidden_size=dc.get("num_attention_heads", 16) * dc.get("attention_head_dim", 72),
            depth=dc.get("num_layers", 28), num_heads=dc.get("num_attention_heads", 16),
            num_classes=dc.get("num_embeds_ada_norm", 1000), learn_sigma=out_channels == 2 * in_channels,
        )
        if numerics == "diffusers":
            config.update(timestep_freq_shift=1.0, mlp_norm_eps=float(dc.get("norm_eps", 1e-5)))
        return cls.make_config(None, **{**config, **overrides})

    @classmethod
    def diffusers_config(cls, c: DiTConfig) -> dict[str, Any]:
        if c.mlp_ratio != 4.0 or c.class_dropout_prob <= 0:
            raise ConfigError("diffusers' DiTTransformer2DModel has MLP ratio 4 and a null-class embedding")
        return {
            "_class_name": "DiTTransformer2DModel", "_diffusers_version": "0.42.1",
            "sample_size": c.input_size, "patch_size": c.patch_size, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "num_layers": c.depth, "num_attention_heads": c.num_heads,
            "attention_head_dim": c.hidden_size // c.num_heads, "num_embeds_ada_norm": c.num_classes,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": c.mlp_norm_eps,
            "activation_fn": "gelu-approximate", "attention_bias": True, "dropout": 0.0,
            "norm_num_groups": 32, "upcast_attention": False,
        }


def load_dit(ckpt: str | Path, preset: str | None = None, graft_file: str | Path | None = None,
             arch: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> DiT:
    """A (grafted) DiT from any checkpoint format; with one of the paper's sampling YAMLs as `graft_file`, its
    `dit_model_name` and `image_size` supply the architecture when no preset is given."""
    graft, arch = None, dict(arch or {})
    if graft_file is not None:
        graft_file = Path(graft_file)
        graft = GraftSpec.from_yaml(graft_file)
        sample = (yaml.safe_load(graft_file.read_text()) or {}).get("sample_config") or {}
        if preset is None and "dit_model_name" in sample:
            preset = sample["dit_model_name"]
            arch = {"input_size": int(sample.get("image_size", 256)) // 8, **arch}
        if "hidden_size" in arch:
            graft = graft.with_width(arch["hidden_size"])
    return DiT.from_pretrained(ckpt, preset=preset, dtype=dtype, graft=graft, **arch)
