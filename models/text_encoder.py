"""Frozen T5 text encoder (PixArt-Sigma's T5-v1.1-XXL) from a local path: prompts → features and mask."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, T5EncoderModel

from common.hub import local_path
from models.pretrained import component_folder


class T5TextEncoder:
    """T5 encoder and tokenizer from a pipeline folder (`text_encoder/`, `tokenizer/`) or one component folder, a
    local path or a Hub repo id in the local cache.

    Prompts are padded to `max_length` (300 for PixArt-Sigma) with the end-of-sequence token; the mask marks real
    tokens, as PixArt was trained with.
    """

    def __init__(self, path: str | Path, max_length: int = 300, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        root = local_path(path, "T5 folder")
        if not root.is_dir():
            raise FileNotFoundError(f"T5 folder {path}: {root} is not a folder (text_encoder/ and tokenizer/)")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(component_folder(root, "tokenizer"), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(component_folder(root, "text_encoder"), local_files_only=True,
                                                    dtype=dtype).to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_length, dim) features and a (B, max_length) 0/1 mask of real tokens."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        return self.model(ids, attention_mask=mask).last_hidden_state, mask
