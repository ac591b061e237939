"""Sampling: sd-scripts prompt lines and files, labelled grids, PNG infotext, and the preview pipeline."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lib_lora_train.errors import ConfigError
from lib_lora_train.sampling.grid import GridLayout, make_grid, save_png_with_text
from lib_lora_train.sampling.prompts import PromptSpec, parse_prompt_line, read_prompt_file


# ---------------------------------------------------------------- prompt lines

def test_prompt_line_all_flags():
    s = parse_prompt_line("a cat, best quality --n lowres, blurry --w 768 --h 512 --s 25 --d 42 --l 6.5 --ss euler_a")
    assert s.prompt == "a cat, best quality"
    assert s.negative_prompt == "lowres, blurry"
    assert (s.width, s.height, s.steps, s.seed, s.scale, s.sampler) == (768, 512, 25, 42, 6.5, "euler_a")


def test_prompt_line_defaults():
    s = parse_prompt_line("  just a prompt  ")
    assert s == PromptSpec(prompt="just a prompt")
    assert (s.negative_prompt, s.width, s.height, s.seed, s.sampler) == (None, None, None, None, None)
    assert (s.steps, s.scale) == (30, 7.5)
    assert s.size() == (512, 512)
    assert s.size(64) == (64, 64)


def test_prompt_line_rounding_and_clamping():
    s = parse_prompt_line("x --w 100 --h 10 --s 0")
    assert (s.width, s.height, s.steps) == (96, 64, 1)      # down to a multiple of 8, at least 64
    assert parse_prompt_line("x --s 5000").steps == 1000
    assert parse_prompt_line("x --w 519").size() == (512, 512)


def test_prompt_line_flag_order_case_and_bad_values():
    s = parse_prompt_line("dog --D 7 --W 640 --L 3 --n  --foo bar")
    assert (s.seed, s.width, s.scale) == (7, 640, 3.0)
    assert s.prompt == "dog"
    bad = parse_prompt_line("dog --w big --l 1.2.3 --d -4")
    assert (bad.width, bad.scale, bad.seed) == (None, 7.5, None)   # malformed values are ignored, like sd-scripts


def test_prompt_line_without_prompt_text():
    s = parse_prompt_line("--w 64 --h 64 --d 3")
    assert (s.prompt, s.width, s.height, s.seed) == ("", 64, 64, 3)


def test_prompt_txt_file_comments(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# a comment\n\nfirst --d 1\n   \n# another\nsecond --n bad --s 12\n", encoding="utf-8")
    specs = read_prompt_file(p)
    assert [s.prompt for s in specs] == ["first", "second"]
    assert [s.index for s in specs] == [0, 1]
    assert specs[0].seed == 1 and specs[1].negative_prompt == "bad" and specs[1].steps == 12


def test_prompt_json_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([
        {"prompt": "a", "negative_prompt": "n", "width": 100, "height": 200, "sample_steps": 2000, "scale": 4,
         "seed": 5, "sample_sampler": "ddim", "unknown_key": 1},
        "b --d 9",
    ]), encoding="utf-8")
    a, b = read_prompt_file(p)
    assert (a.prompt, a.negative_prompt, a.width, a.height, a.steps, a.scale, a.seed, a.sampler) == \
        ("a", "n", 96, 200, 1000, 4.0, 5, "ddim")
    assert (b.prompt, b.seed, b.index) == ("b", 9, 1)


def test_prompt_toml_file_defaults_and_subsets(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[prompt]\nwidth = 640\nsample_steps = 20\nnegative_prompt = "ugly"\n\n'
                 '[[prompt.subset]]\nprompt = "one"\nseed = 1\n\n'
                 '[[prompt.subset]]\nprompt = "two"\nwidth = 512\nnegative_prompt = "bad"\n', encoding="utf-8")
    one, two = read_prompt_file(p)
    assert (one.prompt, one.width, one.steps, one.seed, one.negative_prompt) == ("one", 640, 20, 1, "ugly")
    assert (two.prompt, two.width, two.steps, two.negative_prompt) == ("two", 512, 20, "bad")


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.toml"
    bad.write_text("[prompt]\nwidth = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="prompt.subset"):
        read_prompt_file(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"prompt": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="list"):
        read_prompt_file(bad_json)


# ---------------------------------------------------------------- grid + png

def _solid(colour, size=64):
    return Image.new("RGB", (size, size), colour)


def test_grid_layout_cells_and_labels():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    images = [[_solid(c) for c in row] for row in colours]
    grid, lay = make_grid(images, ["before", "after"], ["p1", "p2", "p3"], title="demo", return_layout=True)
    assert isinstance(lay, GridLayout)
    assert (lay.rows, lay.cols) == (2, 3)
    assert lay.cell_w == lay.cell_h == 192                     # 64 px enlarged x3 to reach 192
    assert grid.size == (lay.width, lay.height)
    px = np.asarray(grid)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            x0, y0, x1, y1 = lay.cell_box(r, c)
            assert x1 <= lay.width and y1 <= lay.height
            assert (px[y0:y1, x0:x1] == np.array(colour)).all()      # the whole cell is the (enlarged) image
    # labels are drawn: dark pixels left of the first column (row labels) and above the first row
    assert (px[lay.top:, :lay.left - 4] < 128).any()
    assert (px[:lay.top - 4, lay.left:] < 128).any()
    # rows and columns do not overlap
    assert lay.cell_box(0, 1)[0] >= lay.cell_box(0, 0)[2]
    assert lay.cell_box(1, 0)[1] >= lay.cell_box(0, 0)[3]


def test_grid_nearest_upscale_and_mismatched_labels():
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))
    grid, lay = make_grid([[im]], min_cell=128, return_layout=True)
    x0, y0, _, _ = lay.cell_box(0, 0)
    block = np.asarray(grid)[y0:y0 + 2, x0:x0 + 2]
    assert (block == 255).all() and np.asarray(grid)[y0 + 2, x0 + 2].max() == 0   # 2x2 white block, sharp
    with pytest.raises(ValueError, match="row labels"):
        make_grid([[im], [im]], ["only one"])
    with pytest.raises(ValueError, match="column labels"):
        make_grid([[im, im]], None, ["a"])


def test_save_png_with_text_is_atomic_and_readable(tmp_path):
    out = tmp_path / "sub" / "grid.png"
    save_png_with_text(_solid((1, 2, 3)), out, {"parameters": "a prompt\nSteps: 3", "other": "x"})
    with Image.open(out) as im:
        assert im.info["parameters"] == "a prompt\nSteps: 3"
        assert im.info["other"] == "x"
        assert im.getpixel((5, 5)) == (1, 2, 3)
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]    # no temp files left behind


# ---------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def tiny_model():
    from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict

    return load_sd_model(tiny_sd1_state_dict(seed=3), name="tiny")


def test_default_scheduler_is_dpmpp_2m_karras(tiny_model):
    from diffusers import DPMSolverMultistepScheduler

    from lib_lora_train.sampling.pipeline import make_scheduler

    s = make_scheduler(tiny_model.noise_scheduler.config)
    assert isinstance(s, DPMSolverMultistepScheduler)
    assert (s.config.algorithm_type, s.config.solver_order, s.config.use_karras_sigmas) == ("dpmsolver++", 2, True)
    assert s.config.beta_schedule == "scaled_linear" and s.config.num_train_timesteps == 1000
    assert abs(s.config.beta_start - 0.00085) < 1e-9 and abs(s.config.beta_end - 0.012) < 1e-9
    s.set_timesteps(10)
    # Karras et al. sigmas (rho = 7) between the schedule's smallest and largest sigma, then 0
    ac = torch.as_tensor(tiny_model.noise_scheduler.alphas_cumprod, dtype=torch.float64)
    all_sigmas = ((1 - ac) / ac).sqrt()
    lo, hi = all_sigmas.min().item() ** (1 / 7), all_sigmas.max().item() ** (1 / 7)
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    expected = (hi + ramp * (lo - hi)) ** 7
    got = torch.as_tensor(s.sigmas, dtype=torch.float64)
    assert len(got) == 11 and got[-1] == 0
    torch.testing.assert_close(got[:-1], expected, rtol=1e-4, atol=1e-5)


def test_sampler_names(tiny_model):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    from lib_lora_train.sampling.pipeline import make_scheduler, sampler_key

    cfg = tiny_model.noise_scheduler.config
    assert isinstance(make_scheduler(cfg, "euler_a"), EulerAncestralDiscreteScheduler)
    assert isinstance(make_scheduler(cfg, "k_euler"), EulerDiscreteScheduler)
    ddim = make_scheduler(cfg, "ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.steps_offset == 1
    assert sampler_key("DPM++ 2M Karras") == sampler_key(None) == "dpm++_2m_karras"
    with pytest.raises(ConfigError, match="unknown sampler"):
        sampler_key("not_a_sampler")


def test_generate_seeds_and_state_restored(tiny_model):
    from lib_lora_train.sampling.pipeline import generate

    unet, te = tiny_model.unet, tiny_model.text_encoder
    unet.train()
    some = next(unet.parameters())
    some.requires_grad_(True)
    global_rng = torch.get_rng_state()
    calls = []
    specs = [parse_prompt_line(f"red circle --w 64 --h 80 --s 3 --l 5 --d {d}") for d in (1, 1, 2)]
    a, b, c = generate(tiny_model, specs, default_size=64, progress=lambda i, n: calls.append((i, n)))
    try:
        assert a.size == (64, 80)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
        assert calls == [(1, 3), (2, 3), (3, 3)]
        assert "Seed: 1" in a.info["parameters"] and "DPM++ 2M Karras" in a.info["parameters"]
        assert a.info["seed"] == 1
        # modes, requires_grad and the global RNG are as they were
        assert unet.training and all(m.training for m in unet.modules())
        assert not te.training
        assert some.requires_grad and not tiny_model.vae.encoder.conv_in.weight.requires_grad
        assert torch.equal(torch.get_rng_state(), global_rng)
    finally:
        unet.eval()
        some.requires_grad_(False)


def test_generate_uses_what_is_applied_to_the_modules(tiny_model):
    """A change hooked into the UNet at call time (as a LoRA network is) shows in the images; a bad sampler
    name fails before any work."""
    from lib_lora_train.sampling.pipeline import generate

    spec = [parse_prompt_line("blue square --n red --w 64 --h 64 --s 2 --d 5 --ss euler_a")]
    plain = np.asarray(generate(tiny_model, spec)[0]).astype(int)
    handle = tiny_model.unet.conv_out.register_forward_hook(lambda m, i, o: o * 0.0 + 0.5)
    try:
        hooked = np.asarray(generate(tiny_model, spec)[0]).astype(int)
    finally:
        handle.remove()
    again = np.asarray(generate(tiny_model, spec)[0]).astype(int)
    assert np.abs(plain - hooked).mean() > 1.0
    assert np.array_equal(plain, again)
    with pytest.raises(ConfigError, match="unknown sampler"):
        generate(tiny_model, [parse_prompt_line("x --ss nope")])


def test_denoise_matches_a_hand_written_guidance_step():
    """One DDIM step of the engine's loop equals the formula, with guidance over (negative, prompt)."""
    from lib_lora_train.models import encode_text, load_sd_model, tiny_sd1_state_dict
    from lib_lora_train.sampling.pipeline import denoise, make_scheduler

    model = load_sd_model(tiny_sd1_state_dict(seed=3))
    text = encode_text(model, ["", "red circle"])
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append((i[0].clone(), o.sample.clone())))
    try:
        sched = make_scheduler(model.noise_scheduler.config, "ddim")
        gen = torch.Generator().manual_seed(7)
        denoise(model, text, sched, height=64, width=64, steps=1, guidance=4.0, generator=gen, device="cpu")
    finally:
        handle.remove()
    (inp, out), = calls
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(inp[0], start[0]) and torch.equal(inp[1], start[0])   # DDIM: sigma 1, no input scaling
    uncond, cond = out.chunk(2)
    eps = uncond + 4.0 * (cond - uncond)
    t = int(sched.timesteps[0])
    ac = float(sched.alphas_cumprod[t])
    x0 = (start - (1 - ac) ** 0.5 * eps) / ac ** 0.5     # DDIM's last step lands on the predicted x0
    assert torch.allclose(sched.step(eps, t, start).prev_sample, x0, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_sdxl():
    from lib_lora_train.models import load_sd_model, tiny_sdxl_state_dict

    return load_sd_model(tiny_sdxl_state_dict(seed=2), name="tiny-xl")


def test_generate_sdxl_uses_pooled_negative_and_uncropped_size_conditioning(tiny_sdxl):
    from lib_lora_train.sampling.pipeline import generate

    seen = []
    handle = tiny_sdxl.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    spec = [parse_prompt_line("green field --n blurry --w 96 --h 64 --s 2 --d 3")]
    try:
        a = generate(tiny_sdxl, spec)[0]
    finally:
        handle.remove()
    b = generate(tiny_sdxl, spec)[0]
    assert a.size == (96, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    assert len(seen) == 2
    ids = seen[0]["time_ids"]
    assert ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2             # original = target = image size, crop 0,0
    from lib_lora_train.models import encode_text
    want = encode_text(tiny_sdxl, ["blurry", "green field"]).pooled
    assert torch.allclose(seen[0]["text_embeds"], want, rtol=0, atol=1e-6)   # the negative prompt's own pooled
    other = generate(tiny_sdxl, [parse_prompt_line("green field --n sharp --w 96 --h 64 --s 2 --d 3")])[0]
    assert not np.array_equal(np.asarray(a), np.asarray(other))


def test_generate_v_prediction_model_uses_its_prediction_type():
    from lib_lora_train.models import load_sd_model, tiny_sd2_state_dict
    from lib_lora_train.sampling.pipeline import generate, make_scheduler

    model = load_sd_model(tiny_sd2_state_dict(seed=1, v_pred=True))
    assert make_scheduler(model.noise_scheduler.config).config.prediction_type == "v_prediction"
    img = generate(model, [parse_prompt_line("x --w 64 --h 64 --s 2 --d 1")])[0]
    assert img.size == (64, 64)
