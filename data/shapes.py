"""The shapes world: a procedural text-to-image world where GenEval can be scored exactly.

Flat coloured circles, squares and triangles on a light background, described by prompts in GenEval's schema and
templates over its six tags. Everything here is specified exactly (docs/shapes.md), so an exact detector
(`eval/geneval/shapes.py`) can check any image, and ground-truth renders score 1.0 under the official rules.
Prompt files and training shards: `python -m data.shapes_data`.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

SIDE = 32  # images are SIDE × SIDE RGB
BACKGROUND = (245, 245, 245)
PALETTE: dict[str, tuple[int, int, int]] = {  # GenEval colour names → RGB, exactly
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
    "yellow": (240, 215, 20), "purple": (140, 40, 180), "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = (10, 14)  # an object's box is s × s pixels, s uniform in this range (inclusive)
GAP = 2  # the boxes of two objects are at least this many pixels apart (so objects never touch)
MAX_COUNT = 3  # counting prompts ask for 2 or 3 objects
MAX_TOKENS = 16  # text-encoder tokens of the longest prompt (11 with the end-of-sequence token), with room
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PAIRS = list(itertools.permutations(range(len(SHAPES)), 2))  # ordered pairs of distinct shapes, as indexes
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")  # GenEval's words
Split = Literal["train", "val", "eval", "all"]
VAL_PER_TAG = 12  # the validation split: at most this many training prompts per tag, evenly spaced


# ---- shapes and rendering ------------------------------------------------------------------------------------
def shape_mask(kind: str, width: int, height: int) -> np.ndarray:
    """(height, width) bool: the pixels of a shape filling a width × height box, touching all four sides.

    A pixel belongs to the shape when its centre does: the ellipse inscribed in the box (circle), the whole box
    (square), or the isosceles triangle with its apex at the top centre and its base on the bottom row, widening
    by width / (2·height) per row on each side (triangle).
    """
    y, x = np.mgrid[0:height, 0:width] + 0.5
    if kind == "circle":
        return ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1.0
    if kind == "square":
        return np.ones((height, width), dtype=bool)
    if kind == "triangle":
        return np.abs(x - width / 2) <= (width / 2) * (y + 0.5) / height
    raise ValueError(f"unknown shape {kind!r}; the shapes world has {SHAPES}")


@dataclass(frozen=True)
class Shape:
    """One object: its kind, colour name and box (top-left corner x, y; side `size`)."""

    kind: str
    color: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """[x1, y1, x2, y2) in pixels, the convention of the detector's boxes (max + 1)."""
        return self.x, self.y, self.x + self.size, self.y + self.size

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2


def render(objects: Sequence[Shape], side: int = SIDE) -> np.ndarray:
    """(side, side, 3) uint8: the background, then each object's pixels in its exact palette colour."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        if x1 < 0 or y1 < 0 or x2 > side or y2 > side:
            raise ValueError(f"{obj} does not fit a {side}×{side} image")
        region = image[y1:y2, x1:x2]
        region[shape_mask(obj.kind, obj.size, obj.size)] = PALETTE[obj.color]
    return image


# ---- layouts ---------------------------------------------------------------------------------------------------
def apart(a: Shape, b: Shape, gap: int = GAP) -> bool:
    """The two boxes are at least `gap` pixels apart horizontally or vertically."""
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return ax2 + gap <= bx1 or bx2 + gap <= ax1 or ay2 + gap <= by1 or by2 + gap <= ay1


def clearly(relation: str, a: Shape, b: Shape, gap: int = GAP) -> bool:
    """`a` is `relation` `b` with a margin: the boxes are disjoint along the relation's axis (by `gap`) and the
    centres are at most half as far apart across it. GenEval's rule then always finds the relation (its shrunk,
    normalised offset is at least 0.8 / √1.25 ≈ 0.72 > 0.5 along that axis)."""
    (acx, acy), (bcx, bcy) = a.center, b.center
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    if relation == "left of":
        return ax2 + gap <= bx1 and abs(acy - bcy) <= abs(acx - bcx) / 2
    if relation == "right of":
        return bx2 + gap <= ax1 and abs(acy - bcy) <= abs(acx - bcx) / 2
    if relation == "above":
        return ay2 + gap <= by1 and abs(acx - bcx) <= abs(acy - bcy) / 2
    if relation == "below":
        return by2 + gap <= ay1 and abs(acx - bcx) <= abs(acy - bcy) / 2
    raise ValueError(f"unknown relation {relation!r}; GenEval's relations are {RELATIONS}")


def layout(record: dict, rng: random.Random, side: int = SIDE, tries: int = 1000) -> list[Shape]:
    """A random scene that satisfies a GenEval prompt record exactly: the included objects (count, colour when
    given, a random palette colour otherwise), nothing else, every pair `apart`, and for a position record the
    second include `clearly` in its relation to the first. Objects are listed in include order."""
    wanted = [(req["class"], req.get("color")) for req in record["include"] for _ in range(req["count"])]
    for name, color in wanted:
        if name not in SHAPES or (color is not None and color not in PALETTE):
            raise ValueError(f"prompt {record.get('prompt')!r}: {color or ''} {name} is not in the shapes world "
                             f"(shapes {SHAPES}, colours {tuple(PALETTE)})")
    position = next((req["position"] for req in record["include"] if "position" in req), None)
    for _ in range(tries):
        objects: list[Shape] = []
        for name, color in wanted:
            size = rng.randint(*SIZES)
            obj = Shape(name, color or rng.choice(list(PALETTE)), rng.randint(0, side - size),
                        rng.randint(0, side - size), size)
            if not all(apart(obj, other) for other in objects):
                break
            objects.append(obj)
        else:
            if position is None or clearly(position[0], objects[-1], objects[position[1]]):
                return objects
    raise RuntimeError(f"no layout found for {record.get('prompt')!r} in {tries} tries")


# ---- prompts (GenEval's schema and templates) --------------------------------------------------------------------
def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel, otherwise "a"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(word: str) -> str:
    """GenEval's plural rule: "es" after a trailing "s", otherwise "s"."""
    return word + ("es" if word.endswith("s") else "s")


def prompt_record(tag: str, classes: Sequence[str], colors: Sequence[str] = (), count: int = 1,
                  relation: str | None = None) -> dict:
    """One prompt in GenEval's schema (key order as in evaluation_metadata.jsonl). Position records list the
    reference object first: "a photo of a A right of a B" includes B, then A with position [relation, 0]."""
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": classes[0], "count": 1}],
                "prompt": f"a photo of {with_article(classes[0])}"}
    if tag == "two_object":
        a, b = classes
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}"}
    if tag == "counting":
        name = classes[0]
        return {"tag": tag, "include": [{"class": name, "count": count}],
                "exclude": [{"class": name, "count": count + 1}],
                "prompt": f"a photo of {NUMBERS[count]} {plural(name)}"}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": classes[0], "count": 1, "color": colors[0]}],
                "prompt": f"a photo of {with_article(colors[0] + ' ' + classes[0])}"}
    if tag == "position":
        a, b = classes
        return {"tag": tag, "include": [{"class": b, "count": 1},
                                        {"class": a, "count": 1, "position": [relation, 0]}],
                "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}"}
    if tag == "color_attr":
        (a, b), (ca, cb) = classes, colors
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                "prompt": f"a photo of {with_article(ca + ' ' + a)} and {with_article(cb + ' ' + b)}"}
    raise ValueError(f"unknown tag {tag!r}; GenEval's tags are {TAGS}")


def all_prompts(tag: str) -> list[dict]:
    """Every prompt of a tag the world can ask, in a fixed order. Two-object tags use two distinct shapes (and
    color_attr two distinct colours), as GenEval's generator does."""
    pairs = [(SHAPES[a], SHAPES[b]) for a, b in PAIRS]
    colors = list(PALETTE)
    if tag == "single_object":
        return [prompt_record(tag, [s]) for s in SHAPES]
    if tag == "two_object":
        return [prompt_record(tag, p) for p in pairs]
    if tag == "counting":
        return [prompt_record(tag, [s], count=n) for s in SHAPES for n in range(2, MAX_COUNT + 1)]
    if tag == "colors":
        return [prompt_record(tag, [s], [c]) for s in SHAPES for c in colors]
    if tag == "position":
        return [prompt_record(tag, p, relation=r) for p in pairs for r in RELATIONS]
    if tag == "color_attr":
        return [prompt_record(tag, p, cs) for p in pairs for cs in itertools.permutations(colors, 2)]
    raise ValueError(f"unknown tag {tag!r}; GenEval's tags are {TAGS}")


def held_out(record: dict) -> bool:
    """Whether a prompt belongs to the evaluation split, never shown in training. The rule holds out about a third
    of every tag while each shape, colour, count and relation keeps training examples in every tag:
    single_object: the triangle; two_object: one order of each pair (square+circle, triangle+square,
    circle+triangle); counting: three circles, two squares, three triangles; colors: two colours per shape
    (each colour once); position: one relation per ordered shape pair plus two more (each relation twice);
    color_attr: a third of the colour pairs of every ordered shape pair (10 of 30)."""
    include = record["include"]
    shape = [SHAPES.index(req["class"]) for req in include]
    pair = PAIRS.index(tuple(shape)) if len(shape) == 2 else 0
    color = [list(PALETTE).index(req["color"]) for req in include if "color" in req]
    tag = record["tag"]
    if tag == "single_object":
        return shape[0] == 2
    if tag == "two_object":
        return (shape[1] - shape[0]) % 3 == 2
    if tag == "counting":
        return (shape[0] + include[0]["count"]) % 2 == 1
    if tag == "colors":
        return (color[0] - 2 * shape[0]) % 6 in (0, 3)
    if tag == "position":
        relation = RELATIONS.index(include[1]["position"][0])  # pair: (reference, positioned object)
        return relation == pair % 4 or (pair >= 4 and relation == (pair + 2) % 4)
    if tag == "color_attr":
        return (color[0] + color[1] + pair) % 3 == 0
    raise ValueError(f"unknown tag {tag!r}; GenEval's tags are {TAGS}")


def split_prompts(split: Split, tags: Sequence[str] = TAGS) -> list[dict]:
    """The prompts of a split, tag by tag, in a fixed order: `train` (never held out), `eval` (held out, never
    shown in training), `val` (a subset of `train`, for choosing checkpoints without looking at `eval`), `all`."""
    if split not in ("train", "val", "eval", "all"):
        raise ValueError(f"unknown split {split!r}; the shapes world has train, val, eval and all")
    chosen = []
    for tag in tags:
        records = all_prompts(tag)
        if split == "eval":
            records = [r for r in records if held_out(r)]
        elif split != "all":
            records = [r for r in records if not held_out(r)]
            if split == "val" and len(records) > VAL_PER_TAG:
                records = [records[i * len(records) // VAL_PER_TAG] for i in range(VAL_PER_TAG)]
        chosen += records
    return chosen


def training_scenes(n: int, seed: int, first: int = 0) -> list[tuple[dict, list[Shape]]]:
    """Scenes `first`..`first + n - 1` of the training stream: a tag uniformly, a training prompt of that tag
    uniformly, then a random layout. Scene i depends only on (seed, i)."""
    by_tag = {tag: split_prompts("train", [tag]) for tag in TAGS}
    scenes = []
    for i in range(first, first + n):
        rng = random.Random(seed * 1_000_003 + i)
        record = rng.choice(by_tag[rng.choice(TAGS)])
        scenes.append((record, layout(record, rng)))
    return scenes


def describe(objects: Sequence[Shape]) -> list[dict]:
    """Objects as JSON-ready dicts (stored in a sample's metadata)."""
    return [asdict(o) for o in objects]


def vocabulary() -> list[str]:
    """Every word a prompt of the world can use (for a word-level tokenizer)."""
    words = {w for r in split_prompts("all") for w in r["prompt"].split()}
    return sorted(words)
