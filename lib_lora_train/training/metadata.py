"""The safetensors metadata of a trained LoRA, with the keys and value formats sd-scripts writes.

The WebUI's Lora extension reads these (alias from ss_output_name, SD version from ss_base_model_version, the card
from ss_tag_frequency / ss_bucket_info / ss_dataset_dirs), so names and formats follow sd-scripts exactly:
every value is `str(value)` of the Python value, JSON for the nested ones.
"""
from __future__ import annotations

import datetime
import json
import random
import time
from typing import Any

from .. import __version__
from ..config import TrainConfig

# The keys kept when no_metadata is set (sd-scripts' SS_METADATA_MINIMUM_KEYS).
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


# ModelSpec per family (sd-scripts' sai_model_spec: LoRAs on SDXL name Stability's sgm implementation, SD 1.x /
# 2.x LoRAs "diffusers"; the default resolution is the family's native one).
IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"


def _text_encoder_lr(cfg: TrainConfig) -> Any:
    """What sd-scripts writes as ss_text_encoder_lr with networks.lora / lycoris.kohya: the one value
    train_network uses, i.e. the first of a --text_encoder_lr list (None for an empty list)."""
    lr = cfg.text_encoder_lr
    if isinstance(lr, (list, tuple)):
        return lr[0] if lr else None
    return lr


def family_of(model_info: Any) -> str:
    return getattr(model_info, "family", "sd1") or "sd1"


def architecture(model_info: Any) -> str:
    """modelspec.architecture of a LoRA on this model (ModelInfo.architecture when it has one)."""
    arch = getattr(model_info, "architecture", None)
    if arch:
        return arch
    family, v = family_of(model_info), getattr(model_info, "prediction_type", "epsilon") == "v_prediction"
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def implementation(model_info: Any) -> str:
    impl = getattr(model_info, "implementation", None)
    if impl:
        return impl
    return IMPL_SGM if family_of(model_info) == "sdxl" else IMPL_DIFFUSERS


def native_resolution(model_info: Any) -> int:
    """sd-scripts' default modelspec.resolution: 1024 SDXL, 768 SD 2.x v-prediction, else 512."""
    native = getattr(model_info, "native_resolution", None)
    if native:
        return int(native)
    family, v = family_of(model_info), getattr(model_info, "prediction_type", "epsilon") == "v_prediction"
    return 1024 if family == "sdxl" else 768 if (family == "sd2" and v) else 512


def resolution_text(cfg: TrainConfig, model_info: Any) -> str:
    """modelspec.resolution: the run's resolution, or the family's native one when none is set."""
    if cfg.resolution in (None, ""):
        n = native_resolution(model_info)
        return f"{n}x{n}"
    w, h = cfg.resolution_wh
    return f"{w}x{h}"


def training_metadata(cfg: TrainConfig, *, model_info: Any, data_summary: dict[str, Any], plan: Any,
                      num_batches_per_epoch: int, optimizer_description: str, network_dim: int,
                      network_alpha: float, network_args: dict[str, Any] | None, folder_mode: bool,
                      session_id: int | None = None, started_at: float | None = None) -> dict[str, str]:
    """Metadata fixed for the whole run; `for_save` adds what changes at each save."""
    started_at = time.time() if started_at is None else started_at
    meta: dict[str, Any] = {
        "ss_session_id": random.randint(0, 2 ** 32) if session_id is None else session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": _text_encoder_lr(cfg),
        "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": data_summary["num_train_images"],
        "ss_num_validation_images": data_summary.get("num_validation_images", 0),
        "ss_num_reg_images": data_summary["num_reg_images"],
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": plan.total_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps if cfg.lr_warmup_steps >= 1 or cfg.lr_warmup_steps == 0
        else int(cfg.lr_warmup_steps * plan.total_steps),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": cfg.network_dropout,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": bool(cfg.full_fp16),
        "ss_v2": bool(model_info.v2),
        "ss_base_model_version": model_info.base_model_version,
        "ss_clip_skip": cfg.clip_skip,
        "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": bool(cfg.cache_latents or cfg.cache_latents_to_disk),
        "ss_seed": cfg.seed_value,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_zero_terminal_snr": bool(cfg.zero_terminal_snr),
        "ss_training_comment": cfg.training_comment,
        "ss_sd_scripts_commit_hash": f"(lib_lora_train {__version__})",
        "ss_optimizer": optimizer_description,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma,
        "ss_debiased_estimation": bool(cfg.debiased_estimation_loss),
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": False,
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": 1.0,
        "ss_huber_c": cfg.huber_c,
        "ss_fp8_base": bool(cfg.fp8_base),
        "ss_fp8_base_unet": bool(cfg.fp8_base_unet),
        "ss_validation_seed": cfg.validation_seed,
        "ss_validation_split": cfg.validation_split,
        "ss_max_validation_steps": cfg.max_validation_steps,
        "ss_validate_every_n_epochs": cfg.validate_every_n_epochs,
        "ss_validate_every_n_steps": cfg.validate_every_n_steps,
        "ss_resize_interpolation": None,
    }
    datasets = data_summary.get("datasets") or []
    if folder_mode:
        first = datasets[0] if datasets else {}
        meta.update({
            "ss_batch_size_per_device": cfg.train_batch_size,
            "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
            "ss_resolution": None if cfg.resolution in (None, "") else cfg.resolution_wh,
            "ss_color_aug": False,
            "ss_flip_aug": bool(cfg.flip_aug),
            "ss_random_crop": bool(cfg.random_crop),
            "ss_shuffle_caption": bool(cfg.shuffle_caption),
            "ss_enable_bucket": bool(first.get("enable_bucket", cfg.enable_bucket)),
            "ss_bucket_no_upscale": bool(first.get("bucket_no_upscale", cfg.bucket_no_upscale)),
            "ss_min_bucket_reso": first.get("min_bucket_reso", cfg.min_bucket_reso),
            "ss_max_bucket_reso": first.get("max_bucket_reso", cfg.max_bucket_reso),
            "ss_keep_tokens": cfg.keep_tokens,
            "ss_dataset_dirs": json.dumps(data_summary.get("dataset_dirs", {})),
            "ss_reg_dataset_dirs": json.dumps(data_summary.get("reg_dataset_dirs", {})),
            "ss_tag_frequency": json.dumps(data_summary.get("tag_frequency", {})),
            "ss_bucket_info": json.dumps(data_summary.get("bucket_info", {})),
        })
    else:
        meta["ss_datasets"] = json.dumps(datasets)
        meta["ss_tag_frequency"] = json.dumps(data_summary.get("tag_frequency", {}))
        meta["ss_dataset_dirs"] = json.dumps(data_summary.get("dataset_dirs", {}))
    if network_args:
        # sd-scripts passes network_dropout to the network as "dropout" unless network_args has it (for LyCORIS)
        # and writes the args it passed, so that key appears in its files too (null without network_dropout)
        args = dict(network_args)
        if "dropout" not in args and not getattr(cfg, "dim_from_weights", False):
            args["dropout"] = cfg.network_dropout
        meta["ss_network_args"] = json.dumps(args)
    meta["ss_sd_model_name"] = model_info.name
    meta.update(model_hash_keys(model_info))
    return {k: str(v) for k, v in meta.items()}


def model_hash_keys(model_info: Any) -> dict[str, str]:
    """ss_sd_model_hash / ss_new_sd_model_hash: the checkpoint's hashes that are known (the full-file sha256 is
    read in the background; the loop adds it to the run's metadata before the first save)."""
    meta = {}
    if model_info.legacy_hash:
        meta["ss_sd_model_hash"] = str(model_info.legacy_hash)
    if model_info.sha256:
        meta["ss_new_sd_model_hash"] = str(model_info.sha256)
    return meta


def modelspec(cfg: TrainConfig, *, model_info: Any, timestamp: float) -> dict[str, str]:
    """ModelSpec 1.0.1 keys as sd-scripts writes them for a LoRA on SD 1.x, SD 2.x or SDXL."""
    spec: dict[str, Any] = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture(model_info),
        "modelspec.implementation": implementation(model_info),
        "modelspec.title": cfg.metadata_title or cfg.output_name or f"LoRA@{timestamp}",
        "modelspec.author": cfg.metadata_author,
        "modelspec.description": cfg.metadata_description,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": cfg.metadata_license,
        "modelspec.tags": cfg.metadata_tags,
        "modelspec.resolution": resolution_text(cfg, model_info),
        "modelspec.prediction_type": "v" if model_info.prediction_type == "v_prediction" else "epsilon",
        "modelspec.timestep_range": (f"{cfg.min_timestep or 0},{cfg.max_timestep or 1000}"
                                     if cfg.min_timestep is not None or cfg.max_timestep is not None else None),
        "modelspec.encoder_layer": str(cfg.clip_skip) if cfg.clip_skip is not None else None,
        "modelspec.trigger_phrase": cfg.metadata_trigger_phrase,
        "modelspec.implementation_version": f"lib_lora_train/{__version__}",
    }
    return {k: str(v) for k, v in spec.items() if v is not None}


def for_save(base: dict[str, str], cfg: TrainConfig, *, model_info: Any, step: int, epoch: int) -> dict[str, str]:
    """The metadata of one saved file: run metadata + step/epoch/time, or the minimum set, + modelspec."""
    now = time.time()
    meta = dict(base)
    meta["ss_training_finished_at"] = str(now)
    meta["ss_steps"] = str(step)
    meta["ss_epoch"] = str(epoch)
    if cfg.no_metadata:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS}
    meta.update(modelspec(cfg, model_info=model_info, timestamp=float(base.get("ss_training_started_at", now))))
    return meta
