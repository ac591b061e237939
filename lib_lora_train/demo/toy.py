"""The demo's toy dataset: a concept the base model has never seen, in sd-scripts folder mode.

"zkz" is a magenta five-pointed star. The base model's world (world.py) has no stars, no magenta and no
word "zkz", so before/after samples of "zkz, ... background" show plainly what a LoRA learned.

The pictures pass the engine's own dataset check without a warning: 20 of them (the guide's minimum for a
character), 256 px (the check's smallest side; training reduces them to the demo's 64 px), and no two alike by
the check's near-duplicate rule: the star varies in size, place, rotation and background, and a drawn candidate
that the check would call a near-duplicate of an earlier picture is drawn again.

Prior preservation: `make_reg_dataset` writes pictures of the base model's own world with their captions in
sd-scripts' regularisation folder form (`reg/1_shape/`), so the LoRA is also trained to keep drawing those.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError
from . import world

TOKEN = "zkz"
REPEATS = 10
FOLDER = f"{REPEATS}_{TOKEN}"          # sd-scripts: <repeats>_<name>
REG_FOLDER = "1_shape"                 # sd-scripts reg folder: <repeats>_<class>; captions come with the files
STAR_COLOUR = (225, 50, 205)           # magenta: not a colour of the world either
BACKGROUNDS = ("white", "blue", "yellow", "green", "black")   # not red: the grid shows it is new
N_IMAGES = 20                          # the guide's minimum for a character: fewer is a check warning
IMAGE_SIZE = 256                       # the check flags a shorter side as too small
SAMPLE_SIZE = 64                       # the base model's resolution: what the demo trains and samples at
CONTROL_PROMPT = "red circle, white background"


def draw_star(fill, background, *, size: float, cx: float, cy: float, angle: float,
              image_size: int = IMAGE_SIZE) -> Image.Image:
    """A five-pointed star rotated by `angle` degrees, anti-aliased by supersampling like world.draw_shape."""
    big = image_size * world.SUPERSAMPLE
    img = Image.new("RGB", (big, big), tuple(background))
    half, x, y = size * big / 2, cx * big, cy * big
    pts = []
    for k in range(10):
        r = half if k % 2 == 0 else half * 0.45
        a = -math.pi / 2 + math.radians(angle) + k * math.pi / 5
        pts.append((x + r * math.cos(a), y + r * math.sin(a)))
    ImageDraw.Draw(img).polygon(pts, fill=tuple(fill))
    return img.resize((image_size, image_size), Image.BOX)


def _distinct(candidates, n: int, what: str) -> list:
    """The first `n` candidates (image, caption) of which no two are near-duplicates by the dataset check's rule."""
    from ..prep.check import DUP_MAX_BITS, DUP_MAX_THUMB
    from ..prep.imageio import perceptual_hash
    kept, hashes = [], []
    for img, caption in candidates:
        bits, thumb = perceptual_hash(img)
        t = np.frombuffer(thumb, dtype=np.uint8).astype(np.int16)
        if any(bin(bits ^ b).count("1") <= DUP_MAX_BITS and np.abs(t - u).mean() <= DUP_MAX_THUMB
               for b, u in hashes):
            continue
        kept.append((img, caption))
        hashes.append((bits, t))
        if len(kept) == n:
            return kept
    raise DataError(f"could not draw {n} distinct {what} pictures")  # not reached with the demo's numbers


def toy_samples(n_images: int = N_IMAGES, seed: int = 0, image_size: int = IMAGE_SIZE):
    """(image, caption) pairs of the concept: the star at varied sizes, places and rotations on world
    backgrounds, no two of them near-duplicates."""
    rng = np.random.default_rng(seed)

    def candidates():
        i = 0
        while True:
            bg = BACKGROUNDS[i % len(BACKGROUNDS)]      # every background shows up, in a fixed rotation
            size = float(rng.uniform(0.45, 0.85))
            slack = max(0.0, (1.0 - size) / 2 - 0.03)
            cx, cy = 0.5 + rng.uniform(-slack, slack, 2)
            angle = float(rng.uniform(0, 72))           # the star repeats itself every 72 degrees
            img = draw_star(STAR_COLOUR, world.COLOURS[bg], size=size, cx=float(cx), cy=float(cy), angle=angle,
                            image_size=image_size)
            yield img, f"{TOKEN}, {bg} background"
            i += 1
    return _distinct(candidates(), n_images, "toy")


def reg_samples(n_images: int, seed: int = 1, image_size: int = IMAGE_SIZE):
    """(image, caption) pairs of the base model's own world, no two near-duplicates: regularisation data."""
    rng = np.random.default_rng(seed)

    def candidates():
        while True:
            scene = world.sample_scene(rng)
            yield world.render(scene, image_size), scene.caption
    return _distinct(candidates(), n_images, "world")


def _write(folder: Path, pairs) -> None:
    from ..fsutil import atomic_write_bytes
    import io
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, caption) in enumerate(pairs):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(folder / f"{i:03d}.png", buf.getvalue())
        atomic_write_bytes(folder / f"{i:03d}.txt", (caption + "\n").encode("utf-8"))


def make_toy_dataset(root: str | os.PathLike, n_images: int = N_IMAGES, seed: int = 0) -> Path:
    """Write `root/10_zkz/000.png` + `000.txt` ... and return the folder to pass as train_data_dir (`root`)."""
    if n_images < 1:
        raise DataError(f"make_toy_dataset: n_images must be at least 1, not {n_images}")
    root = Path(root)
    _write(root / FOLDER, toy_samples(n_images, seed))
    return root


def make_reg_dataset(root: str | os.PathLike, n_images: int = N_IMAGES, seed: int = 1) -> Path:
    """Write `root/1_shape/000.png` + `000.txt` ... (world pictures, captioned) and return `root` (reg_data_dir)."""
    if n_images < 1:
        raise DataError(f"make_reg_dataset: n_images must be at least 1, not {n_images}")
    root = Path(root)
    _write(root / REG_FOLDER, reg_samples(n_images, seed))
    return root


def demo_prompts(size: int = SAMPLE_SIZE, steps: int = 20, scale: float = 5.0, seed: int = 1) -> list[str]:
    """Prompt lines (sd-scripts format) for the before/after grid: the new concept on two backgrounds it
    was trained with and one it was not, plus a control prompt from the world the LoRA should leave alone."""
    prompts = [f"{TOKEN}, white background", f"{TOKEN}, blue background", f"{TOKEN}, red background",
               CONTROL_PROMPT]
    return [f"{p} --w {size} --h {size} --s {steps} --l {scale:g} --d {seed}" for p in prompts]
