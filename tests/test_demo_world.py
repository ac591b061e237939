"""The demo: synthetic world, toy dataset, pre-training pieces and the shipped tiny base model."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora_train.demo import run, toy, world

SHIPPED = Path(world.__file__).with_name("tiny_base.safetensors")


def test_world_is_deterministic_and_captioned():
    a_img, a_cap = world.world_array(12, seed=5)
    b_img, b_cap = world.world_array(12, seed=5)
    c_img, c_cap = world.world_array(12, seed=6)
    assert a_img.shape == (12, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)
    pattern = re.compile(rf"^({'|'.join(world.COLOURS)}) ({'|'.join(world.SHAPES)}), "
                         rf"({'|'.join(world.COLOURS)}) background$")
    for cap in a_cap:
        m = pattern.match(cap)
        assert m, cap
        assert m.group(1) != m.group(3)            # never the same colour on itself


def test_world_images_show_their_caption():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = world.sample_scene(rng)
        px = np.asarray(world.render(scene)).astype(int)
        cx, cy = int(scene.cx * 64), int(scene.cy * 64)
        assert np.abs(px[cy, cx] - world.COLOURS[scene.colour]).max() <= 2, scene      # the shape's centre
        assert np.abs(px[0, 0] - world.COLOURS[scene.background]).max() <= 2, scene    # a corner: background
    circle = np.asarray(world.draw_shape("circle", (255, 0, 0), (0, 0, 0), size=0.5, cx=0.5, cy=0.5))
    square = np.asarray(world.draw_shape("square", (255, 0, 0), (0, 0, 0), size=0.5, cx=0.5, cy=0.5))
    # the square fills its box corners, the circle does not
    assert square[18, 18, 0] > 200 and circle[18, 18, 0] < 50


def test_generic_images_are_deterministic():
    a, b = world.generic_array(6, seed=1), world.generic_array(6, seed=1)
    assert a.shape == (6, 64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, world.generic_array(6, seed=2))


def test_toy_concept_is_new_to_the_world():
    _, captions = world.world_array(300, seed=0)
    assert not any(toy.TOKEN in c for c in captions)
    assert "star" not in world.SHAPES
    assert toy.STAR_COLOUR not in world.COLOURS.values()


def test_toy_dataset_is_sd_scripts_folder_mode(tmp_path):
    root = toy.make_toy_dataset(tmp_path / "data", n_images=7, seed=3)
    assert root == tmp_path / "data"
    sub = root / toy.FOLDER
    assert [p.name for p in root.iterdir()] == ["10_zkz"]
    pngs = sorted(sub.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:03d}.png" for i in range(7)]
    for png in pngs:
        caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert re.fullmatch(r"zkz, \w+ background", caption), caption
        with Image.open(png) as im:
            assert im.size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE) and im.mode == "RGB"
            px = np.asarray(im).reshape(-1, 3).astype(int)
        # the magenta star covers a good part of the image: its area is 0.33 x size^2 of the picture, and the
        # smallest size drawn is 0.45 (0.067 of the picture; the anti-aliased rim is not counted)
        assert (np.abs(px - toy.STAR_COLOUR).max(axis=1) <= 3).mean() > 0.05
    again = toy.make_toy_dataset(tmp_path / "again", n_images=7, seed=3)
    assert (again / "10_zkz" / "004.png").read_bytes() == (sub / "004.png").read_bytes()


def test_demo_dataset_passes_its_own_check_without_warnings(tmp_path):
    """The demo's training and regularisation folders as `python -m lib_lora_train check` sees them: no
    warning at all (count, size, near-duplicates, captions) and no error."""
    from lib_lora_train.prep.check import check_dataset, find_near_duplicates

    data = toy.make_toy_dataset(tmp_path / "data")
    reg = toy.make_reg_dataset(tmp_path / "reg", run.REG_IMAGES)   # as many as the demo writes
    report = check_dataset(str(data), str(reg), workers=1)
    assert [i.message for i in report.by_severity("warning") + report.by_severity("error")] == []
    assert len(report.all_issues) > 0                 # the check did run (its information lines)
    assert report.can_train and report.counts["usable_train_images"] == toy.N_IMAGES
    assert find_near_duplicates(report.files) == []
    # the world pictures for prior preservation are captioned like the base model's own training data
    captions = sorted((reg / toy.REG_FOLDER).glob("*.txt"))
    assert len(captions) == run.REG_IMAGES
    pattern = re.compile(rf"^({'|'.join(world.COLOURS)}) ({'|'.join(world.SHAPES)}), "
                         rf"({'|'.join(world.COLOURS)}) background$")
    assert all(pattern.match(c.read_text(encoding="utf-8").strip()) for c in captions)


def test_the_stars_vary_in_place_size_rotation_and_background():
    pairs = toy.toy_samples(toy.N_IMAGES)
    assert {c.split(", ")[1] for _, c in pairs} == {f"{b} background" for b in toy.BACKGROUNDS}
    masks = [(np.abs(np.asarray(im).astype(int) - toy.STAR_COLOUR).max(axis=2) <= 3) for im, _ in pairs]
    areas = [m.mean() for m in masks]
    centres = [tuple(np.argwhere(m).mean(axis=0)) for m in masks]
    assert max(areas) > 2 * min(areas)                          # sizes
    assert len({(round(y / 16), round(x / 16)) for y, x in centres}) > 5   # places
    # rotation: the topmost point of an upright star is straight above its centre; rotated ones are not
    offsets = []
    for m, (cy, cx) in zip(masks, centres):
        ys, xs = np.nonzero(m)
        offsets.append(abs(xs[ys == ys.min()].mean() - cx) / np.sqrt(m.sum()))
    assert max(offsets) > 0.2 and min(offsets) < 0.2
    # no two near-duplicates, by the check's own rule (the same one make_toy_dataset enforces)
    assert toy._distinct(pairs, len(pairs), "toy") == pairs


def test_demo_prompts_parse():
    from lib_lora_train.sampling.prompts import parse_prompt_line

    specs = [parse_prompt_line(p) for p in toy.demo_prompts()]
    assert any(s.prompt.startswith("zkz") for s in specs)
    assert any("zkz" not in s.prompt for s in specs)               # a control prompt from the world
    assert all(s.size() == (64, 64) and s.seed is not None for s in specs)


def test_latent_normalisation_keeps_the_decoder_output():
    from diffusers import AutoencoderKL

    from lib_lora_train.demo.pretrain import LATENT_SCALE, encode_means, normalise_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32)
    with torch.no_grad():
        vae.quant_conv.bias[:4] += torch.tensor([0.5, -1.0, 2.0, 0.0])   # an off-centre latent space
    images = torch.from_numpy(world.world_array(8, seed=1)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    before = encode_means(vae, images)
    with torch.no_grad():
        decoded = vae.decode(before).sample
        after = normalise_latents(vae, before)
        torch.testing.assert_close(vae.decode(after).sample, decoded, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(encode_means(vae, images), after, rtol=1e-4, atol=1e-4)
    scaled = after * LATENT_SCALE
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    torch.testing.assert_close(scaled.std(dim=(0, 2, 3)), torch.ones(4), rtol=1e-3, atol=1e-3)


def test_pretrain_modules_round_trip_through_the_loader(tmp_path):
    from lib_lora_train.demo.pretrain import PretrainConfig, build_modules, check_loaded, ldm_state_dict
    from lib_lora_train.models.ckpt import save_checkpoint

    cfg = PretrainConfig(unet_channels=(32, 32, 32, 32), vae_channels=(32, 32, 32, 32), text_layers=1)
    unet, vae, te = build_modules(cfg)
    assert unet.config.attention_head_dim == 8 and unet.config.cross_attention_dim == 64
    assert te.config.num_attention_heads == 1 and te.config.vocab_size == 49408
    path = save_checkpoint(tmp_path / "m.safetensors", ldm_state_dict(unet, vae, te))
    assert check_loaded(path, unet, vae, te) < 1e-3


def test_shipped_base_model_loads_and_samples():
    if not SHIPPED.is_file():
        pytest.skip(f"{SHIPPED.name} is not built yet (python -m lib_lora_train.demo.pretrain)")
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.models.ckpt import read_safetensors_metadata
    from lib_lora_train.sampling.pipeline import generate
    from lib_lora_train.sampling.prompts import parse_prompt_line

    assert SHIPPED.stat().st_size < 16 * 2**20
    meta = read_safetensors_metadata(SHIPPED)
    assert "lib_lora_train.demo.pretrain" in meta["rebuild"]
    model = load_sd_model(SHIPPED)
    assert model.info.family == "sd1" and model.info.prediction_type == "epsilon"
    assert model.text_encoder.config.hidden_size == 64 and model.unet.config.cross_attention_dim == 64
    assert tuple(model.vae.config.block_out_channels)[0] % 32 == 0
    image = generate(model, [parse_prompt_line("red circle, white background --w 64 --h 64 --s 12 --l 5 --d 1")])[0]
    px = np.asarray(image).astype(int)
    # a picture, not noise or a flat field (how well it knows its world is measured in test_demo_base.py, by
    # denoising loss against the same architecture with random weights: the tiny base's colours are unreliable)
    assert px.shape == (64, 64, 3) and px.std() > 20
    assert np.abs(np.diff(px, axis=0)).mean() < 40      # smooth regions, not per-pixel noise
