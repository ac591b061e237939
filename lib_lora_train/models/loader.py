"""load_sd_model: an SD 1.x / SD 2.x / SDXL single-file checkpoint (path or ldm / sgm state dict) -> SDModel,
offline.

Modules are built on the meta device and receive the checkpoint tensors with load_state_dict(assign=True):
where dtype and device already match, the modules share the given tensors (no copy, no double memory). The
OpenCLIP text towers' fused q/k/v and transposed projection become views of the given tensors, so they share
them too.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from .bundle import ModelInfo, SDModel, base_model_version
from .ckpt import FileHashes, file_hashes, legacy_hash, read_checkpoint
from .convert import (SD2_TE_PREFIX, SDXL_TE2_PREFIX, require_complete, split_ldm, te_for_model,
                      unet_ldm_to_diffusers, vae_ldm_to_diffusers)
from .detect import detect_family, marked_v_prediction
from .infer import NATIVE_RESOLUTION, SD1Architecture, check_overrides, sd1_architecture
from .openclip import openclip_to_transformers
from .tokenizer import clip_tokenizer, open_clip_tokenizer

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
    """UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler of an SD 1.x / 2.x / SDXL checkpoint, in
    eval mode with frozen weights. `source`: a .safetensors / .ckpt path, or a state dict in the ldm / sgm
    layout. The family comes from the keys; prediction_type from `overrides`, else the file's v_pred marker,
    else (full-size SD 2.x only) the WebUI's one-pass probe, else epsilon."""
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
    parts = require_complete(split_ldm(sd), family)
    prediction_source = "override" if "prediction_type" in ov else None
    if prediction_source is None and marked_v_prediction(sd):
        ov["prediction_type"], prediction_source = "v_prediction", "marker"
    unet_sd = unet_ldm_to_diffusers(parts.unet)
    vae_sd = vae_ldm_to_diffusers(parts.vae)
    te_sd, te2_sd = parts.text_encoder, None
    if family == "sd2":
        te_sd, unused = openclip_to_transformers(parts.open_clip, drop_last_layer=True, with_projection=False,
                                                 label="SD 2.x text encoder (cond_stage_model.model.*)")
        parts.other.update({SD2_TE_PREFIX + k: t for k, t in unused.items()})
    elif family == "sdxl":
        te2_sd, unused = openclip_to_transformers(parts.open_clip, drop_last_layer=False, with_projection=True,
                                                  label="SDXL second text encoder (conditioner.embedders.1.model.*)")
        parts.other.update({SDXL_TE2_PREFIX + k: t for k, t in unused.items()})
    arch = sd1_architecture(unet_sd, vae_sd, te_sd, ov, family=family, te2=te2_sd)

    unet, vae, text_encoder = build_sd1_modules(arch, unet_sd, vae_sd, te_sd, device, dtype)
    text_encoder_2 = build_text_encoder_2(arch, te2_sd, device, dtype) if te2_sd is not None else None
    if prediction_source is None and family == "sd2" and is_a1111_sd2_unet(arch.unet):
        # SD 2.x 768-v files carry no marker: the WebUI tells them apart by how the UNet behaves
        if sd2_v_prediction_probe(unet):
            arch.prediction_type, prediction_source = "v_prediction", "probe"
            unet.register_to_config(sample_size=NATIVE_RESOLUTION["sd2_v"] // 8)
    prediction_source = prediction_source or "default"
    scheduler, schedule_source = sd1_noise_scheduler(arch.prediction_type, parts.other)

    v_pred = arch.prediction_type == "v_prediction"
    version = base_model_version(family, v_pred)
    native = NATIVE_RESOLUTION["sd2_v" if family == "sd2" and v_pred else family]
    info = ModelInfo(family=family, prediction_type=arch.prediction_type, latent_scale=arch.latent_scale,
                     base_model_version=version, v2=family == "sd2", native_resolution=native,
                     name=name or (path.name if path else "model"),
                     path=str(path) if path else None,
                     legacy_hash=legacy_hash(path) if path else None)
    info.extra.update(schedule=schedule_source, ema_keys_ignored=len(parts.ema), prediction_source=prediction_source,
                      markers=sorted(k for k in MARKER_KEYS if k in sd),
                      ldm_extra_keys=sorted(parts.other),
                      te_layout="legacy" if parts.legacy_te_layout else "text_model",
                      configs={"unet": arch.unet, "vae": arch.vae, "text": arch.text,
                               **({"text_2": arch.text_2} if arch.text_2 else {})})
    tokenizer = open_clip_tokenizer() if family == "sd2" else clip_tokenizer()
    return SDModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   noise_scheduler=scheduler, info=info, text_encoder_2=text_encoder_2,
                   tokenizer_2=open_clip_tokenizer() if family == "sdxl" else None)


# Empty marker tensors some files carry: v_pred (v-prediction), ztsnr (trained with zero terminal SNR).
MARKER_KEYS = ("v_pred", "ztsnr")
A1111_SD2_CHANNELS = (320, 640, 1280, 1280)   # the one SD 2.x UNet shape the WebUI's probe is made for


def is_a1111_sd2_unet(unet_config: Mapping[str, Any]) -> bool:
    return (tuple(unet_config["block_out_channels"]) == A1111_SD2_CHANNELS
            and unet_config["cross_attention_dim"] == 1024 and unet_config["in_channels"] == 4)


def sd2_v_prediction_probe(unet) -> bool:
    """The WebUI's test for SD 2.x v-prediction (sd_models_config.is_using_v_parameterization_for_sd2): at
    t = 999 with a constant latent and a constant context, a v model's output sits far below its input (mean
    difference < -1), an epsilon model's does not. One forward pass on an 8x8 latent."""
    p = next(unet.parameters())
    if p.is_meta:   # structure only (no weights): nothing to probe
        return False
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=cond).sample
    return float((out.float() - x.float()).mean()) < -1.0


class BackgroundHashes:
    """The full-file sha256 of a file-backed model read in a background thread (it reads the whole checkpoint:
    seconds for SD 1.5, tens of seconds for SDXL), so work that needs it only for metadata does not wait for it.
    `wait()` joins the thread and fills info.sha256 / legacy_hash in the caller's thread (nothing else writes
    them); it returns True on the call that filled them. A read error is raised by wait(), as ensure_hashes
    raises it."""

    def __init__(self, info: ModelInfo):
        self.info = info
        self._result: FileHashes | BaseException | None = None
        self._thread: threading.Thread | None = None
        if info.path and (info.sha256 is None or info.legacy_hash is None):
            self._thread = threading.Thread(target=self._read, args=(info.path,), name="lora-train-model-hash",
                                            daemon=True)
            self._thread.start()

    def _read(self, path: str) -> None:
        try:
            self._result = file_hashes(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self._result = exc

    def wait(self) -> bool:
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        if isinstance(self._result, BaseException):
            raise self._result
        self.info.sha256, self.info.legacy_hash = self._result.sha256, self._result.legacy
        return True


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
    """UNet, VAE and the (first) text encoder, any family."""
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
    _assign_text(text_encoder, te_sd, device, dtype, "text encoder")
    return unet, vae, text_encoder


def build_text_encoder_2(arch: SD1Architecture, te2_sd, device: torch.device, dtype: torch.dtype | None):
    """SDXL's OpenCLIP bigG as a transformers CLIPTextModelWithProjection."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with init_empty_weights():
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_2))
    _assign_text(te2, te2_sd, device, dtype, "second text encoder")
    return te2


def _assign_text(text_encoder, te_sd, device, dtype, label: str) -> None:
    own = text_encoder.state_dict()
    te = {k: t for k, t in te_for_model(te_sd, own.keys()).items() if not k.endswith("embeddings.position_ids")}
    # Position ids always come from the model itself: some merged files hold float or damaged ones, many have
    # none. transformers 4.30 keeps them in the state dict (persistent buffer), later versions do not.
    te.update({k: t for k, t in own.items() if k.endswith("embeddings.position_ids")})
    _assign(text_encoder, te, device, dtype, label)


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
