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
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

from .training.optim import OPTIMIZER_NAMES as OPTIMIZERS  # noqa: E402  (one list of names: the optimizer table)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "adafactor")
NETWORK_MODULES = ("networks.lora", "networks.dylora", "lycoris.kohya")


@dataclass
class TrainConfig:
    # --- model
    pretrained_model_name_or_path: str = ""
    v2: bool = False                    # sd-scripts' assertion that the checkpoint is SD 2.x (checked on load)
    sdxl: bool = False                  # the same for SDXL (sd-scripts' sdxl_train_network.py)
    v_parameterization: bool = False
    zero_terminal_snr: bool = False     # rescale the noise schedule to zero terminal SNR (needs v-prediction)
    clip_skip: int | None = None
    max_token_length: int | None = None
    no_half_vae: bool = False
    # --- dataset (folder mode or a dataset_config file)
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    dataset_config: str | None = None
    resolution: str = "512"
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    random_crop: bool = False
    dataset_repeats: int = 1
    prior_loss_weight: float = 1.0
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    max_data_loader_n_workers: int = 2
    # --- network
    network_module: str = "networks.lora"
    network_dim: int | None = None
    network_alpha: float | None = None
    network_args: list[str] = field(default_factory=list)
    network_dropout: float | None = None
    network_weights: str | None = None
    dim_from_weights: bool = False
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    training_comment: str | None = None
    # --- optimizer and schedule
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = field(default_factory=list)
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | list[float] | None = None   # SDXL: two values = te1, te2
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    # --- length
    max_train_steps: int | None = None
    max_train_epochs: int | None = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int | None = None
    # --- precision and memory
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    gradient_checkpointing: bool = False
    fp8_base: bool = False              # frozen UNet and text-encoder weights stored in fp8, upcast per layer
    fp8_base_unet: bool = False         # the same for the UNet only
    fused_backward_pass: bool = False   # Adafactor: the step inside the backward pass, per parameter
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    # --- noise and loss
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    min_timestep: int | None = None
    max_timestep: int | None = None
    # --- saving and resume
    output_dir: str = "output"
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    no_metadata: bool = False
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_trigger_phrase: str | None = None
    # --- previews
    sample_prompts: str | None = None
    sample_every_n_epochs: int | None = None
    sample_every_n_steps: int | None = None
    sample_at_first: bool = False
    sample_sampler: str = "dpm++_2m_karras"  # sd-scripts: ddim; ours matches the WebUI's favourite
    sample_weight: float = 1.0               # the LoRA's weight in the previews (<lora:name:W> in the WebUI)
    sample_clip_skip: int | None = None      # the previews' clip skip; None: the run's clip_skip
    # --- validation loss (sd-scripts' keys and meaning; see training/evaluate.py)
    validation_split: float = 0.0       # fraction of each dataset's training images held out (never reg images)
    validation_seed: int | None = None  # seed of the split's shuffle and of the fixed noise (default: seed)
    validate_every_n_epochs: int | None = None   # None: every epoch (and always the last)
    validate_every_n_steps: int | None = None    # None: not between epochs
    max_validation_steps: int | None = None      # at most this many validation batches (None: all)
    # --- this engine's own keys (not in sd-scripts)
    device: str = "auto"                # auto | cpu | cuda | cuda:N | mps
    ddp_timeout: float | None = None    # minutes a process waits for the others of a torchrun / accelerate run (30)
    overwrite: bool = False             # allow replacing the outputs of an earlier run with the same name
    latents_cache_dir: str | None = None  # where cache_latents_to_disk writes (default: <output_dir>/.latents)
    # Without held-out images (validation_split = 0, or a split too small to hold any out), measure the
    # validation loss on up to 16 training images instead, labelled so in the run record; false: sd-scripts'
    # behaviour (no validation loss without validation_split)
    validation_fallback: bool = True

    # ---------------------------------------------------------------- derived values
    @property
    def resolution_wh(self) -> tuple[int, int]:
        return parse_resolution(self.resolution)

    @property
    def seed_value(self) -> int:
        return 42 if self.seed is None else int(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# sd-scripts options this engine does not implement: an error that says so, never a silent no-op.
UNSUPPORTED: dict[str, str] = {
    "vae": "an external VAE file is not supported yet; the checkpoint's own VAE is used",
    "lowram": "has no meaning here (models are loaded once, in place)",
    "highvram": "has no meaning here",
    "xformers": "attention uses PyTorch's scaled-dot-product attention, which needs no flag",
    "sdpa": "attention always uses PyTorch's scaled-dot-product attention; remove the flag",
    "mem_eff_attn": "attention always uses PyTorch's scaled-dot-product attention; remove the flag",
    "persistent_data_loader_workers": "this engine loads data without DataLoader worker processes; remove the flag",
    "color_aug": "not supported (sd-scripts cannot cache latents with it either)",
    "face_crop_aug_range": "not supported",
    "in_json": "fine-tuning metadata datasets are not supported; use N_name folders or a dataset_config",
    "save_n_epoch_ratio": "not supported; use save_every_n_epochs",
    "save_last_n_steps": "not supported; use save_last_n_epochs",
    "save_last_n_epochs_state": "not supported",
    "save_last_n_steps_state": "not supported",
    "scale_weight_norms": "max-norm regularisation is not supported yet",
    "scale_v_pred_loss_like_noise_pred": "not supported yet",
    "v_pred_like_loss": "not supported yet",
    "weighted_captions": "not supported yet",
    "masked_loss": "not supported yet",
    "alpha_mask": "not supported yet",
    "base_weights": "merging LoRAs into the base before training is not supported yet",
    "base_weights_multiplier": "not supported yet",
    "torch_compile": "not supported yet",
    "dynamo_backend": "not supported yet",
    "deepspeed": "not supported",
    "log_with": "use the run record (events.jsonl) written beside the outputs; TensorBoard/W&B are not supported",
    "logging_dir": "use the run record (events.jsonl) written beside the outputs; TensorBoard is not supported",
    "log_prefix": "TensorBoard/W&B logging is not supported",
    "wandb_api_key": "W&B logging is not supported",
    "huggingface_repo_id": "uploading is not supported (no network)",
    "initial_epoch": "use resume with a saved state",
    "initial_step": "use resume with a saved state",
    "skip_until_initial_step": "use resume with a saved state",
    "lr_decay_steps": "the warmup_stable_decay scheduler is not supported",
    "lr_scheduler_type": "custom scheduler classes are not supported",
    "lr_scheduler_args": "custom scheduler arguments are not supported",
    "multires_noise": "not an option; did you mean multires_noise_iterations?",
    "huber_scale": "not supported yet",
    "ip_noise_gamma_random_strength": "not supported yet",
    "debug_dataset": "not supported",
    "use_8bit_adam": "deprecated in sd-scripts; use optimizer_type = \"AdamW8bit\"",
    "use_lion_optimizer": "deprecated in sd-scripts; use optimizer_type = \"Lion\"",
    "mode_scale": "SD3 option",
    "weighting_scheme": "SD3/FLUX option",
    "blocks_to_swap": "not supported",
    "output_config": "not supported; the run record holds the full config",
    "config_file": "pass the file with --config",
}

# Spellings sd-scripts still accepts.
ALIASES = {"caption_extention": "caption_extension"}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def parse_resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    parts = [p for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"resolution: expected N or W,H (e.g. 512 or 512,768), got {value!r}") from None
    if len(nums) == 1:
        return nums[0], nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise ConfigError(f"resolution: expected N or W,H (e.g. 512 or 512,768), got {value!r}")


def _closest(key: str) -> str:
    names = list(_FIELDS) + list(UNSUPPORTED)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _float_or_floats(name: str, value: Any) -> float | list[float] | None:
    """text_encoder_lr: one number, or sd-scripts' list (one per SDXL text encoder); one value stays a float."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else \
        list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        nums = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number or a list of numbers, got {value!r}") from None
    if not nums:
        return None
    return nums[0] if len(nums) == 1 else nums


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's declared type."""
    if name == "text_encoder_lr":
        return _float_or_floats(name, value)
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list \
        else hint
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                return [v for v in value.split() if v] if "=" in value else [value]
            if isinstance(value, dict):
                return [f"{k}={v}" for k, v in value.items()]
            return [str(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(float(value)) if "e" in value.lower() \
                else int(value)
        if base is float:
            return float(value)
        if base is str:
            if name == "resolution" and isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        pass
    tname = getattr(base, "__name__", str(base))
    raise ConfigError(f"{name}: expected {tname}, got {value!r}")


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
                "output_dir", "network_weights", "resume", "sample_prompts", "latents_cache_dir"):
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
