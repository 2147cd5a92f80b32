"""Training data of the shapes world: ground-truth renders of training prompts, encoded by a pipeline's codec and
text encoder, written as shards in the repo's format (docs/data.md), and prompt files of the world's splits.

    python -m data.shapes_data shards --pipeline runs/shapes_teacher/pipeline --n 200000 --out runs/shapes_shards
    python -m data.shapes_data prompts --split eval --out shapes_eval.jsonl      # GenEval metadata of a split
    python -m data.shapes_data prompts --split train --n 2000 --seed 1 --out prompts.jsonl  # sampled training prompts

Scene i (a tag, then a training prompt, then a random layout) depends only on (--seed, i), so shards are the same
on any rank and after any restart; ranks and restarts work as in data.generate.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.files import check_or_record, save_text
from common.runtime import Rank, setup_logging
from data.sample_format import LATENT, TEXT, encode_image, shard_sample, valid_tokens
from data.shapes import MAX_TOKENS, SIDE, describe, render, split_prompts, training_scenes
from data.shard_writer import DATASET_INFO, ShardPlan, chunks, write_shards
from models.codec import Codec, load_codec
from models.pretrained import model_sha256
from models.text_encoder import T5TextEncoder

log = logging.getLogger("shapes_data")


def scene_samples(indices: range, seed: int, codec: Codec, t5: T5TextEncoder, batch_size: int) -> Iterator[dict]:
    """Shard samples of training scenes `indices`: the render (PNG), its codec latent, the prompt's T5 features
    and metadata (the prompt record, the objects drawn, index and seed)."""
    for batch in chunks(indices, batch_size):
        scenes = training_scenes(len(batch), seed, first=batch[0])
        pixels = np.stack([render(objects) for _, objects in scenes])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = codec.encode(images).cpu()
        features, mask = t5.encode([record["prompt"] for record, _ in scenes])
        for j, (i, (record, objects)) in enumerate(zip(batch, scenes)):
            text = valid_tokens(features[j], mask[j])
            metadata = {**record, "objects": describe(objects), "index": i, "seed": seed, "t5_length": len(text)}
            yield shard_sample(i, {LATENT: latents[j], TEXT: text}, metadata, caption=record["prompt"],
                               image=encode_image(torch.from_numpy(pixels[j]), "png"))


def write_scene_shards(pipeline: Path, out: Path, n: int, seed: int = 0, shard_size: int | None = None,
                       batch_size: int = 256, rank: Rank = Rank()) -> list[Path]:
    """This rank's unfinished shards of `n` training scenes, encoded with `pipeline`'s codec and text encoder.
    The default shard size gives at least 16 shards (enough reader slots for 2 ranks × 2 workers, with room)
    and at most 5,000 scenes a shard."""
    shard_size = shard_size or max(1, min(5000, n // 16))
    codec = load_codec(pipeline)
    t5 = T5TextEncoder(pipeline, max_length=MAX_TOKENS)
    settings = {"world": "shapes", "split": "train", "side": SIDE, "num_scenes": n, "seed": seed,
                "vae_sha256": model_sha256(pipeline, "vae"),
                "text_encoder_sha256": model_sha256(pipeline, "text_encoder", "tokenizer"), "shard_size": shard_size}
    out.mkdir(parents=True, exist_ok=True)
    check_or_record(out / DATASET_INFO, settings, "shards")
    return write_shards(out, ShardPlan(n, shard_size), rank,
                        lambda indices: scene_samples(indices, seed, codec, t5, batch_size), unit="scene")


def main(argv: list[str] | None = None) -> Path | list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shards = sub.add_parser("shards", help="ground-truth renders of training scenes → shards")
    shards.add_argument("--pipeline", type=Path, required=True, help="folder with text_encoder/, tokenizer/, vae/")
    shards.add_argument("--out", type=Path, required=True)
    shards.add_argument("--n", type=int, required=True, help="number of scenes")
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--shard-size", type=int, help="scenes a shard (default: n / 16, at most 5,000)")
    shards.add_argument("--batch-size", type=int, default=256)
    prompts = sub.add_parser("prompts", help="a split's prompts as GenEval metadata (JSON lines)")
    prompts.add_argument("--split", choices=["train", "val", "eval", "all"], default="eval")
    prompts.add_argument("--n", type=int, help="sample N prompts of the training stream instead (train split only)")
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rank = Rank.from_env()
    setup_logging(rank.rank)
    if args.command == "shards":
        return write_scene_shards(args.pipeline, args.out, args.n, args.seed, args.shard_size, args.batch_size, rank)
    if args.n is not None:
        if args.split != "train":
            parser.error("--n samples the training stream; use it with --split train")
        records = [record for record, _ in training_scenes(args.n, args.seed)]
    else:
        records = split_prompts(args.split)
    save_text("".join(json.dumps(r) + "\n" for r in records), args.out)
    log.info("%d %s prompts → %s", len(records), args.split, args.out)
    return args.out


if __name__ == "__main__":
    main()
