"""Attention locality per layer (the paper's band-k analysis): which self-attention layers already act locally,
and so are the first candidates for a local operator (Hyena, SWA).

    python -m eval.locality dit --ckpt DiT-XL-2-256x256.pt --steps 50 --out runs/locality/dit-xl2
    python -m eval.locality pixart --pipeline weights/pixart_sigma_base --transformer weights/pixart_sigma_2k \
        --prompts prompts.txt --height 2048 --width 2048 --out runs/locality/pixart-2k

Definitions. Tokens lie on the h×w patch grid, flattened row-major as both models do; query i, key j:
- band-k: |i − j| ≤ k in the flattened sequence (the keys SWA with window_size (k, k) sees);
- window-k: |row_i − row_j| ≤ k and |col_i − col_j| ≤ k, the (2k+1)×(2k+1) square around the query.
A layer's share for a region is the softmax attention mass inside it, averaged over queries, heads, batch rows
(prompts or class labels; under CFG the unconditional rows too) and every forward pass of the sampler (i.e. over
its timesteps). "uniform" is the share of a query attending evenly to every key: the chance level.

The probabilities are recomputed inside a forward hook on each `blocks[i].attn` from its input, through the
module's own q/k projection (`split_heads`) and scale, in query blocks so memory stays bounded at 16k tokens.
Outputs: locality.json, locality.md (table), locality.png (per-layer lines for each k) and suggested_graft.yaml
(the most local layers first, for --ratio of the blocks).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from torch import nn
from tqdm.auto import tqdm

from common.files import atomic_write, save_json, save_text
from common.runtime import parse_dtype, pick_device, setup_logging
from common.tables import markdown_table
from data.prompts import read_prompts
from eval.dit_args import DIT_SAMPLE_CLASSES, add_dit_checkpoint_args, dit_from_args
from models.graft import GraftSpec
from models.operators.attention import MultiHeadAttention
from models.pixart import PixArtSigma
from models.sampling import sample_dit, sample_pixart, seeded_noise
from models.text_encoder import T5TextEncoder

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger("locality")

MEASURES = ("band", "window")
LATENT_DOWNSAMPLE = 8  # the VAEs of both models: pixels per latent
MAX_SCORES = 1 << 25  # attention scores materialised at once (B · H · query block · N)


def key_distances(hw: tuple[int, int], queries: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """(Q, N) distance of every key to each query: |i − j| (band) and the grid's Chebyshev distance (window)."""
    keys = torch.arange(hw[0] * hw[1], device=device)
    w = hw[1]
    rows = (queries[:, None] // w - keys[None] // w).abs()
    cols = (queries[:, None] % w - keys[None] % w).abs()
    return {"band": (queries[:, None] - keys[None]).abs(), "window": torch.maximum(rows, cols)}


def region_mass(mass: torch.Tensor, queries: torch.Tensor, hw: tuple[int, int], ks: list[int]
                ) -> dict[str, torch.Tensor]:
    """Attention mass (Q, N) of some queries (summed over any batch and heads) inside each measure's radius k."""
    distances = key_distances(hw, queries, mass.device)
    return {m: torch.stack([mass[d <= k].sum() for k in ks]).double().cpu() for m, d in distances.items()}


def local_mass(q: torch.Tensor, k: torch.Tensor, scale: float, hw: tuple[int, int], ks: list[int]
               ) -> dict[str, torch.Tensor]:
    """Σ over batch, heads and queries of the softmax attention mass within each radius; q, k (B, N, H, Dh)."""
    b, n, h, _ = q.shape
    if k.shape[1] != n or hw[0] * hw[1] != n:
        raise ValueError(f"locality needs one key per query token on the {hw} grid; got {n} queries, "
                         f"{k.shape[1]} keys (KV-compressed attention is not supported)")
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    rows = max(1, MAX_SCORES // (b * h * n))
    totals = {m: torch.zeros(len(ks), dtype=torch.float64) for m in MEASURES}
    for start in range(0, n, rows):
        probs = torch.softmax(q[:, :, start:start + rows] @ k.transpose(-1, -2) * scale, dim=-1)
        queries = torch.arange(start, min(start + rows, n), device=q.device)
        for m, value in region_mass(probs.sum(dim=(0, 1)), queries, hw, ks).items():
            totals[m] += value
    return totals


def uniform_shares(hw: tuple[int, int], ks: list[int]) -> dict[str, list[float]]:
    """The chance level: shares of a query attending evenly to every key (which is what zero queries do)."""
    n = hw[0] * hw[1]
    zeros = torch.zeros(1, n, 1, 1)
    return {m: (v / n).tolist() for m, v in local_mass(zeros, zeros, 1.0, hw, ks).items()}


@dataclass
class LocalityMeter:
    """Forward hooks on every self-attention `blocks[i].attn` of a model, accumulating per-layer local mass."""

    ks: list[int]
    totals: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    skipped: list[int] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self, model: nn.Module) -> LocalityMeter:
        """Hook the attention blocks; grafted blocks (other operators) are skipped and listed."""
        for i, block in enumerate(model.blocks):
            if isinstance(block.attn, MultiHeadAttention):
                self._handles.append(block.attn.register_forward_hook(self._hook(i)))
            else:
                self.skipped.append(i)
        if self.skipped:
            log.info("blocks %s have no self-attention (grafted); they are left out", self.skipped)
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Callable[[MultiHeadAttention, tuple, object], None]:
        def hook(module: MultiHeadAttention, args: tuple, _output: object) -> None:
            x, hw = args[0], args[1] if len(args) > 1 else None
            if hw is None:
                raise ValueError(f"blocks[{layer}].attn was called without its token grid (h, w)")
            q, k, _ = module.split_heads(x, hw)
            mass = local_mass(q, k, module.scale, tuple(hw), self.ks)
            previous = self.totals.setdefault(layer, {m: torch.zeros(len(self.ks), dtype=torch.float64)
                                                      for m in MEASURES})
            for m in MEASURES:
                previous[m] += mass[m]
            self.counts[layer] = self.counts.get(layer, 0) + q.shape[0] * q.shape[1] * q.shape[2]
            self.grid = tuple(hw)

        return hook

    def shares(self) -> dict[int, dict[str, list[float]]]:
        """Layer → measure → share per k (mean over every query, head, batch row and call)."""
        if not self.counts:
            raise RuntimeError("no attention call was recorded; did the model run with the meter attached?")
        return {layer: {m: (self.totals[layer][m] / self.counts[layer]).tolist() for m in MEASURES}
                for layer in sorted(self.counts)}


def suggest_graft(shares: dict[int, dict[str, list[float]]], ks: list[int], depth: int, ratio: float,
                  measure: str, k: int, operator: str) -> tuple[GraftSpec, list[int]]:
    """A graft spec replacing the round(ratio · depth) most local attention layers (by `measure`-`k` share)."""
    if k not in ks:
        raise ValueError(f"--rank-k {k} is not among the measured radii {ks}; add it to --k")
    wanted = round(ratio * depth)
    ranked = sorted(shares, key=lambda layer: -shares[layer][measure][ks.index(k)])
    if wanted > len(ranked):
        log.warning("ratio %.2f asks for %d layers but only %d have attention; suggesting all of them",
                    ratio, wanted, len(ranked))
    chosen = sorted(ranked[:wanted])
    spec = GraftSpec.from_settings(operator, {"indexes": chosen})
    return spec, ranked


def share_rows(result: dict) -> list[list[str]]:
    """A table row per layer (suggested layers marked *), the uniform chance level last."""
    suggested = set(result["suggested_layers"])
    rows = [[f"{layer}{' *' if int(layer) in suggested else ''}", *(f"{v:.3f}" for m in MEASURES for v in values[m])]
            for layer, values in result["layers"].items()]
    return rows + [["uniform", *(f"{v:.3f}" for m in MEASURES for v in result["uniform"][m])]]


def plot_locality(result: dict, path: Path) -> None:
    """Per-layer share for each k, one panel per measure; dotted lines are the uniform chance levels."""
    layers = [int(layer) for layer in result["layers"]]
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(6 * len(MEASURES), 4), sharey=True)
    for ax, m in zip(axes, MEASURES):
        for idx, k in enumerate(result["ks"]):
            line, = ax.plot(layers, [result["layers"][str(layer)][m][idx] for layer in layers], marker="o",
                            label=f"{m}-{k}")
            ax.axhline(result["uniform"][m][idx], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set(title=f"{m}-k share of attention mass", xlabel="layer", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("share (dotted: uniform attention)")
    fig.suptitle(f"{result['model']}: attention locality, {result['grid'][0]}×{result['grid'][1]} tokens")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True)
    common.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="radii to measure")
    common.add_argument("--rank-by", choices=MEASURES, default="band", help="measure that ranks the layers")
    common.add_argument("--rank-k", type=int, default=4, help="radius that ranks the layers (4: the paper's SWA)")
    common.add_argument("--ratio", type=float, default=0.5, help="share of blocks in the suggested graft")
    common.add_argument("--operator", default="hyena_x",
                        help="token mixer of the suggested graft: its settings file in recipes/operators/")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--batch-size", type=int, default=4)
    common.add_argument("--device", default="auto")
    common.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])

    dit = sub.add_parser("dit", parents=[common], help="class-conditional DiT (or a grafted one)")
    add_dit_checkpoint_args(dit)
    dit.add_argument("--classes", type=int, nargs="+", default=list(DIT_SAMPLE_CLASSES))
    dit.add_argument("--steps", type=int, default=50, help="DDPM steps: the timesteps averaged over")
    dit.add_argument("--cfg", type=float, default=1.5)

    px = sub.add_parser("pixart", parents=[common], help="PixArt-Sigma (transformer + T5 from a pipeline folder)")
    px.add_argument("--pipeline", type=Path, required=True, help="folder with text_encoder/ and tokenizer/")
    px.add_argument("--transformer", type=Path, help="transformer folder or .pth (default: the pipeline's)")
    px.add_argument("--preset")
    px.add_argument("--prompt", action="append", default=[])
    px.add_argument("--prompts", type=Path)
    px.add_argument("--height", type=int)
    px.add_argument("--width", type=int)
    px.add_argument("--steps", type=int, default=20)
    px.add_argument("--cfg", type=float, default=4.5)
    return parser.parse_args(argv)


def run_dit(args: argparse.Namespace, meter: LocalityMeter, device: torch.device, dtype: torch.dtype) -> int:
    """Sample the classes with the meter attached; returns the model depth."""
    model = dit_from_args(args, dtype).to(device)
    meter.attach(model)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    for start in tqdm(range(0, len(args.classes), args.batch_size), desc="batches"):
        labels = args.classes[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(labels))]
        sample_dit(model, seeded_noise(seeds, shape, device=device), torch.tensor(labels, device=device),
                   args.steps, args.cfg, seeds=seeds)
    return len(model.blocks)


def run_pixart(args: argparse.Namespace, meter: LocalityMeter, device: torch.device, dtype: torch.dtype) -> int:
    """Sample the prompts with the meter attached (T5 only, no VAE decode); returns the model depth."""
    prompts = args.prompt + ([r["prompt"] for r in read_prompts(args.prompts)] if args.prompts else [])
    if not prompts:
        raise SystemExit("pixart: give at least one --prompt or a --prompts file")
    model = PixArtSigma.from_pretrained(args.transformer or args.pipeline, preset=args.preset, dtype=dtype).to(device)
    t5 = T5TextEncoder(args.pipeline, max_length=model.config.model_max_length, device=str(device), dtype=dtype)
    side = model.config.sample_size * LATENT_DOWNSAMPLE
    height, width = args.height or side, args.width or side
    shape = (model.config.in_channels, height // LATENT_DOWNSAMPLE, width // LATENT_DOWNSAMPLE)
    meter.attach(model)
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="batches"):
        batch = prompts[start:start + args.batch_size]
        embeds, mask = t5.encode(batch)
        negative, negative_mask = t5.encode([""] * len(batch))
        noise = seeded_noise([args.seed + start + i for i in range(len(batch))], shape, device=device)
        sample_pixart(model, noise, embeds, mask, negative, negative_mask, args.steps, args.cfg)
    return len(model.blocks)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging()
    device, dtype = pick_device(args.device), parse_dtype(args.dtype)
    ks = sorted(set(args.k))
    meter = LocalityMeter(ks)
    depth = (run_dit if args.model == "dit" else run_pixart)(args, meter, device, dtype)
    meter.detach()
    shares = meter.shares()
    spec, ranked = suggest_graft(shares, ks, depth, args.ratio, args.rank_by, args.rank_k, args.operator)
    result = {
        "model": args.model, "grid": list(meter.grid), "ks": ks, "depth": depth,
        "definitions": {"band": "|i - j| <= k in the row-major token sequence",
                        "window": "|row_i - row_j| <= k and |col_i - col_j| <= k on the token grid"},
        "layers": {str(layer): values for layer, values in shares.items()},
        "uniform": uniform_shares(meter.grid, ks), "skipped_layers": meter.skipped,
        "ranked_by": f"{args.rank_by}-{args.rank_k}", "ranking": ranked,
        "suggested_layers": spec.grafts[0].layers.indexes, "steps": args.steps, "cfg": args.cfg,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(result, args.out / "locality.json")
    headers = ["layer"] + [f"{m}-{k}" for m in MEASURES for k in ks]
    table = markdown_table(headers, share_rows(result), align="l" + "r" * (len(headers) - 1))
    save_text(table + "\n", args.out / "locality.md")
    plot_locality(result, args.out / "locality.png")
    spec.save_yaml(args.out / "suggested_graft.yaml")
    print(table)
    log.info("most local first (%s-%d): %s; suggested graft → %s", args.rank_by, args.rank_k, ranked,
             args.out / "suggested_graft.yaml")
    return result


if __name__ == "__main__":
    main()
