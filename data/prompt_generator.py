"""Prompts for teacher generation: compositional templates over our own word lists, deterministic for a seed.

    python -m data.prompt_generator --n 20000 --seed 0 --out prompts.txt      # or prompts.jsonl (with template)

The templates mix free scenes (subject, attribute, action, place, style, lighting, camera) with the kinds of
prompt text-to-image benchmarks probe (counting, two objects, colour binding, spatial relations), so the
synthetic data covers what the grafted model is evaluated on. Every prompt is unique.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

from common.files import save_text
from common.runtime import setup_logging
from data import prompt_words as W

log = logging.getLogger("prompt_generator")

ANIMATE = W.ANIMALS + W.PEOPLE
THINGS = W.OBJECTS + W.VEHICLES + W.FOODS + W.PLANTS
EVERYTHING = ANIMATE + THINGS + W.BUILDINGS
AN_EXCEPTIONS = ("uni", "use", "eu", "one")  # vowel letters sounding like "y" or "w": "a unicorn"
MAX_TRIES_PER_PROMPT = 100


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase's first word."""
    word = phrase.lower()
    return "an" if word[0] in "aeiou" and not word.startswith(AN_EXCEPTIONS) else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def scene(rng: random.Random) -> str:
    """A subject in a place with style and light: the bulk of a general-purpose prompt set."""
    noun = rng.choice(EVERYTHING)
    subject = f"{rng.choice(W.QUALITIES)} {noun[0]}" if rng.random() < 0.6 else noun[0]
    action = f" {rng.choice(W.ACTIONS)}" if noun in ANIMATE and rng.random() < 0.6 else ""
    core = f"{with_article(subject)}{action} {rng.choice(W.SCENES)}"
    extras = [rng.choice(W.LIGHTING)] + ([rng.choice(W.CAMERA)] if rng.random() < 0.5 else [])
    if rng.random() < 0.5:
        return f"{rng.choice(W.STYLES)} of {core}, " + ", ".join(extras)
    return ", ".join([core, *extras, rng.choice(W.STYLES)])


def counting(rng: random.Random) -> str:
    _, plural = rng.choice(W.ANIMALS + W.OBJECTS + W.FOODS + W.PLANTS)
    colour = f"{rng.choice(W.COLORS)} " if rng.random() < 0.4 else ""
    return f"{rng.choice(W.COUNTS)} {colour}{plural} {rng.choice(W.SCENES)}"


def colour_pair(rng: random.Random) -> str:
    (a, _), (b, _) = rng.sample(THINGS + W.ANIMALS, 2)
    ca, cb = rng.sample(W.COLORS, 2)
    tail = f", {rng.choice(W.STYLES)}" if rng.random() < 0.3 else ""
    return f"{with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}{tail}"


def relation(rng: random.Random) -> str:
    (a, _), (b, _) = rng.sample(THINGS + W.ANIMALS, 2)
    first = f"{rng.choice(W.COLORS)} {a}" if rng.random() < 0.5 else a
    second = f"{rng.choice(W.COLORS)} {b}" if rng.random() < 0.5 else b
    return f"{with_article(first)} {rng.choice(W.RELATIONS)} {with_article(second)}"


def portrait(rng: random.Random) -> str:
    person, _ = rng.choice(W.PEOPLE)
    return (f"{rng.choice(W.STYLES)} of {with_article(person)} {rng.choice(W.ATTIRE)}, portrait, "
            f"{rng.choice(W.LIGHTING)}")


def landscape(rng: random.Random) -> str:
    style = rng.choice(W.STYLES)
    return f"{style} of {rng.choice(W.LANDSCAPES)} {rng.choice(W.CONDITIONS)}" + (
        f", {rng.choice(W.CAMERA)}" if rng.random() < 0.5 else "")


def still_life(rng: random.Random) -> str:
    (a, _), (b, plural_b) = rng.sample(W.OBJECTS + W.FOODS, 2)
    return (f"{with_article(f'{rng.choice(W.MATERIALS)} {a}')} beside {rng.choice(W.COUNTS)} {plural_b} on "
            f"{rng.choice(W.SURFACES)}, {rng.choice(W.LIGHTING)}, still life")


def single_object(rng: random.Random) -> str:
    thing, _ = rng.choice(EVERYTHING)
    return f"a photo of {with_article(f'{rng.choice(W.COLORS)} {thing}')}"


#: template → weight (how often it is drawn)
TEMPLATES: dict[str, tuple[Callable[[random.Random], str], float]] = {
    "scene": (scene, 0.32), "counting": (counting, 0.1), "colour_pair": (colour_pair, 0.1),
    "relation": (relation, 0.12), "portrait": (portrait, 0.1), "landscape": (landscape, 0.1),
    "still_life": (still_life, 0.08), "single_object": (single_object, 0.08)}


def generate_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` unique {prompt, template} records, the same for the same (n, seed)."""
    rng = random.Random(seed)
    names = list(TEMPLATES)
    weights = [TEMPLATES[name][1] for name in names]
    seen: set[str] = set()
    records = []
    for _ in range(n * MAX_TRIES_PER_PROMPT):
        name = rng.choices(names, weights)[0]
        prompt = TEMPLATES[name][0](rng)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": prompt, "template": name})
            if len(records) == n:
                return records
    raise ValueError(f"only {len(records)} unique prompts after {n * MAX_TRIES_PER_PROMPT} draws; ask for fewer or "
                     "add words to data/prompt_words.py")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="number of prompts (the paper used 8k + 12k pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help=".txt (one prompt a line) or .jsonl")
    args = parser.parse_args(argv)
    setup_logging()
    records = generate_prompts(args.n, args.seed)
    if args.out.suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records)
    else:
        text = "".join(r["prompt"] + "\n" for r in records)
    save_text(text, args.out)
    log.info("wrote %d prompts (seed %d) to %s", len(records), args.seed, args.out)
    return args.out


if __name__ == "__main__":
    main()
