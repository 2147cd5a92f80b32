"""The DiT checkpoint options every DiT command takes (`eval.sample`, `eval.fid`, `eval.locality`), and the model
they describe."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from common.config import parse_assignments
from models.dit import DiT, load_dit

DIT_SAMPLE_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # the DiT paper's sample classes


def add_dit_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """--ckpt / --preset / --graft / --arch, what `dit_from_args` reads."""
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="DiT-XL-2-*.pt, a released grafted model.pt (with --graft), diffusers or export folder")
    parser.add_argument("--preset", help="architecture preset for an original .pt (default: from the file name)")
    parser.add_argument("--graft", type=Path, help="graft spec or paper sampling YAML the checkpoint was trained with")
    parser.add_argument("--arch", nargs="+", default=[], metavar="KEY=VALUE",
                        help="architecture overrides (the operators' width follows hidden_size)")


def arch_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--arch KEY=VALUE ... as a dict of YAML-typed values."""
    return parse_assignments(args.arch, "--arch", "depth=4")


def dit_from_args(args: argparse.Namespace, dtype: torch.dtype) -> DiT:
    """The (grafted) DiT the checkpoint options name."""
    return load_dit(args.ckpt, args.preset, args.graft, arch_overrides(args), dtype)
