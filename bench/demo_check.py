"""How well the demo's tiny base model follows its prompts, and what the demo's LoRA does (numbers for the README).

    .venv/bin/python bench/demo_check.py base [--seeds 1]        # prompt following of tiny_base.safetensors
    .venv/bin/python bench/demo_check.py demo DEMO_OUT [--seeds 8]  # concept rate / control stability per epoch

The classifier is a transparent colour-and-shape reading of a 64 px picture of the demo world (one shape on a
plain background): the background is the median of the border pixels, the shape is every pixel far from it, its
colour the nearest palette colour to the shape's median, its kind read from solidity (area / convex hull area:
a five-pointed star ~0.6, the world's shapes ~1) and fill of its bounding box (square ~1, circle ~0.79,
triangle ~0.5). When bench/quality/classify.py (the quality benchmark's validated pixel-rule classifier) is
there it is used instead, and the output names the one used; `validate` checks it on ground-truth renders of
world.py and of the toy stars first.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_lora_train.demo import toy, world  # noqa: E402

PALETTE = {**world.COLOURS, "magenta": toy.STAR_COLOUR}
OBJECT_MIN_DIST = 60.0       # a pixel this far (RGB Euclidean) from the background belongs to the shape
MIN_AREA = 0.03              # a shape covers at least 3% of the picture, else "no shape"


def _nearest(rgb) -> str:
    rgb = np.asarray(rgb, dtype=float)
    return min(PALETTE, key=lambda n: float(np.sum((rgb - np.asarray(PALETTE[n], dtype=float)) ** 2)))


def _hull_area(points: np.ndarray) -> float:
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def classify(image) -> dict:
    """{'background', 'colour', 'shape'} of a picture of the demo world; shape 'none' when nothing stands out."""
    px = np.asarray(image.convert("RGB"), dtype=float)
    h, w, _ = px.shape
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.sqrt(((px - bg) ** 2).sum(axis=2)) > OBJECT_MIN_DIST
    out = {"background": _nearest(bg), "colour": None, "shape": "none"}
    if mask.mean() < MIN_AREA:
        return out
    out["colour"] = _nearest(np.median(px[mask], axis=0))
    ys, xs = np.nonzero(mask)
    # pixel corners, so that the hull of a filled square has the square's area
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = mask.sum() / max(_hull_area(corners), 1.0)
    fill = mask.sum() / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    if solidity < 0.8:
        out["shape"] = "star"
    elif fill > 0.9:
        out["shape"] = "square"
    elif fill > 0.66:
        out["shape"] = "circle"
    else:
        out["shape"] = "triangle"
    return out


def _quality_reader():
    """bench/quality/classify.py (the benchmark's validated pixel-rule classifier) when it is there."""
    try:
        from bench.quality.classify import classify as quality
    except ImportError:
        return None

    def read(image) -> dict:
        r = quality(image.convert("RGB"))
        return {"background": r.background, "colour": r.colour, "shape": r.shape}
    return read


READ = _quality_reader() or classify
READER = "bench/quality/classify.py" if READ is not classify else "demo_check.classify"


def validate(n: int = 300) -> float:
    """Accuracy on ground-truth renders (world scenes and rotated/placed toy stars): all three fields right."""
    rng = np.random.default_rng(99)
    right = 0
    for _ in range(n):
        s = world.sample_scene(rng)
        c = READ(world.render(s))
        right += (c["background"], c["colour"], c["shape"]) == (s.background, s.colour, s.shape)
    stars = toy.toy_samples(toy.N_IMAGES, seed=1)
    for img, caption in stars:
        c = READ(img.resize((64, 64)))
        right += (c["colour"], c["shape"], c["background"]) == ("magenta", "star", caption.split(", ")[1].split()[0])
    return right / (n + len(stars))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    r = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - r), min(1.0, c + r)


def base_following(seeds: int, steps: int = 20, scale: float = 5.0) -> dict:
    """Samples of the base model for world prompts (the demo's sampler settings), read by `classify`."""
    import torch

    from lib_lora_train.demo.run import BASE_MODEL
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.sampling.pipeline import generate
    from lib_lora_train.sampling.prompts import parse_prompt_line
    torch.set_num_threads(1)
    model = load_sd_model(str(BASE_MODEL))
    names = list(world.COLOURS)
    # every shape in every colour, each on one other background (the next colour of the list, then the one
    # after it for the second half of the seeds), so every colour also shows up as a background
    prompts = [(c, s, names[(names.index(c) + 1 + (k % 2)) % len(names)])
               for s in world.SHAPES for c in names for k in range(2)]
    specs = [parse_prompt_line(f"{c} {s}, {b} background --w 64 --h 64 --s {steps} --l {scale:g} --d {1000 + k}")
             for (c, s, b) in prompts for k in range(seeds)]
    t0 = time.time()
    images = generate(model, specs, device="cpu")
    counts = {"all": 0, "colour": 0, "shape": 0, "background": 0}
    for (c, s, b), img in zip([p for p in prompts for _ in range(seeds)], images):
        got = READ(img)
        counts["colour"] += got["colour"] == c
        counts["shape"] += got["shape"] == s
        counts["background"] += got["background"] == b
        counts["all"] += (got["colour"], got["shape"], got["background"]) == (c, s, b)
    n = len(images)
    return {"samples": n, "prompts": len(prompts), "seeds": seeds, "steps": steps, "cfg": scale,
            "seconds": round(time.time() - t0, 1),
            **{k: {"rate": v / n, "ci95": wilson(v, n)} for k, v in counts.items()}}


CONCEPT_PROMPTS = [f"{toy.TOKEN}, {b} background" for b in ("white", "blue", "red")]
CONTROL_PROMPTS = [toy.CONTROL_PROMPT, "blue square, yellow background", "green triangle, black background"]


def demo_epochs(out: str, seeds: int, steps: int = 20, scale: float = 5.0) -> dict:
    """Per LoRA file of a demo run (and the base): concept rate on the trigger prompts, and for the control
    prompts the share of samples that read the same as the base's sample of that seed, plus drift."""
    import torch

    from lib_lora_train.compare.drift import image_distance
    from lib_lora_train.compare.grid import MergingRenderer
    from lib_lora_train.compare.runs import open_run
    from lib_lora_train.demo.run import BASE_MODEL
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.sampling.prompts import parse_prompt_line
    torch.set_num_threads(1)
    run = open_run(str(Path(out) / "lora"))
    model = load_sd_model(str(BASE_MODEL))
    render = MergingRenderer(model)
    specs_c = [parse_prompt_line(f"{p} --w 64 --h 64 --s {steps} --l {scale:g} --d {2000 + k}")
               for p in CONCEPT_PROMPTS for k in range(seeds)]
    specs_k = [parse_prompt_line(f"{p} --w 64 --h 64 --s {steps} --l {scale:g} --d {3000 + k}")
               for p in CONTROL_PROMPTS for k in range(seeds)]
    base_k = render(specs_k, run.files[0], 0.0)
    base_c = render(specs_c, run.files[0], 0.0)
    base_read = [READ(im) for im in base_k]
    rows = []

    def concept(images):
        got = [READ(im) for im in images]
        return sum(g["colour"] == "magenta" and g["shape"] == "star" for g in got), \
            sum(g["colour"] == "magenta" for g in got)

    k, kc = concept(base_c)
    rows.append({"epoch": 0, "concept": k / len(base_c), "magenta": kc / len(base_c), "control_same": 1.0,
                 "control_red_circle_same": 1.0, "drift": 0.0})
    for ef in run.files:
        imgs_c = render(specs_c, ef, 1.0)
        imgs_k = render(specs_k, ef, 1.0)
        k, kc = concept(imgs_c)
        read = [READ(im) for im in imgs_k]
        same = [a == b for a, b in zip(read, base_read)]
        rows.append({"epoch": ef.epoch, "concept": k / len(imgs_c), "magenta": kc / len(imgs_c),
                     "control_same": sum(same) / len(same), "control_red_circle_same": sum(same[:seeds]) / seeds,
                     "drift": float(np.mean([image_distance(a, b) for a, b in zip(base_k, imgs_k)]))})
    render.close()
    ok_base = [(r["colour"], r["shape"], r["background"]) for r in base_read]
    want = [tuple(p.replace(",", "").split()[:2][::-1]) for p in CONTROL_PROMPTS]
    return {"seeds": seeds, "rows": rows, "base_control_reads": ok_base[:seeds]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("--seeds", type=int, default=1, help="seeds per prompt (36 prompts)")
    sub.add_parser("validate")
    d = sub.add_parser("demo")
    d.add_argument("out")
    d.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args(argv)
    if args.cmd == "validate":
        print(json.dumps({"classifier": READER, "classifier_accuracy": validate()}))
    elif args.cmd == "demo":
        print(json.dumps({"classifier": READER, **demo_epochs(args.out, args.seeds)}, indent=1))
    elif args.cmd == "base":
        print(json.dumps({"classifier": READER, "classifier_accuracy": validate(),
                          "base": base_following(args.seeds)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
