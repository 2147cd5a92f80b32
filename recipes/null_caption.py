"""Write the T5 features of the empty prompt, the "null caption" stage 2 swaps in for caption dropout.

    python -m recipes.null_caption --pipeline weights/pixart_sigma_base --out data/pixart_2k/null_caption.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.text_encoder import T5TextEncoder
from models.weights import save_safetensors


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, required=True, help="folder with text_encoder/ and tokenizer/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=300)
    args = parser.parse_args(argv)
    embedding, mask = T5TextEncoder(args.pipeline, max_length=args.max_length).encode([""])
    save_safetensors({"embedding": embedding[0].to(torch.bfloat16), "mask": mask[0]}, args.out)
    return args.out


if __name__ == "__main__":
    main()
