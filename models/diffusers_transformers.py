"""Our PixArt-Sigma and DiT, grafted or not, as diffusers models: drop-in `transformer`s for diffusers'
`PixArtSigmaPipeline` and `DiTPipeline`.

    transformer = GraftedPixArtTransformer2DModel.from_pretrained("runs/x/export")
    pipe = PixArtSigmaPipeline.from_pretrained(base_pipeline_folder, transformer=transformer)

A wrapper owns the wrapped model's modules itself, so its state dict is the model's own (original key layout, the
layout of our export folders) and it computes exactly what the model computes. To the pipeline it is a ModelMixin:
`config.sample_size / in_channels / out_channels`, `dtype`, `device`, and the forward signature and return type of
`PixArtTransformer2DModel` / `DiTTransformer2DModel`.

`pipe.save_pretrained(folder)` writes `transformer/config.json` (`_class_name` this class, the `architecture` and
the `graft` spec) beside `transformer/diffusion_pytorch_model.safetensors`, and model_index.json names this module
(`models.diffusers_transformers`), which diffusers imports to load the folder again: the repo must be importable
(`pip install -e .` or PYTHONPATH). Our own loaders (`PixArtSigma.from_pretrained`, `DiT.from_pretrained`) read
such folders too.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin  # diffusers finds the load method through ModelMixin in this namespace
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from common.config import ConfigError, from_dict, to_dict
from common.hub import local_path
from models.dit import DiT
from models.graft import GraftSpec
from models.pixart import PixArtSigma
from models.pretrained import PretrainedModel, component_folder, read_config


def graft_config(spec: GraftSpec | None) -> dict[str, Any] | None:
    """A resolved graft spec as stored in a config, without per-block operator files (the weights hold them)."""
    if spec is None:
        return None
    return GraftSpec([replace(g, weights={}) for g in spec.grafts]).to_dict()


class _GraftedTransformer(ModelMixin, ConfigMixin):
    """A `core_class` model presented to diffusers; subclasses add the diffusers forward signature."""

    core_class: ClassVar[type[PretrainedModel]]
    _supports_gradient_checkpointing = False  # train through the wrapped model (`.model`), as our recipes do

    @register_to_config
    def __init__(self, sample_size: int | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, architecture: dict[str, Any] | None = None,
                 graft: dict[str, Any] | None = None):
        """`architecture`: the wrapped model's config (PixArtConfig / DiTConfig fields); `graft`: its graft spec.
        The three pipeline-facing sizes follow from the architecture (given ones must agree)."""
        super().__init__()
        where = f"{type(self).__name__} config"
        config = from_dict(self.core_class.config_class, architecture or {}, where=f"{where} architecture")
        model = self.core_class(config)
        if graft:
            GraftSpec.from_dict(graft, where=f"{where} graft").apply(model)
        self._adopt(model)
        derived = self.pipeline_config(config)
        given = {"sample_size": sample_size, "in_channels": in_channels, "out_channels": out_channels}
        wrong = {k: v for k, v in given.items() if v is not None and v != derived[k]}
        if wrong:
            raise ConfigError(f"{where}: {wrong} disagree with the architecture, which gives {derived}")
        self.register_to_config(**derived)

    @staticmethod
    def pipeline_config(config) -> dict[str, int]:
        """The sizes diffusers' pipelines read from `transformer.config`."""
        raise NotImplementedError

    def _adopt(self, model: PretrainedModel) -> None:
        """Make `model`'s modules this module's own; `model` stays reachable as `.model`, not as a submodule."""
        if next(model.named_parameters(recurse=False), None) or next(model.named_buffers(recurse=False), None):
            raise TypeError(f"{type(model).__name__} keeps tensors outside its submodules; they would be lost")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["_model"] = model

    @property
    def model(self) -> PretrainedModel:
        """The wrapped PixArtSigma / DiT; it shares every module and tensor with this wrapper."""
        return self.__dict__["_model"]

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.training = mode
        return self

    @classmethod
    def from_model(cls, model: PretrainedModel):
        """Wrap a loaded model without copying its weights."""
        if not isinstance(model, cls.core_class):
            raise TypeError(f"{cls.__name__} wraps a {cls.core_class.__name__}, not a {type(model).__name__}")
        kwargs = {**cls.pipeline_config(model.config), "architecture": to_dict(model.config),
                  "graft": graft_config(model.graft)}
        with torch.device("meta"):  # the throwaway twin only registers the config
            wrapper = cls(**kwargs)
        wrapper._adopt(model)
        return wrapper.train(model.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """A folder this class wrote (its own `save_pretrained`, or a pipeline's `transformer/`) loads the diffusers
        way; anything `PixArtSigma.from_pretrained` / `DiT.from_pretrained` read (our export folders, diffusers
        PixArtTransformer2DModel / DiTTransformer2DModel folders, original checkpoints) is loaded by them and
        wrapped. Paths may be Hub repo ids already in the local cache. `subfolder` and `torch_dtype` work for
        both; other keyword arguments go to whichever loader reads the folder (e.g. `numerics="diffusers"`)."""
        path = local_path(pretrained_model_name_or_path, f"{cls.__name__} checkpoint")
        subfolder = kwargs.pop("subfolder", None)
        path = path / subfolder if subfolder else path
        folder = component_folder(path, "transformer") if path.is_dir() else path
        if folder.is_dir() and read_config(folder).get("_class_name") == cls.__name__:
            return super().from_pretrained(str(folder), **kwargs)
        dtype = kwargs.pop("torch_dtype", None)
        return cls.from_model(cls.core_class.from_pretrained(path, dtype=dtype, **kwargs))

    def _check_unused(self, **arguments: Any) -> None:
        given = sorted(k for k, v in arguments.items() if v)
        if given:
            raise ValueError(f"{type(self).__name__} does not take {given}: {self.core_class.__name__} has no use "
                             "for them")

    @staticmethod
    def _output(sample: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class GraftedPixArtTransformer2DModel(_GraftedTransformer):
    """PixArt-Sigma (`models.pixart.PixArtSigma`), grafted or not, with `PixArtTransformer2DModel`'s interface."""

    core_class = PixArtSigma

    @staticmethod
    def pipeline_config(config) -> dict[str, int]:
        return {"sample_size": config.sample_size, "in_channels": config.in_channels,
                "out_channels": config.out_channels}

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None, attention_mask: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        """As `PixArtTransformer2DModel.forward`: latents (B, C, H, W), T5 features, timesteps, and the (B, L) 0/1
        caption mask → (B, out_channels, H, W). PixArt-Sigma has no micro-conditions and no image-token mask."""
        micro = {k: v for k, v in (added_cond_kwargs or {}).items() if v is not None}
        self._check_unused(added_cond_kwargs=micro, cross_attention_kwargs=cross_attention_kwargs,
                           attention_mask=attention_mask is not None)
        if encoder_hidden_states is None or timestep is None:
            raise ValueError("encoder_hidden_states and timestep are required")
        if encoder_attention_mask is not None and encoder_attention_mask.ndim != 2:
            raise ValueError(f"encoder_attention_mask must be a (B, L) 0/1 mask of real caption tokens, got shape "
                             f"{tuple(encoder_attention_mask.shape)}")
        sample = self.model(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)
        return self._output(sample, return_dict)


class GraftedDiTTransformer2DModel(_GraftedTransformer):
    """DiT (`models.dit.DiT`), grafted or not, with `DiTTransformer2DModel`'s interface. Its numerics are the wrapped
    model's: original by default, diffusers' with `from_pretrained(..., numerics="diffusers")` on a diffusers
    folder (README, "Numerics")."""

    core_class = DiT

    @staticmethod
    def pipeline_config(config) -> dict[str, int]:
        return {"sample_size": config.input_size, "in_channels": config.in_channels,
                "out_channels": config.out_channels}

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, cross_attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True):
        """As `DiTTransformer2DModel.forward`: latents, timesteps, class labels (num_classes = the null class)."""
        self._check_unused(cross_attention_kwargs=cross_attention_kwargs)
        if timestep is None or class_labels is None:
            raise ValueError("timestep and class_labels are required")
        return self._output(self.model(hidden_states, timestep, class_labels), return_dict)
