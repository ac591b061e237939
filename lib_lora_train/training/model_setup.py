"""The model a run trains on: loaded (or the host's, with an undo), checked against the config's family flags,
with the family's own settings applied (SDXL's float32 VAE, v-prediction, zero terminal SNR, clip_skip rule,
SDPA attention). Family facts come from models.conditioning, so the loop never asks which family it runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..events import LOG, WARNING, Event
from .memory import use_sdpa
from .noise import with_zero_terminal_snr


@dataclass
class PreparedModel:
    model: Any                  # SDModel
    info: Any                   # its ModelInfo, prediction type as trained (sha256 after hashes.wait())
    scheduler: Any              # the training noise schedule (zero_terminal_snr: a rescaled copy)
    clip_skip: int | None       # as the family applies it
    unet_dtype: torch.dtype     # the compute dtype (fp8_base later changes only how weights are stored)
    text_encoders: list
    hashes: Any = None          # models.loader.BackgroundHashes: wait() before info.sha256 is needed


def prepare_model(cfg: TrainConfig, model, device: torch.device, weight_dtype: torch.dtype, emit,
                  restore: list) -> PreparedModel:
    """`restore` receives the undo actions for everything changed on a host's model."""
    from ..models import load_sd_model
    from ..models.loader import BackgroundHashes
    from ..models.bundle import base_model_version
    from ..models.conditioning import effective_clip_skip, family_traits
    if model is None:
        emit(Event(LOG, {"message": f"loading {cfg.pretrained_model_name_or_path}"}))
        if not cfg.pretrained_model_name_or_path:
            raise ConfigError("pretrained_model_name_or_path: no checkpoint given")
        overrides = {"prediction_type": "v_prediction"} if cfg.v_parameterization else None
        model = load_sd_model(cfg.pretrained_model_name_or_path, device=device, dtype=weight_dtype,
                              overrides=overrides)
        if not cfg.no_half_vae and weight_dtype == torch.float16 and device.type == "cpu":
            model.vae.to(torch.float32)   # fp16 convolutions are not implemented on every CPU build
    else:
        restore.append(remember_modes(model))
    check_family(cfg, model.info.family)
    vae = model.vae
    if (cfg.no_half_vae or family_traits(model).vae_fp32) and vae.dtype != torch.float32:
        restore.append(lambda v=vae, d=vae.dtype: v.to(d))
        vae.to(torch.float32)      # SDXL's VAE overflows to NaN in fp16 (sd-scripts: no_half_vae)
    info = model.info
    hashes = BackgroundHashes(info)    # ss_new_sd_model_hash (full-file sha256): read beside the start-up
    if cfg.v_parameterization and info.prediction_type != "v_prediction":
        info.prediction_type = "v_prediction"
        info.base_model_version = base_model_version(info.family, v_pred=True)
    scheduler = model.noise_scheduler
    if cfg.zero_terminal_snr:
        if info.prediction_type != "v_prediction":
            raise ConfigError("zero_terminal_snr needs a v-prediction model (or v_parameterization = true): "
                              "with zero terminal SNR an epsilon model has nothing to predict at the last step")
        scheduler = with_zero_terminal_snr(scheduler)
    clip_skip, clip_warning = effective_clip_skip(model, cfg.clip_skip)
    if clip_warning:
        emit(Event(WARNING, {"message": clip_warning}))
    restore.append(use_sdpa(model.unet))
    encoders = list(getattr(model, "text_encoders", None) or [model.text_encoder])
    return PreparedModel(model, info, scheduler, clip_skip, model.unet.dtype, encoders, hashes)


def check_family(cfg: TrainConfig, family: str) -> None:
    """sd-scripts' v2 / sdxl flags are assertions about the checkpoint here (the family is read from its keys)."""
    for flag, want, what in (("v2", "sd2", "SD 2.x"), ("sdxl", "sdxl", "SDXL")):
        if getattr(cfg, flag) and family != want:
            raise ConfigError(f"{flag} = true says the checkpoint is {what}, but the loaded model is {family}; "
                              f"remove {flag} (the family is detected from the checkpoint) or choose another model")


def remember_modes(model):
    """Undo for a host's model: train/eval modes and requires_grad flags exactly as they were."""
    modules = [model.unet, model.vae, *(getattr(model, "text_encoders", None) or [model.text_encoder])]
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]

    def undo() -> None:
        for m, mode in modes:
            m.train(mode)
        for p, flag in grads:
            p.requires_grad_(flag)
    return undo
