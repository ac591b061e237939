"""The run configuration's schema: TrainConfig (named like sd-scripts' arguments), the options this engine refuses,
and the coercion of one value. config.py builds and validates a config from it; presets/ checks its own values
against it (so neither imports the other: config.py expands presets, presets read this schema).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

from .training.optim import OPTIMIZER_NAMES as OPTIMIZERS  # noqa: E402,F401  (one list of names: the optimizer table)
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
    # validation loss on up to 8 training images instead, labelled so in the run record; false: sd-scripts'
    # behaviour (no validation loss without validation_split)
    validation_fallback: bool = True
    # --- regularisation images made by the base model before training (prep/regimages.py; this engine's keys)
    reg_images_prompt: str | None = None     # the class prompt ("a photo of a woman"); set: generate and use them
    reg_images_count: int | None = None      # how many (None: one epoch's training samples, repeats included)
    reg_images_negative_prompt: str = ""
    reg_images_size: str | None = None       # W,H or N (None: the run's resolution)
    reg_images_sampler: str = "dpm++_2m_karras"
    reg_images_steps: int = 20
    reg_images_cfg_scale: float = 7.0
    reg_images_seed: int = 0                 # image i gets seed reg_images_seed + i
    reg_images_repeats: int = 1              # the N of the N_<class> folder (sd-scripts balances anyway)
    reg_images_dir: str | None = None        # the cache (None: <output_dir>/reg_images)
    # --- speed (GPU): attention kernel, memory format, compilation, optimizer kernels, transfers (training/speed.py)
    sdpa: bool = False                  # sd-scripts' flag: PyTorch's SDPA attention (the default here anyway)
    xformers: bool = False              # xformers' memory-efficient attention (needs the xformers package)
    mem_eff_attn: bool = False          # sd-scripts' memory-efficient attention: here SDPA's memory-efficient kernel
    torch_compile: bool = False         # torch.compile the UNet's forward, after the network is attached
    dynamo_backend: str = "inductor"    # torch.compile's backend (sd-scripts' names; "eager" only traces)
    channels_last: bool = False         # the UNet's (and VAE's) convolutions in channels-last memory format
    optimizer_kernel: str = "auto"      # auto | fused | foreach | for_loop (auto: fused on CUDA where torch can)
    pin_memory: bool = True             # CUDA: batches through pinned memory, copied without waiting; no-op on CPU
    async_loss: bool | None = None      # read the loss one step late, without waiting (None: on for CUDA only)

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


# ---------------------------------------------------------------- regularisation images (prep/regimages.py)
REG_IMAGES_MAX_COUNT = 10000
REG_PROMPT_MAX_CHARS = 1000


def check_reg_prompt(text: Any, what: str = "reg_images_prompt", *, required: bool = True) -> str:
    """A class prompt: one line of printable text, not too long."""
    value = "" if text is None else str(text).strip()
    if not value:
        if required:
            raise ConfigError(f"{what}: a class prompt is required (e.g. 'a photo of a woman')")
        return ""
    if len(value) > REG_PROMPT_MAX_CHARS:
        raise ConfigError(f"{what}: at most {REG_PROMPT_MAX_CHARS} characters, got {len(value)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{what}: one line of text without control characters")
    return value


def check_reg_settings(count: int | None, size: tuple[int, int] | None, steps: int, cfg_scale: float, seed: int,
                       repeats: int) -> None:
    """The numbers of a regularisation-image request (the run's keys, the CLI's and the API's arguments)."""
    if count is not None and not 1 <= int(count) <= REG_IMAGES_MAX_COUNT:
        raise ConfigError(f"reg_images_count: expected 1..{REG_IMAGES_MAX_COUNT}, got {count}")
    if size is not None:
        for side in size:
            if not 64 <= side <= 4096 or side % 8:
                raise ConfigError(f"reg_images_size: each side must be 64..4096 and divisible by 8, got "
                                  f"{size[0]}x{size[1]}")
    if not 1 <= int(steps) <= 150:
        raise ConfigError(f"reg_images_steps: expected 1..150, got {steps}")
    if not 0 < float(cfg_scale) <= 30:
        raise ConfigError(f"reg_images_cfg_scale: expected a number in (0, 30], got {cfg_scale}")
    if not 0 <= int(seed) < 2**32 - REG_IMAGES_MAX_COUNT:
        raise ConfigError(f"reg_images_seed: expected 0..{2**32 - REG_IMAGES_MAX_COUNT - 1}, got {seed}")
    if not 1 <= int(repeats) <= 1000:
        raise ConfigError(f"reg_images_repeats: expected 1..1000, got {repeats}")


def check_reg_images(cfg: TrainConfig) -> None:
    """config.validate: the reg_images_* keys of a run."""
    if cfg.reg_images_prompt is None:
        return
    cfg.reg_images_prompt = check_reg_prompt(cfg.reg_images_prompt)
    cfg.reg_images_negative_prompt = check_reg_prompt(cfg.reg_images_negative_prompt,
                                                      "reg_images_negative_prompt", required=False)
    if cfg.reg_data_dir:
        raise ConfigError("reg_data_dir and reg_images_prompt are both set: use your own regularisation images "
                          "or generated ones, not both (for a project: remove its reg/ folders)")
    if cfg.dataset_config:
        raise ConfigError("reg_images_prompt works with folder datasets (train_data_dir); with a dataset_config, "
                          "generate them with `python -m lib_lora_train reg-images` and add the folder as an "
                          "is_reg subset")
    size = parse_resolution(cfg.reg_images_size) if cfg.reg_images_size else None
    check_reg_settings(cfg.reg_images_count, size, cfg.reg_images_steps, cfg.reg_images_cfg_scale,
                       cfg.reg_images_seed, cfg.reg_images_repeats)
    from .sampling.pipeline import sampler_key
    try:
        sampler_key(cfg.reg_images_sampler)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("sample_sampler", "reg_images_sampler")) from None


# sd-scripts' --dynamo_backend choices (train_util.py)
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensort", "ipex", "tvm")
OPTIMIZER_KERNELS = ("auto", "fused", "foreach", "for_loop")


def check_speed_options(cfg: TrainConfig) -> None:
    """config.validate: the speed keys (attention kernel, torch.compile backend, optimizer kernel)."""
    import importlib.util
    chosen = [k for k in ("sdpa", "xformers", "mem_eff_attn") if getattr(cfg, k)]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are each an attention kernel: set only one (sd-scripts would "
                          f"silently use the first of mem_eff_attn, xformers, sdpa)")
    if cfg.xformers and importlib.util.find_spec("xformers") is None:
        raise ConfigError("xformers = true, but the xformers package is not installed in this Python. Remove the "
                          "flag: PyTorch's scaled-dot-product attention (sdpa, the default here) is as fast on "
                          "PyTorch 2; this extension never installs xformers (its wheels are tied to one torch build)")
    cfg.dynamo_backend = str(cfg.dynamo_backend).strip().lower()
    if cfg.dynamo_backend not in DYNAMO_BACKENDS:
        match = difflib.get_close_matches(cfg.dynamo_backend, DYNAMO_BACKENDS, n=1)
        raise ConfigError(f"dynamo_backend: expected one of {', '.join(DYNAMO_BACKENDS)}, got "
                          f"'{cfg.dynamo_backend}'" + (f"; did you mean '{match[0]}'?" if match else ""))
    cfg.optimizer_kernel = str(cfg.optimizer_kernel).strip().lower().replace("-", "_")
    if cfg.optimizer_kernel not in OPTIMIZER_KERNELS:
        raise ConfigError(f"optimizer_kernel: expected one of {', '.join(OPTIMIZER_KERNELS)}, got "
                          f"'{cfg.optimizer_kernel}'")
