"""Batched DPM++ 2M Karras sampling for the quality benchmark (SD1 layout, CPU, float32).

The engine's own sampler (lib_lora_train.sampling.pipeline.generate) draws one image at a time; a benchmark
needs hundreds, so this draws all seeds of a prompt as one batch with the same pieces: the engine's scheduler
factory (make_scheduler), text encoder (models.encode_text) and UNet inputs. Each seed's starting noise comes
from its own torch.Generator exactly as generate() makes it, and DPM++ 2M is deterministic after that, so a
batch gives the same images as one-by-one sampling (up to float rounding).
"""
from __future__ import annotations

import torch
from PIL import Image

from lib_lora_train.models import encode_text
from lib_lora_train.models.conditioning import unet_inputs
from lib_lora_train.sampling.pipeline import make_scheduler

STEPS = 20
SCALE = 5.0
SIZE = 64


@torch.no_grad()
def sample(model, prompt: str, seeds: list[int], *, steps: int = STEPS, scale: float = SCALE,
           size: int = SIZE, clip_skip: int | None = None) -> list[Image.Image]:
    """One image per seed for `prompt` (empty negative prompt), with whatever LoRA is applied to the model."""
    unet, vae = model.unet, model.vae
    n = len(seeds)
    text = encode_text(model, ["", prompt], clip_skip=clip_skip, device="cpu")
    hidden = text.hidden.float()
    cond = torch.cat([hidden[:1].expand(n, -1, -1), hidden[1:].expand(n, -1, -1)])
    kwargs = unet_inputs(model, type(text)(cond), None, torch.float32)
    f = 8
    latents = torch.cat([torch.randn((1, unet.config.in_channels, size // f, size // f),
                                     generator=torch.Generator(device="cpu").manual_seed(int(s)),
                                     dtype=torch.float32) for s in seeds])
    scheduler = make_scheduler(model.noise_scheduler.config, "dpm++_2m_karras")
    scheduler.set_timesteps(steps, device="cpu")
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        both = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond_pred = unet(both, t, **kwargs).sample.float().chunk(2)
        latents = scheduler.step(uncond + scale * (cond_pred - uncond), t, latents).prev_sample
    return to_pil(vae.decode(latents / model.info.latent_scale).sample)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """A decoded batch ([n, 3, H, W] in [-1, 1]) as 8-bit pictures, rounded as the engine's sampler rounds."""
    arr = ((images.float().permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def to_float32(model) -> None:
    """The tiny base is stored in fp16; CPU matmuls are far faster (and exact enough) in float32."""
    for m in (model.unet, model.vae, model.text_encoder):
        m.to(torch.float32)
