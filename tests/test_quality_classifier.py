"""The quality benchmark's pixel-rule classifier (bench/quality/classify.py), checked on freshly rendered ground
truth: world scenes at random sizes, places and colours, and the held-out concepts' own training pictures."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench" / "quality"))

from classify import classify, colour_name  # noqa: E402
from concepts import CONCEPTS, ORANGE, draw_figure, draw_outline  # noqa: E402

from lib_lora_train.demo import world  # noqa: E402
from lib_lora_train.demo.toy import STAR_COLOUR  # noqa: E402

N = 150


def test_world_scenes_read_right():
    rng = np.random.default_rng(20261207)
    wrong = Counter()
    for _ in range(N):
        scene = world.sample_scene(rng)
        r = classify(world.render(scene))
        wrong["shape"] += r.shape != scene.shape
        wrong["colour"] += r.colour != scene.colour
        wrong["background"] += r.background != scene.background
        wrong["hollow"] += r.hollow
    # Ground truth is clean, so the rules must be (almost) exact: at most 2% wrong per attribute.
    assert all(v <= 0.02 * N for v in wrong.values()), wrong


def test_held_out_shapes_colours_and_renderings_read_right():
    rng = np.random.default_rng(7)
    names = list(world.COLOURS)
    wrong = Counter()
    for i in range(60):
        size = float(rng.uniform(0.5, 0.8))
        slack = (1.0 - size) / 2 - 0.04
        cx, cy = (0.5 + rng.uniform(-slack, slack, 2)).tolist()
        bg = names[i % len(names)]
        star = classify(world.draw_shape("star", STAR_COLOUR, world.COLOURS[bg], size=size, cx=cx, cy=cy))
        wrong["star shape"] += star.shape != "star"
        wrong["magenta"] += star.colour != "magenta"
        shape = world.SHAPES[i % 3]
        orange = classify(world.draw_shape(shape, ORANGE, world.COLOURS[bg], size=size, cx=cx, cy=cy))
        wrong["orange"] += orange.colour != "orange"
        wrong["orange shape"] += orange.shape != shape
        fill = names[(i + 1 + (i // len(names)) % (len(names) - 1)) % len(names)]   # never the background
        outline = classify(draw_outline(shape, world.COLOURS[fill], world.COLOURS[bg], size=max(size, 0.62),
                                        cx=cx, cy=cy))
        wrong["hollow"] += not outline.hollow
        thin = classify(draw_outline(shape, world.COLOURS[fill], world.COLOURS[bg], size=max(size, 0.62),
                                     cx=cx, cy=cy, width=0.07))       # the first, thinner line reads hollow too
        wrong["thin outline"] += not thin.hollow
        wrong["outline colour"] += outline.colour != fill
        if bg not in ("yellow", "blue"):
            fig = classify(draw_figure(world.COLOURS[bg], size=max(size, 0.6), cx=cx, cy=cy))
            wrong["figure"] += (fig.top_colour, fig.bottom_colour) != ("yellow", "blue")
    assert all(v <= 2 for v in wrong.values()), wrong


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_each_concepts_training_images_show_it_and_world_images_do_not(name):
    c = CONCEPTS[name]
    pairs = c.make(12, 3)
    assert all(c.shows(classify(img), caption) for img, caption in pairs), name
    world_pairs = world.world_samples(40, seed=11)
    leaks = sum(c.leaks(classify(img)) for img, _ in world_pairs)
    assert leaks == 0, (name, leaks)


def test_colour_names_follow_hue_not_brightness():
    assert colour_name((110, 15, 15)) == "red"          # a dark red is still red, not black
    assert colour_name((240, 235, 170)) == "yellow"     # a pale yellow
    assert colour_name((200, 200, 205)) == "white"
    assert colour_name((40, 30, 45)) == "black"
    assert colour_name((225, 50, 205)) == "magenta"
    assert colour_name(ORANGE) == "orange"


def test_a_blank_image_has_no_shape():
    from PIL import Image
    r = classify(Image.new("RGB", (64, 64), (40, 80, 220)))
    assert r.shape == "none" and r.background == "blue"


class _Codec:
    """A stand-in autoencoder: `degrade` is what a round trip does to the picture ([-1, 1] tensors)."""

    def __init__(self, degrade):
        from types import SimpleNamespace
        self.vae = SimpleNamespace(
            encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
            decode=lambda z: SimpleNamespace(sample=degrade(z)))


@pytest.mark.parametrize("name", sorted(CONCEPTS))
def test_the_autoencoder_ceiling_is_what_the_codec_keeps(name):
    """The benchmark's "ceiling" row: a lossless codec keeps every concept picture readable; one that keeps only
    an 8 x 8 grid of averages, smoothly upsampled (a latent's resolution, no decoder skill), loses the star."""
    import torch.nn.functional as F
    from run import ceiling

    exact = ceiling(_Codec(lambda z: z), CONCEPTS[name])
    assert exact["concept"]["rate"] == 1.0 and exact["leakage"]["rate"] == 0.0
    assert exact["prior"]["rate"] >= 0.95
    if name == "zkz":
        blocky = ceiling(_Codec(lambda z: F.interpolate(F.avg_pool2d(z, 8), scale_factor=8, mode="bilinear")), CONCEPTS[name])
        assert blocky["concept"]["rate"] < 0.5
