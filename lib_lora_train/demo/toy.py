"""The demo's toy dataset: a concept the base model has never seen, in sd-scripts folder mode.

"zkz" is a magenta five-pointed star. The base model's world (world.py) has no stars, no magenta and no
word "zkz", so before/after samples of "zkz, ... background" show plainly what a LoRA learned.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import world

TOKEN = "zkz"
REPEATS = 10
FOLDER = f"{REPEATS}_{TOKEN}"          # sd-scripts: <repeats>_<name>
STAR_COLOUR = (225, 50, 205)           # magenta: not a colour of the world either
BACKGROUNDS = ("white", "blue", "yellow", "green", "black")
SAMPLE_SIZE = 64


def toy_samples(n_images: int = 16, seed: int = 0):
    """(image, caption) pairs of the concept: the star at varied sizes and places on world backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]          # every background shows up, in a fixed rotation
        size = float(rng.uniform(0.6, 0.8))
        slack = (1.0 - size) / 2 - 0.03
        cx, cy = 0.5 + rng.uniform(-slack, slack, 2)
        img = world.draw_shape("star", STAR_COLOUR, world.COLOURS[bg], size=size, cx=float(cx), cy=float(cy))
        out.append((img, f"{TOKEN}, {bg} background"))
    return out


def make_toy_dataset(root: str | os.PathLike, n_images: int = 16, seed: int = 0) -> Path:
    """Write `root/10_zkz/000.png` + `000.txt` ... and return the folder to pass as train_data_dir (`root`)."""
    if n_images < 1:
        raise DataError(f"make_toy_dataset: n_images must be at least 1, not {n_images}")
    root = Path(root)
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(toy_samples(n_images, seed)):
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def demo_prompts(size: int = SAMPLE_SIZE, steps: int = 20, scale: float = 5.0, seed: int = 1) -> list[str]:
    """Prompt lines (sd-scripts format) for the before/after grid: the new concept on two backgrounds it
    was trained with and one it was not, plus a control prompt from the world the LoRA should leave alone."""
    prompts = [f"{TOKEN}, white background", f"{TOKEN}, blue background", f"{TOKEN}, red background",
               "red circle, white background"]
    return [f"{p} --w {size} --h {size} --s {steps} --l {scale:g} --d {seed}" for p in prompts]
