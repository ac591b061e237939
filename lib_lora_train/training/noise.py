"""Noise, timesteps, targets and per-sample loss weights of one training step (sd-scripts semantics).

Everything is a pure function: all randomness comes from the `torch.Generator` passed in, never from a global
RNG, so a step seeded by (seed, step) draws the same numbers on a resumed run. Random numbers are drawn on the
generator's device and then moved, so a CPU generator gives the same noise whatever device trains.

Losses are per sample (mean over C, H, W). Weights are per-sample factors: the caller multiplies the loss by the
product of the weights that apply (prior_loss_weight for regularisation images, min-SNR, debiased estimation,
...) and then takes the batch mean, as sd-scripts does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..transfer import to_device

PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
_SNR_CAP = 1000.0  # sd-scripts caps the SNR at 1000 where it divides by it (t=0 may be huge)


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor, pin: bool = True) -> torch.Tensor:
    out = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return to_device(out, like.device, like.dtype, pin=pin)   # transfer.py: no host wait from the CPU to CUDA


def _rand1(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device).item())


def sample_noise(latents: torch.Tensor, generator: torch.Generator, *, noise_offset: float | None = None,
                 noise_offset_random_strength: bool = False, adaptive_noise_scale: float | None = None,
                 multires_noise_iterations: int | None = None,
                 multires_noise_discount: float = 0.3, pin: bool = True) -> torch.Tensor:
    """Gaussian noise shaped like `latents` [B, C, H, W], with sd-scripts' optional offset and pyramid noise.

    Draw order (fixed, so one generator per step is enough): base noise, offset strength (if random), offset
    noise, then one scale and one noise tensor per pyramid level.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    b, c, h, w = latents.shape
    noise = _randn((b, c, h, w), generator, latents, pin)
    if noise_offset:
        offset: float | torch.Tensor = noise_offset
        if noise_offset_random_strength:
            offset = _rand1(generator) * noise_offset
        if adaptive_noise_scale is not None:
            # stronger offset for images whose latent channel means are far from zero
            channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            offset = (offset + adaptive_noise_scale * channel_mean).clamp(min=0.0).to(latents.dtype)
        noise = noise + offset * _randn((b, c, 1, 1), generator, latents, pin)
    if multires_noise_iterations:
        noise = _pyramid(noise, generator, int(multires_noise_iterations), float(multires_noise_discount), pin)
    return noise


def _pyramid(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float,
             pin: bool = True) -> torch.Tensor:
    """Multi-resolution noise: add upsampled coarse noise at random scales, then renormalise to unit std."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = _rand1(generator) * 2 + 2  # a random factor in [2, 4) rather than always 2x
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        coarse = _randn((b, c, hn, wn), generator, noise, pin)
        noise = noise + F.interpolate(coarse.float(), size=(h, w), mode="bilinear",
                                      align_corners=False).to(noise.dtype) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_timesteps(batch: int, generator: torch.Generator, *, min_timestep: int = 0, max_timestep: int = 1000,
                     device: torch.device | str | None = None, pin: bool = True) -> torch.Tensor:
    """`batch` integer timesteps uniform in [min_timestep, max_timestep); all equal when min == max."""
    if not (0 <= min_timestep <= max_timestep):
        raise ConfigError(f"timestep range: need 0 <= min_timestep <= max_timestep, got {min_timestep}, "
                          f"{max_timestep}")
    if min_timestep < max_timestep:
        t = torch.randint(int(min_timestep), int(max_timestep), (batch,), generator=generator,
                          device=generator.device)
    else:
        t = torch.full((batch,), int(max_timestep), dtype=torch.long, device=generator.device)
    return to_device(t.long(), device if device is not None else "cpu", pin=pin)


def ip_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator, *,
             random_strength: bool = False, pin: bool = True) -> torch.Tensor:
    """Input-perturbation noise: the noise to put into the noisy latents (the target keeps `noise`)."""
    strength = _rand1(generator) * gamma if random_strength else gamma
    return noise + strength * _randn(tuple(noise.shape), generator, noise, pin)


def target_for(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"unknown prediction type '{prediction_type}' (expected {' or '.join(PREDICTION_TYPES)})")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, float32 on the timesteps' device."""
    alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    ac = alphas_cumprod[timesteps.detach().to("cpu").long()]
    return ((ac.sqrt() / (1.0 - ac).sqrt()) ** 2).to(timesteps.device)


def loss_weights_min_snr(timesteps: torch.Tensor, scheduler: Any, gamma: float,
                         prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=float(gamma))
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    _check_prediction_type(prediction_type)
    # min(s, γ)/s tends to 1 as s -> 0 (zero-terminal-SNR schedules); avoid 0/0 there.
    return torch.where(s > 0, clipped / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))


def debiased_weights(timesteps: torch.Tensor, scheduler: Any, prediction_type: str) -> torch.Tensor:
    """Debiased estimation weights: 1/sqrt(SNR) for epsilon, 1/(SNR + 1) for v-prediction (SNR capped at 1000)."""
    s = torch.clamp(snr(scheduler, timesteps), max=_SNR_CAP)
    if prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    _check_prediction_type(prediction_type)
    return 1.0 / torch.sqrt(s)


def v_pred_like_noise_weights(timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """sd-scripts' scale_v_pred_loss_like_noise_pred: SNR/(SNR + 1), SNR capped at 1000."""
    s = torch.clamp(snr(scheduler, timesteps), max=_SNR_CAP)
    return s / (s + 1.0)


def v_pred_like_loss_weights(timesteps: torch.Tensor, scheduler: Any, strength: float) -> torch.Tensor:
    """sd-scripts' v_pred_like_loss as a factor: loss + strength·loss/scale = loss·(1 + strength/scale)."""
    return 1.0 + float(strength) / v_pred_like_noise_weights(timesteps, scheduler)


def huber_threshold(timesteps: torch.Tensor, scheduler: Any, *, huber_schedule: str = "snr",
                    huber_c: float = 0.1, huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample Huber threshold c(t) for loss_type huber / smooth_l1 (sd-scripts' huber_schedule).

    constant: c·scale; exponential: decays from scale at t=0 to c·scale at t=T; snr: (1-c)/(1+σ)² + c with
    σ = sqrt((1-ᾱ)/ᾱ) (sd-scripts applies no huber_scale in this schedule, kept so for equal results).
    """
    if huber_schedule not in HUBER_SCHEDULES:
        raise ConfigError(f"huber_schedule: expected one of {', '.join(HUBER_SCHEDULES)}, got '{huber_schedule}'")
    if not 0.0 < huber_c <= 1.0 and huber_schedule != "constant":
        raise ConfigError(f"huber_c must be in (0, 1] for the {huber_schedule} schedule, got {huber_c}")
    t = timesteps.detach().to("cpu")
    if huber_schedule == "constant":
        c = torch.full(t.shape, float(huber_c) * float(huber_scale))
    elif huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        c = torch.exp(-alpha * t.long()) * float(huber_scale)
    else:
        ac = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)[t.long()]
        sigma = ((1.0 - ac) / ac) ** 0.5
        c = (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    return c.to(device=timesteps.device, dtype=torch.float32)


def compute_loss(pred: torch.Tensor, target: torch.Tensor, *, loss_type: str = "l2",
                 huber_c: torch.Tensor | float | None = None, huber_schedule: str | None = None,
                 huber_scale: float = 1.0, timesteps: torch.Tensor | None = None,
                 scheduler: Any = None) -> torch.Tensor:
    """Per-sample loss [B] (elementwise loss averaged over all but the batch dim), computed in float32.

    l2: (p-t)²; l1: |p-t|; huber: 2c(√((p-t)²+c²) - c); smooth_l1: 2(√((p-t)²+c²) - c). For the last two, c is
    `huber_c` as given (a number or a per-sample tensor), or, when `huber_schedule` is set, the per-sample
    threshold huber_threshold(timesteps, scheduler, ...) with `huber_c` as the schedule's c. The huber arguments
    are ignored by l2 and l1.
    """
    if loss_type in ("huber", "smooth_l1") and huber_schedule is not None:
        if timesteps is None or scheduler is None:
            raise ValueError("a huber_schedule needs the timesteps and the noise scheduler")
        huber_c = huber_threshold(timesteps, scheduler, huber_schedule=huber_schedule,
                                  huber_c=0.1 if huber_c is None else float(huber_c), huber_scale=huber_scale)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elem = diff * diff
    elif loss_type == "l1":
        elem = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ConfigError(f"loss_type {loss_type} needs a Huber threshold (see huber_threshold)")
        c = torch.as_tensor(huber_c, dtype=torch.float32, device=diff.device)
        if c.ndim == 1:
            c = c.view(-1, *([1] * (diff.ndim - 1)))
        root = torch.sqrt(diff * diff + c * c) - c
        elem = 2 * c * root if loss_type == "huber" else 2 * root
    else:
        raise ConfigError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got '{loss_type}'")
    return elem.mean(dim=tuple(range(1, elem.ndim)))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type != "epsilon":
        raise ConfigError(f"unknown prediction type '{prediction_type}' (expected {' or '.join(PREDICTION_TYPES)})")


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero signal (ᾱ_T = 0) while ᾱ_0 is unchanged (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1; sd-scripts' zero_terminal_snr).
    Computed in float64."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))   # shift to 0 at T, keep the start
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def with_zero_terminal_snr(scheduler: Any) -> Any:
    """A copy of a DDPM-style noise scheduler on the zero-terminal-SNR schedule (the original is left as it is,
    since a host may still sample with it)."""
    import copy
    out = copy.deepcopy(scheduler)
    betas = zero_terminal_snr_betas(scheduler.betas.to(torch.float32))
    out.betas = betas
    out.alphas = 1.0 - betas
    out.alphas_cumprod = torch.cumprod(out.alphas, dim=0)
    return out
