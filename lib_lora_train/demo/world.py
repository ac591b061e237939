"""A small procedural image world with captions: one plain shape on a plain background.

The demo's base model is pre-trained on this world only, so anything outside it (the toy concept in
toy.py) is new to the model. Everything is deterministic from a seed; pure Pillow + numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4      # shapes are drawn 4x larger and reduced, which gives smooth (anti-aliased) edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scene:
    """What one world image shows; `caption` is its training caption."""
    shape: str
    colour: str
    background: str
    size: float          # shape extent as a fraction of the image side
    cx: float            # centre, as fractions of the image side
    cy: float

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape}, {self.background} background"


def _polygon_for(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":   # upright, equilateral-ish, fills the same box as the square
        return [(cx, cy - half), (cx + half, cy + half * 0.85), (cx - half, cy + half * 0.85)]
    if shape == "star":       # five points, used by the toy concept (not part of the world)
        pts = []
        for k in range(10):
            r = half if k % 2 == 0 else half * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    return None


def draw_shape(shape: str, fill: tuple[int, int, int], background: tuple[int, int, int], *,
               size: float, cx: float, cy: float, image_size: int = IMAGE_SIZE) -> Image.Image:
    """One shape on a plain background, anti-aliased by supersampling."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    half = size * big / 2
    x, y = cx * big, cy * big
    poly = _polygon_for(shape, x, y, half)
    if poly is not None:
        draw.polygon(poly, fill=fill)
    elif shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.resize((image_size, image_size), Image.BOX)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: shape, colour, a different background colour, size and position."""
    names = list(COLOURS)
    colour = names[rng.integers(len(names))]
    background = [n for n in names if n != colour][rng.integers(len(names) - 1)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = float(rng.uniform(0.4, 0.7))
    slack = (1.0 - size) / 2 - 0.04
    cx = 0.5 + float(rng.uniform(-slack, slack))
    cy = 0.5 + float(rng.uniform(-slack, slack))
    return Scene(shape, colour, background, size, cx, cy)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    return draw_shape(scene.shape, COLOURS[scene.colour], COLOURS[scene.background],
                      size=scene.size, cx=scene.cx, cy=scene.cy, image_size=image_size)


def world_samples(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str]]:
    """`n` (image, caption) pairs; the same seed always gives the same pairs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append((render(scene, image_size), scene.caption))
    return out


def world_array(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """The same pairs as `world_samples`, as uint8 [n, H, W, 3] plus captions."""
    pairs = world_samples(n, seed, image_size)
    return np.stack([np.asarray(img) for img, _ in pairs]), [c for _, c in pairs]


def generic_array(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Uncaptioned images of random polygons and ellipses in arbitrary colours (uint8 [n, H, W, 3]).

    Only the autoencoder sees these, so that it can reproduce shapes and colours in general (as a real
    SD VAE can), while the diffusion model only ever learns the captioned world.
    """
    rng = np.random.default_rng(seed)
    big = image_size * SUPERSAMPLE
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (big, big), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 3))):
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            cx, cy = rng.uniform(0.2, 0.8, 2) * big
            r = rng.uniform(0.12, 0.4) * big
            if rng.random() < 0.25:
                rx, ry = r, r * rng.uniform(0.5, 1.0)
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
                continue
            k = int(rng.integers(3, 9))
            spiky = rng.random() < 0.5          # star-like: alternate outer and inner radii
            rot = rng.uniform(0, 2 * math.pi)
            pts = []
            for j in range(k * (2 if spiky else 1)):
                rr = r * (rng.uniform(0.35, 0.6) if spiky and j % 2 else rng.uniform(0.8, 1.0))
                a = rot + j * 2 * math.pi / (k * (2 if spiky else 1))
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            draw.polygon(pts, fill=fill)
        out[i] = np.asarray(img.resize((image_size, image_size), Image.BOX))
    return out
