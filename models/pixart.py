"""PixArt-Sigma transformer in the original repo's module layout, numerically equal to diffusers'
`PixArtTransformer2DModel`, loading both official weight formats.

Keeping the original layout (`blocks.i.attn`, `blocks.i.mlp`, ...) is what lets graft surgery swap operators by
name, the way the paper's code does for DiT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.config import ConfigError
from models.layers import (
    Mlp,
    PatchEmbed,
    SinCosPositions,
    TimestepEmbedder,
    gated_residual,
    modulate,
    run_blocks,
    unpatchify,
)
from models.operators.attention import MultiHeadAttention
from models.operators.attention_core import attention, masked_key_attention
from models.operators.kernels import UsesKernel, pure_backend
from models.pretrained import PretrainedModel
from models.weights import KeyMap, KeyRule, StateDict


@dataclass
class PixArtConfig:
    """Architecture of a PixArt-Sigma transformer; defaults are XL/2 at 1024-MS."""

    sample_size: int = 128  # latent side the model was trained at; base_size = sample_size // patch_size
    interpolation_scale: float = 2.0  # PixArt's pe_interpolation: image_size / 512
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # 2 × in_channels with learned sigma
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = False
    kv_compress: bool = False
    kv_compress_scale: int = 2
    kv_compress_layers: tuple[int, ...] = ()

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens at the trained resolution."""
        return self.base_size**2


_XL2 = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, in_channels=4, out_channels=8)

PIXART_PRESETS: dict[str, dict[str, Any]] = {
    "PixArt-Sigma-XL-2-256x256": dict(_XL2, sample_size=32, interpolation_scale=0.5),
    "PixArt-Sigma-XL-2-512-MS": dict(_XL2, sample_size=64, interpolation_scale=1.0),
    "PixArt-Sigma-XL-2-1024-MS": dict(_XL2, sample_size=128, interpolation_scale=2.0),
    "PixArt-Sigma-XL-2-2K-MS": dict(_XL2, sample_size=256, interpolation_scale=4.0),
    # Tiny architectures of the same family, for tests and the CPU demo.
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, sample_size=8, interpolation_scale=1.0,
                 caption_channels=32, model_max_length=16),
    "tiny-2k-shaped": dict(hidden_size=64, depth=4, num_heads=4, sample_size=32, interpolation_scale=4.0,
                           caption_channels=32, model_max_length=16),
}


class PixArtSelfAttention(MultiHeadAttention):
    """PixArt's self-attention: timm layout plus its own switches, full-width qk-norm and conv KV compression."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, sr_ratio: int = 1):
        super().__init__(dim, num_heads, qkv_bias=True)
        if qk_norm:  # PixArt normalises over the full width, before the head split
            self.q_norm, self.k_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim)
            self.norm = nn.LayerNorm(dim)
            if not self.sr.weight.is_meta:
                nn.init.constant_(self.sr.weight, 1.0 / sr_ratio**2)
                nn.init.zeros_(self.sr.bias)

    def split_heads(self, x: torch.Tensor, hw: tuple[int, int] | None = None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.sr_ratio > 1:
            k, v = self._compress(k, hw), self._compress(v, hw)
        return (q.reshape(b, n, self.num_heads, self.head_dim), k.reshape(b, -1, self.num_heads, self.head_dim),
                v.reshape(b, -1, self.num_heads, self.head_dim))

    def forward_flops(self, tokens: int) -> int:
        if self.sr_ratio > 1:
            raise ValueError("the analytic FLOP count does not cover KV compression (no released model uses it)")
        return super().forward_flops(tokens)

    def _compress(self, t: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if hw is None:
            raise ValueError("KV compression needs the token grid (h, w)")
        b, _, c = t.shape
        t = self.sr(t.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2)
        return self.norm(t)


class CrossAttention(UsesKernel, nn.Module):
    """Image tokens attend to caption tokens (`q_linear`, `kv_linear`, `proj`); padded caption tokens excluded."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).reshape(b, n, self.num_heads, self.head_dim)
        k, v = self.kv_linear(y).reshape(b, y.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        if y_mask is None:
            out, self.backend = attention(q, k, v), pure_backend()
        else:
            out, self.backend = masked_key_attention(q, k, v, y_mask)
        return self.proj(out.reshape(b, n, c))


class PixArtBlock(nn.Module):
    """adaLN-single block: gated self-attention, ungated cross-attention without norm, gated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, sr_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = PixArtSelfAttention(hidden_size, num_heads, qk_norm=qk_norm, sr_ratio=sr_ratio)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None, t0: torch.Tensor,
                hw: tuple[int, int]) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t0.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = gated_residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw))
        x = x + self.cross_attn(x, y, y_mask)
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class CaptionEmbedder(nn.Module):
    """T5 features (caption_channels) → hidden size (`y_proj.fc1`, `y_proj.fc2`)."""

    def __init__(self, caption_channels: int, hidden_size: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PixArtFinalLayer(nn.Module):
    """Final adaLN (from the timestep embedding, not the 6-way block modulation) and linear to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PixArtSigma(PretrainedModel):
    """PixArt-Sigma (PixArtMS) transformer. `model(latents, timestep, caption_features, caption_mask)` →
    (B, out_channels, H, W): the first `in_channels` channels are ε, the rest the learned variance."""

    config_class = PixArtConfig
    presets = PIXART_PRESETS
    dropin_class_name = "GraftedPixArtTransformer2DModel"
    diffusers_class_names = ("PixArtTransformer2DModel", "Transformer2DModel")

    def __init__(self, config: PixArtConfig):
        super().__init__(config)
        c = config
        if c.hidden_size % c.num_heads:
            raise ConfigError(f"hidden_size {c.hidden_size} is not divisible by num_heads {c.num_heads}")
        bad_layers = [i for i in c.kv_compress_layers if not 0 <= i < c.depth]
        if bad_layers:
            raise ConfigError(f"kv_compress_layers {bad_layers} are outside 0..{c.depth - 1}")
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden_size, 6 * c.hidden_size))
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size)
        compressed = set(c.kv_compress_layers) if c.kv_compress else set()
        self.blocks = nn.ModuleList([
            PixArtBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qk_norm,
                        c.kv_compress_scale if i in compressed else 1)
            for i in range(c.depth)
        ])
        self.final_layer = PixArtFinalLayer(c.hidden_size, c.patch_size, c.out_channels)
        # scaled so that every aspect ratio spans the trained position range
        self.pos_embed = SinCosPositions(c.hidden_size, c.base_size, c.interpolation_scale)
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, C, H, W) latents; timestep (B,) or scalar in [0, 1000); encoder_hidden_states
        (B, L, caption_channels) T5 features; encoder_attention_mask (B, L), 1 = real token."""
        b, _, height, width = hidden_states.shape
        p = self.config.patch_size
        hw = (height // p, width // p)
        x = self.x_embedder(hidden_states)
        # the residual stream in the weights' dtype: fp32 under bf16 autocast, whose patch conv gives bf16
        x = (x + self.pos_embed(hw, x.device)).to(self.x_embedder.proj.weight.dtype)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)
        y = encoder_hidden_states.reshape(b, -1, encoder_hidden_states.shape[-1])
        y = self.y_embedder(y.to(x.dtype))
        if encoder_attention_mask is not None and encoder_attention_mask.shape != y.shape[:2]:
            raise ValueError(f"encoder_attention_mask must be (B, L) = {tuple(y.shape[:2])}, "
                             f"got {tuple(encoder_attention_mask.shape)}")
        x = run_blocks(self.blocks, self.gradient_checkpointing, x, y, encoder_attention_mask, t0, hw)
        x = self.final_layer(x, t)
        return unpatchify(x, hw, p, self.config.out_channels)

    # ---- formats ---------------------------------------------------------------------------------------------
    @classmethod
    def key_map(cls, config: PixArtConfig) -> KeyMap:
        if config.qk_norm or config.kv_compress:
            raise ConfigError("diffusers' PixArtTransformer2DModel has no qk-norm or KV compression")
        rules = [
            ("x_embedder.proj", ["pos_embed.proj"]),
            ("t_embedder.mlp.0", ["adaln_single.emb.timestep_embedder.linear_1"]),
            ("t_embedder.mlp.2", ["adaln_single.emb.timestep_embedder.linear_2"]),
            ("t_block.1", ["adaln_single.linear"]),
            ("y_embedder.y_proj.fc1", ["caption_projection.linear_1"]),
            ("y_embedder.y_proj.fc2", ["caption_projection.linear_2"]),
            ("final_layer.linear", ["proj_out"]),
        ]
        for i in range(config.depth):
            o, d = f"blocks.{i}", f"transformer_blocks.{i}"
            rules += [
                (f"{o}.attn.qkv", [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"]),
                (f"{o}.attn.proj", [f"{d}.attn1.to_out.0"]),
                (f"{o}.cross_attn.q_linear", [f"{d}.attn2.to_q"]),
                (f"{o}.cross_attn.kv_linear", [f"{d}.attn2.to_k", f"{d}.attn2.to_v"]),
                (f"{o}.cross_attn.proj", [f"{d}.attn2.to_out.0"]),
                (f"{o}.mlp.fc1", [f"{d}.ff.net.0.proj"]),
                (f"{o}.mlp.fc2", [f"{d}.ff.net.2"]),
            ]
        key_rules = [KeyRule(f"{o}.{s}", tuple(f"{n}.{s}" for n in d)) for o, d in rules for s in ("weight", "bias")]
        key_rules.append(KeyRule("final_layer.scale_shift_table", ("scale_shift_table",)))
        key_rules += [KeyRule(f"blocks.{i}.scale_shift_table", (f"transformer_blocks.{i}.scale_shift_table",))
                      for i in range(config.depth)]
        return KeyMap(key_rules)

    @classmethod
    def config_from_diffusers(cls, dc: dict[str, Any], **overrides) -> PixArtConfig:
        sample_size = dc.get("sample_size", 128)
        use_additional = dc.get("use_additional_conditions")
        if use_additional is None:
            use_additional = sample_size == 128  # diffusers' own default
        expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
                    "norm_elementwise_affine": False, "norm_eps": 1e-6}
        wrong = {k: dc[k] for k, v in expected.items() if k in dc and dc[k] != v}
        if use_additional:
            wrong["use_additional_conditions"] = True
        hidden = dc.get("num_attention_heads", 16) * dc.get("attention_head_dim", 72)
        if dc.get("cross_attention_dim", hidden) != hidden:
            wrong["cross_attention_dim"] = dc["cross_attention_dim"]
        if dc.get("caption_channels") is None:
            wrong["caption_channels"] = None
        if wrong:
            raise ConfigError(f"diffusers PixArt config has settings this PixArt-Sigma model does not implement: "
                              f"{wrong} (expected {expected}, no micro-conditions, caption projection present)")
        interpolation = dc.get("interpolation_scale")
        config = dict(
            sample_size=sample_size,
            interpolation_scale=float(interpolation if interpolation is not None else max(sample_size // 64, 1)),
            patch_size=dc.get("patch_size", 2),
            in_channels=dc.get("in_channels", 4),
            out_channels=dc.get("out_channels") or dc.get("in_channels", 4),
            hidden_size=hidden,
            depth=dc.get("num_layers", 28),
            num_heads=dc.get("num_attention_heads", 16),
            caption_channels=dc["caption_channels"],
        )
        return cls.make_config(None, **{**config, **overrides})

    @classmethod
    def diffusers_config(cls, c: PixArtConfig) -> dict[str, Any]:
        if c.mlp_ratio != 4.0:
            raise ConfigError("diffusers' PixArtTransformer2DModel has a fixed MLP ratio of 4")
        return {
            "_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.42.1",
            "sample_size": c.sample_size, "interpolation_scale": c.interpolation_scale,
            "patch_size": c.patch_size, "in_channels": c.in_channels, "out_channels": c.out_channels,
            "num_layers": c.depth, "num_attention_heads": c.num_heads,
            "attention_head_dim": c.hidden_size // c.num_heads, "cross_attention_dim": c.hidden_size,
            "caption_channels": c.caption_channels, "use_additional_conditions": False,
            "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
            "activation_fn": "gelu-approximate", "attention_bias": True, "num_embeds_ada_norm": 1000,
            "upcast_attention": False, "dropout": 0.0, "norm_num_groups": 32, "attention_type": "default",
        }

    original_extras = ("pos_embed", "y_embedder.y_embedding")

    @staticmethod
    def wrap_original(state: StateDict) -> dict:
        return {"state_dict": state}
