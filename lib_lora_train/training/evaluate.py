"""Denoising loss at fixed noise and timesteps: comparable between epochs, runs and LoRA multipliers.

The same (image, noise, timestep) triples are used every time for a given seed, so a lower number means the
model (with its network at the current multiplier) predicts the noise of these images better, and nothing else.
"""
from __future__ import annotations

import torch

from .noise import compute_loss, target_for


@torch.no_grad()
def fixed_denoising_loss(model, latents: torch.Tensor, captions: list[str], *, seed: int = 0,
                         timesteps_per_image: int = 4, clip_skip: int | None = None,
                         batch_size: int = 8) -> float:
    """Mean loss over `timesteps_per_image` evenly spread timesteps per latent, with seeded noise."""
    from ..models import encode_prompts
    device = model.unet.device
    sched = model.noise_scheduler
    n_train = sched.config.num_train_timesteps
    # evenly spread timesteps (offset per image so every image sees different ones), seeded noise
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(latents.shape[0]):
        for k in range(timesteps_per_image):
            t = int((k + (i * 0.618) % 1.0) / timesteps_per_image * n_train) % n_train
            items.append((i, t, torch.randn(latents.shape[1:], generator=gen)))
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        lat = torch.stack([latents[i] for i, _, _ in chunk]).to(device, torch.float32)
        noise = torch.stack([n for _, _, n in chunk]).to(device)
        ts = torch.tensor([t for _, t, _ in chunk], device=device, dtype=torch.long)
        cond = encode_prompts(model, [captions[i] for i, _, _ in chunk], clip_skip=clip_skip, device=device)
        noisy = sched.add_noise(lat, noise, ts)
        pred = model.unet(noisy.to(model.unet.dtype), ts, cond.to(model.unet.dtype)).sample
        target = target_for(sched, lat, noise, ts, model.info.prediction_type)
        loss = compute_loss(pred.float(), target.float())
        total += float(loss.sum())
        count += loss.shape[0]
    return total / max(count, 1)
