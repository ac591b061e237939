"""Preview images from an SDModel of any family (offline, any LoRA applied), with diffusers' schedulers.

The default sampler is DPM++ 2M Karras. The denoising loop is the engine's own (classifier-free guidance over a
diffusers scheduler), so every family is sampled the same way: prompts go through models.encode_text (clip skip
and tokenisation as in training) and the UNet gets models.conditioning.unet_inputs, which for SDXL adds the
pooled embeddings (the negative prompt's own for the unconditional half) and the size conditioning of an
uncropped image of the requested size. v-prediction models are sampled as such (the scheduler takes the model's
prediction type from its noise schedule).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from ..errors import ConfigError
from ..models.conditioning import (SizeInfo, compute_dtype, effective_clip_skip, family_traits, unet_inputs,
                                   vae_scale_factor)
from .prompts import DEFAULT_SIZE, PromptSpec

log = logging.getLogger(__name__)

DEFAULT_SAMPLER = "dpm++_2m_karras"
_SD1_INFERENCE = {"steps_offset": 1, "clip_sample": False}

# sd-scripts' --sample_sampler names (and the k_ aliases) plus the A1111 name of the default.
_SAMPLER_ALIASES = {
    "dpm++_2m_karras": "dpm++_2m_karras", "dpmpp_2m_karras": "dpm++_2m_karras",
    "k_dpmpp_2m_karras": "dpm++_2m_karras", "dpm++2m_karras": "dpm++_2m_karras",
    "dpmsolver++": "dpmsolver++", "dpmsolver": "dpmsolver", "dpmsingle": "dpmsingle",
    "ddim": "ddim", "pndm": "pndm", "ddpm": "ddpm",
    "euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
    "heun": "heun", "dpm_2": "dpm_2", "k_dpm_2": "dpm_2", "dpm_2_a": "dpm_2_a", "k_dpm_2_a": "dpm_2_a",
}
# Infotext names, as the WebUI shows them.
_DISPLAY = {"dpm++_2m_karras": "DPM++ 2M Karras", "dpmsolver++": "DPM++ 2M", "dpmsolver": "DPM2M",
            "dpmsingle": "DPM++ SDE single", "ddim": "DDIM", "pndm": "PLMS", "ddpm": "DDPM", "euler": "Euler",
            "euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a"}


def sampler_key(name: str | None) -> str:
    """Canonical sampler key for a name given by the user (None: the default, DPM++ 2M Karras)."""
    if name is None or not str(name).strip():
        return DEFAULT_SAMPLER
    norm = str(name).strip().lower().replace(" ", "_").replace("-", "_")
    if norm in _SAMPLER_ALIASES:
        return _SAMPLER_ALIASES[norm]
    raise ConfigError(f"sample_sampler: unknown sampler {name!r}; choose one of "
                      f"{', '.join(sorted(_SAMPLER_ALIASES))}")


def sampler_display_name(name: str | None) -> str:
    return _DISPLAY[sampler_key(name)]


def make_scheduler(noise_scheduler_config, name: str | None = None):
    """A diffusers sampling scheduler for `name`, on the model's own noise schedule (betas, prediction type).

    steps_offset=1 and clip_sample=False are the SD1 inference settings; StableDiffusionPipeline would
    otherwise rewrite them itself (with a deprecation warning) when a config lacks them.
    """
    import diffusers as d

    key = sampler_key(name)
    config = dict(noise_scheduler_config)
    if key != "ddpm":
        config.pop("variance_type", None)     # DDPM's "fixed_small" means nothing to the samplers
    if key == "dpm++_2m_karras":
        cls, specific = d.DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2,
                                                            use_karras_sigmas=True)
    elif key in ("dpmsolver++", "dpmsolver"):
        cls, specific = d.DPMSolverMultistepScheduler, dict(algorithm_type=key, solver_order=2)
    else:
        cls = {"dpmsingle": d.DPMSolverSinglestepScheduler, "ddim": d.DDIMScheduler, "pndm": d.PNDMScheduler,
               "ddpm": d.DDPMScheduler, "euler": d.EulerDiscreteScheduler,
               "euler_a": d.EulerAncestralDiscreteScheduler, "heun": d.HeunDiscreteScheduler,
               "dpm_2": d.KDPM2DiscreteScheduler, "dpm_2_a": d.KDPM2AncestralDiscreteScheduler}[key]
        specific = {}
    # Passed as arguments: from_config drops config entries that were defaults of the source class.
    accepted = inspect.signature(cls.__init__).parameters
    fixed = {k: v for k, v in _SD1_INFERENCE.items() if k in accepted}
    return cls.from_config(config, **fixed, **specific)


def infotext(spec: PromptSpec, seed: int, width: int, height: int, sampler: str | None,
             clip_skip: int | None, model_name: str | None = None) -> str:
    """A1111-style "parameters" text, so the WebUI's PNG Info tab can read a preview back."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    fields = [f"Steps: {spec.steps}", f"Sampler: {sampler_display_name(sampler)}", f"CFG scale: {spec.scale:g}",
              f"Seed: {seed}", f"Size: {width}x{height}"]
    if model_name:
        fields.append(f"Model: {model_name}")
    if clip_skip and clip_skip > 1:
        fields.append(f"Clip skip: {clip_skip}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


@contextlib.contextmanager
def _vae_fp32(model) -> Iterator[None]:
    """SDXL's VAE decodes to NaN in fp16: float32 for the duration, its own dtype afterwards."""
    vae = model.vae
    before = vae.dtype
    if not family_traits(model).vae_fp32 or before == torch.float32:
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(before)


@contextlib.contextmanager
def _inference_state(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """eval() mode and `device` for the duration; then each module's train/eval flags, requires_grad and
    device exactly as found, and the global torch RNG untouched by whatever ran inside."""
    modes = [[(m, m.training) for m in mod.modules()] for mod in modules]
    grads = [[(p, p.requires_grad) for p in mod.parameters()] for mod in modules]
    devices = [next(iter(mod.parameters()), torch.empty(0)).device for mod in modules]
    rng = torch.get_rng_state()
    try:
        for mod in modules:
            mod.eval()
            mod.to(device)
        yield
    finally:
        torch.set_rng_state(rng)
        for mod, dev in zip(modules, devices):
            mod.to(dev)
        for group in modes:
            for m, training in group:
                m.training = training
        for group in grads:
            for p, flag in group:
                p.requires_grad_(flag)


def _encode(model, prompt: str, negative: str, clip_skip: int | None, device):
    """(negative, prompt) as one TextConditioning of two rows, encoded in one call so they have the same length."""
    from ..models import encode_text
    return encode_text(model, [negative, prompt], clip_skip=clip_skip, device=device)


def denoise(model, text, scheduler, *, height: int, width: int, steps: int, guidance: float,
            generator: torch.Generator, device) -> Image.Image:
    """Classifier-free guidance over `scheduler`: text rows are (negative, prompt). Returns the decoded image."""
    unet, vae = model.unet, model.vae
    dtype = compute_dtype(unet)
    f = vae_scale_factor(model)
    sizes = [SizeInfo.uncropped(height, width)] * 2
    cond = unet_inputs(model, text, sizes, dtype)
    shape = (1, unet.config.in_channels, height // f, width // f)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        both = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond_pred = unet(both.to(dtype), t, **cond).sample.float().chunk(2)
        pred = uncond + guidance * (cond_pred - uncond)
        extra = {"generator": generator} if takes_generator else {}
        latents = scheduler.step(pred, t, latents, **extra).prev_sample
    image = vae.decode((latents / model.info.latent_scale).to(vae.dtype)).sample.float()
    arr = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(arr)


def generate(model, specs: Sequence[PromptSpec], *, clip_skip: int | None = None, device="cpu",
             default_size: int | None = None, default_sampler: str | None = None,
             progress: Callable[[int, int], None] | None = None,
             eval_modules: Sequence[torch.nn.Module] = ()) -> list[Image.Image]:
    """One image per spec, with whatever network is applied to the model's modules right now.

    A spec without a seed gets a fresh random one; each image carries its A1111-style infotext in
    `image.info["parameters"]` and its seed in `image.info["seed"]`. `default_size` fills unset
    width/height (sd-scripts: 512). `eval_modules` are extra modules (e.g. the LoRA network, whose
    dropout must be off) switched to eval() and restored like the model's own. `progress(done, total)`
    is called after each image.
    """
    specs = list(specs)
    for spec in specs:          # fail on a bad sampler name before any work
        sampler_key(spec.sampler or default_sampler)
    dev = torch.device(device)
    images: list[Image.Image] = []
    encoders = list(getattr(model, "text_encoders", None) or [model.text_encoder])
    modules = [model.unet, *encoders, model.vae, *eval_modules]
    clip_skip = effective_clip_skip(model, clip_skip)[0]
    size = default_size or getattr(model.info, "native_resolution", None) or DEFAULT_SIZE
    with _inference_state(modules, dev), _vae_fp32(model), torch.no_grad():
        for i, spec in enumerate(specs):
            sampler = spec.sampler or default_sampler
            scheduler = make_scheduler(model.noise_scheduler.config, sampler)
            width, height = spec.size(size)
            seed = spec.seed if spec.seed is not None else secrets.randbelow(2**32)
            text = _encode(model, spec.prompt, spec.negative_prompt or "", clip_skip, dev)
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            image = denoise(model, text, scheduler, height=height, width=width, steps=spec.steps,
                            guidance=spec.scale, generator=generator, device=dev)
            image.info["parameters"] = infotext(spec, seed, width, height, sampler, clip_skip,
                                                getattr(getattr(model, "info", None), "name", None))
            image.info["seed"] = seed
            images.append(image)
            if progress is not None:
                progress(i + 1, len(specs))
    return images
