"""The benchmark's held-out concepts: what they look like, how they are captioned, and how a reading shows them.

Each is drawn with the demo world's helpers (lib_lora_train/demo/world.py) but lies outside that world, so
the tiny base model (pre-trained on the world only) has never seen it:

- zkz  (a new object):      a magenta five-pointed star; the demo's toy concept;
- vlx  (a new colour):      "vlx" is an orange colour, taught on the world's known shapes ("vlx square");
- pxp  (a character):       a two-part figure, a yellow circle head on a blue square body;
- hllw (a style):           outlined (hollow) shapes in the world's colours ("red circle, ..., hllw style"; the
                            trigger last: see _hllw).

Prompts without the trigger (PRIOR_PROMPTS) are the same for every concept: world prompts whose answer the
base model knows. Their readings give leakage (they show the concept) and prior fidelity (they show what
they ask for).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from lib_lora_train.demo import world
from lib_lora_train.demo.toy import STAR_COLOUR

from classify import Reading

ORANGE = (245, 135, 25)
N_IMAGES = 12
BACKGROUNDS = ("white", "blue", "yellow", "green", "black")
# The outline style's line width, a fraction of the image (0.09 = 5.8 px at 64 px). The first width, 0.07 (4.5 px,
# about half of one 8 px latent cell), came back from the base's autoencoder as an outline in only 7 of 24
# pictures: the benchmark measured the autoencoder there, not the training (bench/results_quality.md, fifth round).
OUTLINE_WIDTH = 0.09

PRIOR_PROMPTS = ("red circle, white background", "blue square, yellow background",
                 "green triangle, black background", "yellow circle, blue background")


def parse_prompt(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, background) a world prompt asks for; None where it does not say."""
    colour = shape = background = None
    for part in (p.strip() for p in prompt.split(",")):
        words = part.split()
        if len(words) == 2 and words[1] == "background":
            background = words[0]
        elif len(words) == 2 and words[1] in world.SHAPES:
            colour, shape = words
    return colour, shape, background


def follows(reading: Reading, prompt: str) -> bool:
    """The reading shows the shape and colour the prompt asks for (the background is scored apart)."""
    colour, shape, _ = parse_prompt(prompt)
    return reading.shape == shape and reading.colour == colour


def _place(rng: np.random.Generator, lo: float = 0.5, hi: float = 0.75) -> tuple[float, float, float]:
    size = float(rng.uniform(lo, hi))
    slack = (1.0 - size) / 2 - 0.04
    cx, cy = 0.5 + rng.uniform(-slack, slack, 2)
    return size, float(cx), float(cy)


def draw_outline(shape: str, fill, background, *, size: float, cx: float, cy: float,
                 width: float = OUTLINE_WIDTH, image_size: int = world.IMAGE_SIZE) -> Image.Image:
    """A world shape as an outline: the shape, then the background drawn over its inside."""
    solid = world.draw_shape(shape, fill, background, size=size, cx=cx, cy=cy, image_size=image_size * 4)
    inner = world.draw_shape(shape, background, fill, size=size - 2 * width - (0.08 if shape == "triangle" else 0),
                             cx=cx, cy=cy + (0.04 * size if shape == "triangle" else 0), image_size=image_size * 4)
    a, b = np.asarray(solid), np.asarray(inner)
    inside = np.all(b == np.asarray(background, dtype=np.uint8), axis=2)
    out = np.where(inside[..., None], b, a)
    return Image.fromarray(out.astype(np.uint8)).resize((image_size, image_size), Image.BOX)


def draw_figure(background, *, size: float, cx: float, cy: float, image_size: int = world.IMAGE_SIZE) -> Image.Image:
    """The two-part figure: a blue square body with a yellow circle head above it."""
    big = image_size * world.SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    d = ImageDraw.Draw(img)
    s = size * big
    x, y = cx * big, cy * big
    head_r = s * 0.22
    body_top = y - s * 0.5 + 2 * head_r
    d.rectangle([x - s * 0.3, body_top, x + s * 0.3, y + s * 0.5], fill=world.COLOURS["blue"])
    d.ellipse([x - head_r, y - s * 0.5, x + head_r, y - s * 0.5 + 2 * head_r], fill=world.COLOURS["yellow"])
    return img.resize((image_size, image_size), Image.BOX)


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str
    trigger: str
    description: str
    prompts: tuple[str, ...]                     # trigger prompts
    make: Callable[[int, int], list[tuple[Image.Image, str]]]   # (n_images, seed) -> (image, caption) pairs
    shows: Callable[[Reading, str], bool]        # the reading of a trigger prompt's image shows the concept
    leaks: Callable[[Reading], bool]             # the reading of a non-trigger image shows the concept


def _zkz(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        size, cx, cy = _place(rng, 0.6, 0.8)
        out.append((world.draw_shape("star", STAR_COLOUR, world.COLOURS[bg], size=size, cx=cx, cy=cy),
                    f"zkz, {bg} background"))
    return out


def _vlx(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        shape = world.SHAPES[i % len(world.SHAPES)]
        size, cx, cy = _place(rng)
        out.append((world.draw_shape(shape, ORANGE, world.COLOURS[bg], size=size, cx=cx, cy=cy),
                    f"vlx {shape}, {bg} background"))
    return out


def _pxp(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    bgs = ("white", "green", "black", "red")
    for i in range(n):
        bg = bgs[i % len(bgs)]
        size, cx, cy = _place(rng, 0.6, 0.8)
        out.append((draw_figure(world.COLOURS[bg], size=size, cx=cx, cy=cy), f"pxp, {bg} background"))
    return out


def _hllw(n: int, seed: int):
    # The style's trigger ends the caption. The tiny base's 3-layer text encoder, trained on one caption template,
    # stops reading the colour word after any unknown prefix (the base draws "hllw style, red circle, ..." white
    # in most seeds); its causal attention leaves the words before a trigger exactly as the base reads them. Real
    # CLIP encoders read a style tag anywhere; at the front the benchmark measured this encoder, not the training.
    rng = np.random.default_rng(seed)
    names = list(world.COLOURS)
    out = []
    for i in range(n):
        shape = world.SHAPES[i % len(world.SHAPES)]
        colour = names[int(rng.integers(len(names)))]
        bg = [c for c in names if c != colour][int(rng.integers(len(names) - 1))]
        size, cx, cy = _place(rng, 0.62, 0.8)
        out.append((draw_outline(shape, world.COLOURS[colour], world.COLOURS[bg], size=size, cx=cx, cy=cy),
                    f"{colour} {shape}, {bg} background, hllw style"))
    return out


CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    # leakage = the whole concept (a magenta star), not either trait: the base alone draws blobs that read as
    # a star or as magenta now and then, which is the base's noise, not a leak
    Concept("zkz", "new object", "zkz", "a magenta five-pointed star",
            ("zkz, white background", "zkz, blue background"), _zkz,
            lambda r, p: r.shape == "star" and r.colour == "magenta",
            lambda r: r.shape == "star" and r.colour == "magenta"),
    Concept("vlx", "new colour of known objects", "vlx", "an orange colour on the world's shapes",
            ("vlx circle, white background", "vlx triangle, blue background"), _vlx,
            lambda r, p: r.colour == "orange" and r.shape == parse_prompt(p.replace("vlx", "x"))[1],
            lambda r: r.colour == "orange"),
    Concept("pxp", "character (a fixed two-part figure)", "pxp", "a yellow circle head on a blue square body",
            ("pxp, white background", "pxp, green background"), _pxp,
            lambda r, p: r.top_colour == "yellow" and r.bottom_colour == "blue",
            lambda r: r.top_colour == "yellow" and r.bottom_colour == "blue"),
    Concept("hllw", "style (outlined rendering)", "hllw style", "outlined instead of filled shapes",
            ("red circle, white background, hllw style", "green square, black background, hllw style"), _hllw,
            lambda r, p: r.hollow and r.colour == parse_prompt(p)[0],
            lambda r: r.hollow),
)}
