"""Tiny, randomly initialised stand-ins of the real artefacts, written in the real on-disk formats.

The real weights (PixArt-Sigma, T5-XXL, SDXL VAE) cannot be downloaded on CPU-only CI machines, so tests and the
CPU demo build architecture-identical miniatures here and load them through the same loaders users point at the
real folders.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    ModelMixin,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from models.diffusion import ddim_scheduler, pixart_scheduler
from models.dit import DiT
from models.pixart import PixArtSigma
from models.vae import SD_SCALING, SDXL_SCALING
from models.weights import load_strict

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
BASE_WORDS = ("a an the of and with on in to photo picture image left right above below next one two three four "
              "red green blue yellow purple orange black white pink brown gray circle square triangle "
              "cat dog car tree house bird apple cup").split()


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with T5's special tokens and its trailing `</s>`."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words or BASE_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def words_of(prompts: list[str]) -> list[str]:
    """The vocabulary a word-level tokenizer needs for `prompts`."""
    return sorted({w for p in prompts for w in re.findall(r"\w+|[^\w\s]", p.lower())})


def build_t5(vocab_size: int, d_model: int = 32, seed: int = 0, num_layers: int = 2) -> T5EncoderModel:
    """A small, randomly initialised T5 encoder (gated-GELU, as T5-v1.1; 4 heads of d_model / 4)."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def build_vae(seed: int = 0, scaling_factor: float = SDXL_SCALING) -> AutoencoderKL:
    """An 8× downsampling AutoencoderKL with SDXL's latent scaling (or another), a few thousand parameters."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64,
                         scaling_factor=scaling_factor).eval()


def build_pixart(preset: str = "tiny", seed: int = 0, **overrides) -> PixArtSigma:
    """A randomly initialised PixArt-Sigma of a (tiny) preset."""
    torch.manual_seed(seed)
    return PixArtSigma(PixArtSigma.make_config(preset, **overrides)).eval()


def diffusers_twin(model: PixArtSigma | DiT, diffusers_class: type[ModelMixin]) -> ModelMixin:
    """The same weights as diffusers' own transformer class (`PixArtTransformer2DModel`, `DiTTransformer2DModel`)."""
    twin = diffusers_class.from_config(model.diffusers_config(model.config))
    load_strict(twin, model.key_map(model.config).to_diffusers(model.state_dict()), f"{diffusers_class.__name__}")
    return twin.eval()


def write_tiny_pipeline(folder: str | Path, preset: str = "tiny", words: list[str] | None = None,
                        seed: int = 0) -> Path:
    """A diffusers PixArt-Sigma pipeline folder, as `PixArtSigmaPipeline.save_pretrained` writes it: model_index.json,
    transformer/, text_encoder/, tokenizer/, vae/, scheduler/ (DPM-Solver++ as the real pipelines ship)."""
    tokenizer = build_tokenizer(words)
    model = build_pixart(preset, seed=seed)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, vae=build_vae(seed=seed), scheduler=pixart_scheduler(),
                               text_encoder=build_t5(len(tokenizer), d_model=model.config.caption_channels, seed=seed),
                               transformer=diffusers_twin(model, PixArtTransformer2DModel))
    pipe.save_pretrained(folder)
    return Path(folder)


def write_tiny_dit_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A diffusers DiT pipeline folder (model_index.json, transformer/, vae/, scheduler/) of a tiny DiT with 1000
    classes (DiTPipeline's null class is 1000), SD latent scaling and DDIM, as facebook/DiT-XL-2-* ship."""
    torch.manual_seed(seed)
    model = DiT(DiT.make_config("tiny", num_classes=1000)).eval()
    pipe = DiTPipeline(transformer=diffusers_twin(model, DiTTransformer2DModel), scheduler=ddim_scheduler(),
                       vae=build_vae(seed=seed, scaling_factor=SD_SCALING))
    pipe.save_pretrained(folder)
    return Path(folder)
