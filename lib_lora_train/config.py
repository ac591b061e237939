"""The run configuration: one typed object, named like sd-scripts' arguments, validated once at the edge.

Hosts build a `TrainConfig` from a TOML file (`load_config`), from `--key value` flags (`parse_cli_overrides`),
or from a plain dict (`config_from_dict`). Every key is checked here: an unknown key names the closest valid
one, an sd-scripts option this engine does not implement says so, and bad values say what is expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from typing import Any

from .config_schema import (ALIASES, NETWORK_MODULES, OPTIMIZERS, SCHEDULERS, UNSUPPORTED, TrainConfig,  # noqa: F401
                            _FIELDS, _closest, _coerce, _float_or_floats, check_reg_images, check_speed_options,
                            parse_resolution)
from .errors import ConfigError


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build (or update) a config from sd-scripts-named keys; checks every key and value."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    if "preset" in values:   # presets as data (lib_lora_train/presets): their options under the explicit keys
        from .presets import expand_preset
        values = expand_preset(values)
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
        if key in UNSUPPORTED:
            raise ConfigError(f"'{raw_key}' is an sd-scripts option this engine does not implement: "
                              f"{UNSUPPORTED[key]}")
        if key not in _FIELDS:
            raise ConfigError(f"unknown option '{raw_key}'{_closest(key)}")
        setattr(cfg, key, _coerce(key, value))
    validate(cfg)
    return cfg


def _flatten_toml(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' --config_file: section names are free-form and flattened away."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("network_args", "optimizer_args"):
            for k, v in _flatten_toml(value).items():
                flat[k] = v
        else:
            flat[key] = value
    return flat


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values = _flatten_toml(data)
    values.update(overrides or {})
    cfg = config_from_dict(values)
    # Relative paths in a config file are relative to the file, so a project folder can be moved.
    root = os.path.dirname(os.path.abspath(path))
    for key in ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "dataset_config",
                "output_dir", "network_weights", "resume", "sample_prompts", "latents_cache_dir", "reg_images_dir"):
        value = getattr(cfg, key)
        if value and key in values and key not in (overrides or {}) and not os.path.isabs(value):
            setattr(cfg, key, os.path.normpath(os.path.join(root, value)))
    return cfg


def parse_cli_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` / `--flag` / `--list a b c` in sd-scripts' style, into a dict of raw values."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument '{tok}' (options look like --key value)")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            out[key] = value
            i += 1
            continue
        values = []
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            values.append(argv[j])
            j += 1
        canonical = ALIASES.get(key, key)
        field_ = _FIELDS.get(canonical)
        is_list = field_ is not None and (canonical == "text_encoder_lr" or typing.get_origin(
            typing.get_type_hints(TrainConfig)[canonical]) is list)
        if not values:
            out[key] = True           # store_true flag
        elif is_list:
            out[key] = values
        elif len(values) == 1:
            out[key] = values[0]
        else:
            raise ConfigError(f"--{key} takes one value, got {len(values)}: {' '.join(values)}")
        i = j
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _validate_memory_options(cfg: TrainConfig) -> None:
    """fp8 base, text-encoder output caching, fused backward pass, zero terminal SNR, per-encoder lrs."""
    _require(not (cfg.fp8_base or cfg.fp8_base_unet) or cfg.mixed_precision in ("fp16", "bf16"),
             "fp8_base / fp8_base_unet need mixed_precision = \"fp16\" or \"bf16\" (the weights are upcast to it)")
    if cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk:
        _require(cfg.network_train_unet_only,
                 "cache_text_encoder_outputs needs network_train_unet_only = true (a trained text encoder changes its "
                 "outputs every step)")
        changing = [k for k in ("shuffle_caption", "token_warmup_step", "caption_tag_dropout_rate",
                                "caption_dropout_rate", "caption_dropout_every_n_epochs", "enable_wildcard")
                    if getattr(cfg, k)]
        _require(not changing, "cache_text_encoder_outputs: a caption must encode the same every step, but "
                               f"{', '.join(changing)} change it (sd-scripts refuses the same)")
    if cfg.fused_backward_pass:
        _require(cfg.optimizer_type.lower() == "adafactor",
                 f"fused_backward_pass works with optimizer_type = \"Adafactor\" only, not '{cfg.optimizer_type}'")
        _require(cfg.gradient_accumulation_steps == 1,
                 "fused_backward_pass cannot be combined with gradient_accumulation_steps > 1")
        _require(cfg.mixed_precision != "fp16",
                 "fused_backward_pass cannot be used with fp16 loss scaling; use mixed_precision = \"bf16\" or \"no\"")
    lrs = cfg.text_encoder_lr if isinstance(cfg.text_encoder_lr, list) else \
        [] if cfg.text_encoder_lr is None else [cfg.text_encoder_lr]
    _require(len(lrs) <= 2, f"text_encoder_lr: at most two values (SDXL's two text encoders), got {len(lrs)}")
    _require(all(v >= 0 for v in lrs), "text_encoder_lr must not be negative")


def te_lrs(cfg: TrainConfig) -> list[float] | None:
    """text_encoder_lr as a list (None: unset)."""
    v = cfg.text_encoder_lr
    return None if v is None else list(v) if isinstance(v, list) else [float(v)]


def validate(cfg: TrainConfig) -> None:
    """Value checks that do not need the file system (those happen when the run starts)."""
    _require(not (cfg.v2 and cfg.sdxl), "v2 and sdxl cannot both be set (SD 2.x or SDXL?)")
    _validate_memory_options(cfg)
    _require(cfg.network_module in NETWORK_MODULES,
             f"network_module: expected one of {', '.join(NETWORK_MODULES)}, got '{cfg.network_module}'")
    _require(cfg.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision: expected no, fp16 or bf16, got '{cfg.mixed_precision}'")
    _require(cfg.save_precision in (None, "float", "fp16", "bf16"),
             f"save_precision: expected float, fp16 or bf16, got '{cfg.save_precision}'")
    _require(cfg.save_model_as == "safetensors",
             f"save_model_as: only 'safetensors' is written (got '{cfg.save_model_as}'); .ckpt/.pt files can carry "
             f"arbitrary code and no metadata")
    _require(not (cfg.full_fp16 and cfg.full_bf16), "full_fp16 and full_bf16 cannot both be set")
    _require(not cfg.full_fp16 or cfg.mixed_precision == "fp16", "full_fp16 needs mixed_precision = \"fp16\"")
    _require(not cfg.full_bf16 or cfg.mixed_precision == "bf16", "full_bf16 needs mixed_precision = \"bf16\"")
    _require(not (cfg.network_train_unet_only and cfg.network_train_text_encoder_only),
             "network_train_unet_only and network_train_text_encoder_only cannot both be set")
    _require(cfg.clip_skip is None or 1 <= cfg.clip_skip <= 12, f"clip_skip: expected 1..12, got {cfg.clip_skip}")
    _require(cfg.sample_clip_skip is None or 1 <= cfg.sample_clip_skip <= 12,
             f"sample_clip_skip: expected 1..12, got {cfg.sample_clip_skip}")
    _require(-4 <= cfg.sample_weight <= 4, f"sample_weight: expected -4..4, got {cfg.sample_weight}")
    _require(cfg.max_token_length in (None, 75, 150, 225),
             f"max_token_length: expected 75, 150 or 225, got {cfg.max_token_length}")
    _require(cfg.train_batch_size >= 1, "train_batch_size must be at least 1")
    _require(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1")
    _require(cfg.vae_batch_size >= 1, "vae_batch_size must be at least 1")
    _require(cfg.max_train_epochs is None or cfg.max_train_epochs >= 1, "max_train_epochs must be at least 1")
    _require(cfg.max_train_steps is None or cfg.max_train_steps >= 1, "max_train_steps must be at least 1")
    _require(cfg.learning_rate > 0, "learning_rate must be positive")
    _require(cfg.network_dim is None or cfg.network_dim >= 1, "network_dim must be at least 1")
    _require(cfg.bucket_reso_steps % 8 == 0, f"bucket_reso_steps must be divisible by 8, got {cfg.bucket_reso_steps}")
    _require(0 <= cfg.caption_dropout_rate <= 1, "caption_dropout_rate must be between 0 and 1")
    _require(0 <= cfg.caption_tag_dropout_rate <= 1, "caption_tag_dropout_rate must be between 0 and 1")
    _require(cfg.prior_loss_weight >= 0, "prior_loss_weight must not be negative")
    check_reg_images(cfg)       # config_schema.py: the reg_images_* keys (prep/regimages.py)
    check_speed_options(cfg)    # config_schema.py: attention kernel, torch.compile backend, optimizer kernel
    _require(cfg.loss_type in ("l2", "l1", "huber", "smooth_l1"),
             f"loss_type: expected l2, l1, huber or smooth_l1, got '{cfg.loss_type}'")
    _require(cfg.lr_scheduler in SCHEDULERS,
             f"lr_scheduler: expected one of {', '.join(SCHEDULERS)}, got '{cfg.lr_scheduler}'"
             + (lambda m: f"; did you mean '{m[0]}'?" if m else "")(
                 difflib.get_close_matches(cfg.lr_scheduler, SCHEDULERS, n=1)))
    known_opt = {o.lower(): o for o in OPTIMIZERS}
    if cfg.optimizer_type.lower() not in known_opt and cfg.optimizer_type:
        m = difflib.get_close_matches(cfg.optimizer_type.lower(), list(known_opt), n=1)
        raise ConfigError(f"optimizer_type: unknown optimizer '{cfg.optimizer_type}'"
                          + (f"; did you mean '{known_opt[m[0]]}'?" if m else
                             f"; expected one of {', '.join(OPTIMIZERS)}"))
    _require(cfg.save_every_n_epochs is None or cfg.save_every_n_epochs >= 1, "save_every_n_epochs must be >= 1")
    _require(cfg.save_every_n_steps is None or cfg.save_every_n_steps >= 1, "save_every_n_steps must be >= 1")
    _require(0.0 <= cfg.validation_split < 1.0,
             f"validation_split: expected a fraction in [0, 1), got {cfg.validation_split}")
    for key in ("validate_every_n_epochs", "validate_every_n_steps", "max_validation_steps"):
        _require(getattr(cfg, key) is None or getattr(cfg, key) >= 1, f"{key} must be at least 1")
    _require(cfg.min_timestep is None or 0 <= cfg.min_timestep < 1000, "min_timestep must be in 0..999")
    _require(cfg.max_timestep is None or 0 < cfg.max_timestep <= 1000, "max_timestep must be in 1..1000")
    _require(not cfg.noise_offset_random_strength or cfg.noise_offset,
             "noise_offset_random_strength needs noise_offset")
    _require(cfg.adaptive_noise_scale is None or cfg.noise_offset is not None,
             "adaptive_noise_scale needs noise_offset")
    _require(not (cfg.cache_latents or cfg.cache_latents_to_disk) or not cfg.random_crop,
             "random_crop cannot be used with cache_latents (the crop would be frozen into the cache)")
    w, h = cfg.resolution_wh
    _require(w >= 64 and h >= 64 and w % 8 == 0 and h % 8 == 0,
             f"resolution: each side must be a multiple of 8 and at least 64, got {w}x{h}")
    _require(cfg.device == "auto" or cfg.device in ("cpu", "mps") or cfg.device.startswith("cuda"),
             f"device: expected auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'")
    name = cfg.output_name
    _require(bool(name) and not any(c in name for c in '/\\:*?"<>|'),
             f"output_name: must be a plain file name without path separators, got '{name}'")
