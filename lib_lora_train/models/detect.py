"""Which model family a single-file checkpoint is, from its key names and shapes only.

`detect_checkpoint` reads a .safetensors header (no tensor data), so hosts and the UI can ask cheaply. Anything
that is not a base SD 1.x / SD 2.x / SDXL-architecture model is refused with a ModelError that says what the
file is and what is supported.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .convert import SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, TE_PREFIX, UNET_PREFIX

SUPPORTED = "supported: SD 1.x, SD 2.x (512 / 768-v), SDXL base-architecture (SDXL, Pony, Illustrious, NoobAI)"
V_PRED_KEY = "v_pred"   # marker key of v-prediction files (as the WebUI / ComfyUI read it)
_LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_", "lora_transformer_")
_LORA_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".hada_w1_a", ".lokr_w1", ".diff_b", ".on_input")
_DIFFUSERS_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.", "unet.", "text_model.", "encoder.down_blocks.",
                       "decoder.up_blocks.", "transformer_blocks.", "text_encoder.", "vae.")
_LATENT_CHANNELS = 4


class _Shape:
    """A header entry standing in for a tensor: detection only reads `.shape`."""
    __slots__ = ("shape",)

    def __init__(self, shape):
        self.shape = tuple(shape)


def _refuse(what: str) -> ModelError:
    return ModelError(f"{what}; {SUPPORTED}")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return None if t is None else tuple(getattr(t, "shape", ()))


def context_dim(sd: Mapping[str, Any]) -> int | None:
    """The UNet's cross-attention width (the text conditioning's channels)."""
    for k, t in sd.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return int(t.shape[1])
    return None


def detect_family(sd: Mapping[str, Any]) -> str:
    """'sd1' | 'sd2' | 'sdxl' of an ldm / sgm state dict (tensors, or anything with `.shape`), or a ModelError
    saying what the file is instead."""
    keys = list(sd)
    if not keys:
        raise ModelError("the checkpoint is empty")
    if any(k.startswith(_LORA_PREFIXES) or k.endswith(_LORA_SUFFIXES) for k in keys):
        raise _refuse("this is a LoRA / LyCORIS file, not a base model checkpoint; load it as a network instead")
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") or k.endswith("x_embedder.proj.weight")
           for k in keys):
        raise _refuse("this is a Stable Diffusion 3 checkpoint (MMDiT joint_blocks), which is not supported")
    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        raise _refuse("this is a FLUX checkpoint (double_blocks), which is not supported")
    if any(k.startswith("embedder.model.") for k in keys):
        raise _refuse("this is a Stable Diffusion 2.x unCLIP (image variation) checkpoint, which is not supported")
    if any(k.startswith("depth_model.") for k in keys):
        raise _refuse("this is a Stable Diffusion 2.x depth-to-image checkpoint, which is not supported")
    has_unet = (UNET_PREFIX + "input_blocks.0.0.weight") in sd
    if not has_unet and any(k.startswith(_DIFFUSERS_PREFIXES) for k in keys):
        raise _refuse("the keys are in the diffusers folder layout (down_blocks.* / text_model.*); load the model "
                      "as one single-file checkpoint (.safetensors / .ckpt in the original CompVis / SAI layout)")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) or \
            (_shape(sd, UNET_PREFIX + "label_emb.0.0.weight") or (0, 0))[1] == 2560 or context_dim(sd) == 1280:
        raise _refuse("this is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder, context 1280); "
                      "the refiner is not supported for LoRA training")
    if not has_unet:
        raise _refuse("no model.diffusion_model.input_blocks.* weights: not a Stable Diffusion checkpoint "
                      "(or an unknown layout)")
    in_ch = _shape(sd, UNET_PREFIX + "input_blocks.0.0.weight")[1]
    if in_ch == 9:
        raise _refuse("this is an inpainting model (UNet input of 9 channels: latents, mask and masked image); "
                      "inpainting models are not supported for LoRA training")
    if in_ch == 8:
        raise _refuse("this is an instruct-pix2pix model (UNet input of 8 channels); it is not supported")
    if in_ch != _LATENT_CHANNELS:
        raise _refuse(f"the UNet takes {in_ch} input channels instead of {_LATENT_CHANNELS} latent channels; "
                      f"this model type is not supported")
    sdxl_te = any(k.startswith((SDXL_TE1_PREFIX, SDXL_TE2_PREFIX)) for k in keys)
    if sdxl_te or (UNET_PREFIX + "label_emb.0.0.weight") in sd:
        missing = [p + "*" for p in (SDXL_TE1_PREFIX, SDXL_TE2_PREFIX) if not any(k.startswith(p) for k in keys)]
        if missing or (UNET_PREFIX + "label_emb.0.0.weight") not in sd:
            what = ", ".join(missing) or "model.diffusion_model.label_emb.*"
            raise _refuse(f"this looks like an SDXL checkpoint but it has no {what} weights (incomplete or "
                          f"another SDXL-like architecture)")
        return "sdxl"
    if any(k.startswith(SD2_TE_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(TE_PREFIX) for k in keys):
        return "sd1"
    ctx = context_dim(sd)
    hint = {1024: " (an SD 2.x UNet without its text encoder?)", 2048: " (an SDXL UNet without its text "
            "encoders?)", 768: " (an SD 1.x UNet without its text encoder?)"}.get(ctx, "")
    raise _refuse(f"the checkpoint has no text encoder weights{hint}; a complete single-file checkpoint is needed")


def marked_v_prediction(sd: Mapping[str, Any]) -> bool:
    """True when the checkpoint itself says it is v-prediction (the `v_pred` marker key)."""
    return V_PRED_KEY in sd


def detect_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> tuple[str, str]:
    """(family, prediction_type) from the key names and shapes: a .safetensors header is read without tensor
    data; a .ckpt is unpickled (weights only). prediction_type is "v_prediction" only where the file carries a
    marker; loading may still be told otherwise (the v_parameterization option)."""
    if isinstance(source, Mapping):
        sd = source
    else:
        p = Path(source)
        if p.is_dir():
            raise _refuse(f"{p.name} is a folder (a diffusers-layout model?); give one single-file checkpoint")
        sd = read_header_shapes(p) if p.suffix.lower() == ".safetensors" else _read_full(p)
    family = detect_family(sd)
    return family, "v_prediction" if marked_v_prediction(sd) else "epsilon"


def _read_full(p: Path):
    from .ckpt import read_checkpoint

    return read_checkpoint(p)


def read_header_shapes(path: str | os.PathLike) -> dict[str, _Shape]:
    """{key: object with .shape} from a safetensors header (8-byte little-endian length, then JSON)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024 or n > p.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ModelError(f"cannot read the safetensors header of {p.name}: {e}") from e
    if not isinstance(header, dict):
        raise ModelError(f"the safetensors header of {p.name} is not a JSON object")
    return {k: _Shape(v.get("shape", ())) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


def expected_family(*, sdxl: bool = False, v2: bool = False, checkpoint: str | os.PathLike | None = None) -> str:
    """The family a run is for before its model is loaded (to check block-weight lists at submit / import):
    sd-scripts' sdxl / v2 flags, else the checkpoint's header when it is a readable file, else SD 1.x. The
    loaded model decides in the end (training checks the lists against it again)."""
    if sdxl:
        return "sdxl"
    if v2:
        return "sd2"
    if checkpoint and os.path.isfile(checkpoint):
        try:
            return detect_checkpoint(checkpoint)[0]
        except Exception:  # noqa: BLE001 - an unreadable file is reported where it is loaded
            return "sd1"
    return "sd1"
