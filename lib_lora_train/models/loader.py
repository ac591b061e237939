"""load_sd_model: an SD1 single-file checkpoint (path or ldm state dict) -> SDModel, offline.

Modules are built on the meta device and receive the checkpoint tensors with load_state_dict(assign=True):
where dtype and device already match, the modules share the given tensors (no copy, no double memory).
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .bundle import ModelInfo, SDModel
from .ckpt import file_hashes, legacy_hash, read_checkpoint
from .convert import require_complete, split_ldm, te_for_model, unet_ldm_to_diffusers, vae_ldm_to_diffusers
from .infer import SD1Architecture, check_overrides, detect_family, sd1_architecture
from .tokenizer import clip_tokenizer

SD1_BETA_START, SD1_BETA_END, SD1_TIMESTEPS = 0.00085, 0.012, 1000
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ModelError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")


def load_sd_model(source: str | os.PathLike | Mapping[str, torch.Tensor], *, device="cpu", dtype=None,
                  overrides: Mapping[str, Any] | None = None, name: str | None = None) -> SDModel:
    """UNet, VAE, text encoder, tokenizer and noise scheduler of an SD1 checkpoint, in eval mode with frozen
    weights. `source`: a .safetensors / .ckpt path, or a state dict in the ldm layout."""
    ov = check_overrides(overrides)
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    path: Path | None = None
    if isinstance(source, Mapping):
        sd = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        sd = read_checkpoint(path)
    else:
        raise ModelError(f"source must be a checkpoint path or a state dict, not {type(source).__name__}")

    family = detect_family(sd)
    parts = require_complete(split_ldm(sd))
    unet_sd = unet_ldm_to_diffusers(parts.unet)
    vae_sd = vae_ldm_to_diffusers(parts.vae)
    arch = sd1_architecture(unet_sd, vae_sd, parts.text_encoder, ov)
    if "prediction_type" not in ov and "v_pred" in parts.other:   # marker key some v-prediction files carry
        arch.prediction_type = "v_prediction"

    unet, vae, text_encoder = build_sd1_modules(arch, unet_sd, vae_sd, parts.text_encoder, device, dtype)
    scheduler, schedule_source = sd1_noise_scheduler(arch.prediction_type, parts.other)

    v_pred = arch.prediction_type == "v_prediction"
    info = ModelInfo(family=family, prediction_type=arch.prediction_type, latent_scale=arch.latent_scale,
                     base_model_version="sd_v1_v" if v_pred else "sd_v1", v2=False,
                     name=name or (path.name if path else "model"),
                     path=str(path) if path else None,
                     legacy_hash=legacy_hash(path) if path else None)
    info.extra.update(schedule=schedule_source, ema_keys_ignored=len(parts.ema),
                      ldm_extra_keys=sorted(parts.other),
                      te_layout="legacy" if parts.legacy_te_layout else "text_model",
                      configs={"unet": arch.unet, "vae": arch.vae, "text": arch.text})
    return SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                   noise_scheduler=scheduler, info=info)


def ensure_hashes(info: ModelInfo) -> ModelInfo:
    """Fill sha256 / legacy_hash of a file-backed model (the full sha256 reads the whole file, so it is only
    computed when asked for)."""
    if info.path and (info.sha256 is None or info.legacy_hash is None):
        h = file_hashes(info.path)
        info.sha256, info.legacy_hash = h.sha256, h.legacy
    return info


# ---------------------------------------------------------------- modules

def build_sd1_modules(arch: SD1Architecture, unet_sd, vae_sd, te_sd, device: torch.device,
                      dtype: torch.dtype | None):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Parameters on meta, buffers (CLIP position ids) real: load_state_dict(assign=True) then fills them.
    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text))
    _assign(unet, unet_sd, device, dtype, "UNet")
    _assign(vae, vae_sd, device, dtype, "VAE")
    own = text_encoder.state_dict()
    te = {k: t for k, t in te_for_model(te_sd, own.keys()).items() if not k.endswith("embeddings.position_ids")}
    # Position ids always come from the model itself: some merged files hold float or damaged ones, many have
    # none. transformers 4.30 keeps them in the state dict (persistent buffer), later versions do not.
    te.update({k: t for k, t in own.items() if k.endswith("embeddings.position_ids")})
    _assign(text_encoder, te, device, dtype, "text encoder")
    return unet, vae, text_encoder


def _assign(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], device: torch.device,
            dtype: torch.dtype | None, label: str) -> None:
    expected = module.state_dict().keys()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{label} weights do not fit the inferred architecture: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    target = dtype or _dominant_float_dtype(sd)
    prepared = {k: (t.to(device=device, dtype=target) if t.is_floating_point() else t.to(device=device))
                for k, t in sd.items()}
    try:
        module.load_state_dict(prepared, strict=True, assign=True)
    except RuntimeError as e:   # shape mismatches
        raise ModelError(f"{label} weights do not fit the inferred architecture: {e}") from e
    for name, buf in list(module.named_buffers()):
        if buf.device != device or (buf.is_floating_point() and buf.dtype != target):
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[attr] = buf.to(device=device, dtype=target if buf.is_floating_point() else buf.dtype)
    module.eval()
    module.requires_grad_(False)


def _dominant_float_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements: a module gets one dtype even if a file mixes them."""
    count: Counter = Counter()
    for t in sd.values():
        if t.is_floating_point():
            count[t.dtype] += t.numel()
    return count.most_common(1)[0][0] if count else torch.float32


# ---------------------------------------------------------------- noise schedule

def sd1_noise_scheduler(prediction_type: str, extra: Mapping[str, torch.Tensor]):
    """DDPMScheduler with SD1's training schedule, or the checkpoint's own when its betas / alphas_cumprod
    differ from SD1's (e.g. a zero-terminal-SNR model). Returns (scheduler, 'sd1' | 'checkpoint')."""
    from diffusers import DDPMScheduler

    default = DDPMScheduler(num_train_timesteps=SD1_TIMESTEPS, beta_start=SD1_BETA_START, beta_end=SD1_BETA_END,
                            beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type)
    betas = _checkpoint_betas(extra, default)
    if betas is None:
        return default, "sd1"
    trained = DDPMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=False,
                            prediction_type=prediction_type)
    return trained, "checkpoint"


def _checkpoint_betas(extra: Mapping[str, torch.Tensor], default) -> torch.Tensor | None:
    """The checkpoint's betas (float64) when they differ from SD1's default schedule, else None."""
    betas, alphas = extra.get("betas"), extra.get("alphas_cumprod")
    if betas is not None and betas.ndim == 1 and len(betas) > 1:
        ref, mine = default.betas.double(), betas.detach().double().cpu()
        src = betas
    elif alphas is not None and alphas.ndim == 1 and len(alphas) > 1:
        ref, mine = default.alphas_cumprod.double(), alphas.detach().double().cpu()
        src = alphas
    else:
        return None
    low_precision = src.dtype in (torch.float16, torch.bfloat16)
    rtol = 1e-2 if low_precision else 1e-4
    if mine.shape == ref.shape and torch.allclose(mine, ref, rtol=rtol, atol=1e-6):
        return None
    if src is betas:
        return mine
    prev = torch.cat([torch.ones(1, dtype=mine.dtype), mine[:-1]])
    return (1.0 - mine / prev).clamp(0.0, 1.0)
