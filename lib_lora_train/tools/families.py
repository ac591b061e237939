"""Checkpoint families for the tools: which family a single-file checkpoint is (from its keys), and where each
sd-scripts LoRA name of SD 2.x / SDXL lives in it.

SD 2.x: U-Net names are diffusers paths (as SD 1.x); the OpenCLIP ViT-H text encoder sits at
cond_stage_model.model.transformer.resblocks.N with q/k/v fused in attn.in_proj_weight, so lora_te_..._q_proj is
the first third of its rows (k the second, v the third). SDXL: U-Net names are the sgm paths themselves
(lora_unet_input_blocks_4_1_... -> model.diffusion_model.input_blocks.4.1....); lora_te1_ is CLIP-L at
conditioner.embedders.0.transformer.text_model.*, lora_te2_ is OpenCLIP bigG at
conditioner.embedders.1.model.transformer.resblocks.N (fused q/k/v as SD 2.x). Diffusers-spelled SDXL U-Net names
(lora_unet_down_blocks_...) are indexed too, as sd-scripts converts them on load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import ModelError
from ..models.convert import UNET_PREFIX, unet_ldm_to_diffusers
from ..networks.names import FAMILY_LABELS

SD1_TE = "cond_stage_model.transformer."
SD2_TE = "cond_stage_model.model."
SDXL_TE1 = "conditioner.embedders.0.transformer."
SDXL_TE2 = "conditioner.embedders.1.model."
# OpenCLIP resblock leaf -> transformers CLIP leaf (q / k / v are row chunks of the fused in_proj)
_OPENCLIP_LEAVES = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
_QKV = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                       r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_SGM_SUB = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.(\d+)\.(.+)\.weight$")
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$")


def checkpoint_family(keys: Iterable[str]) -> str:
    """sd1 | sd2 | sdxl of an ldm / sgm single-file checkpoint, from its key names; a ModelError for anything
    else (a LoRA file, a diffusers folder's state dict, another model)."""
    keys = list(keys)
    if not keys:
        raise ModelError("the checkpoint is empty")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        raise ModelError("this is a LoRA / LyCORIS file, not a base model checkpoint")
    if not any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        if any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys):
            raise ModelError("the keys are in the diffusers layout; give a single-file (ldm / sgm) checkpoint")
        raise ModelError("no model.diffusion_model.input_blocks.* weights: not a Stable Diffusion checkpoint "
                         "(SD 1.x, SD 2.x or SDXL)")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelError("this is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder as "
                         "conditioner.embedders.0.model); the tools work on SD 1.x, SD 2.x and SDXL base checkpoints")
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith(SD2_TE) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TE) for k in keys):
        return "sd1"
    raise ModelError("no text encoder weights (cond_stage_model.* / conditioner.embedders.*): not a complete "
                     "Stable Diffusion checkpoint")


def refuse_mismatch(lora_family: str, model_family: str, lora_name: str, model_name: str, *,
                    guessed: bool = False) -> None:
    """A LoRA fits only its own family's checkpoints. guessed: the LoRA's family is only the SD 1.x default (no
    metadata, no telling name or width); SD 1.x and 2.x share names, so the layer shapes decide then."""
    if lora_family == model_family or (guessed and model_family in ("sd1", "sd2")):
        return
    label = FAMILY_LABELS.get(lora_family, "non-Stable-Diffusion" if lora_family == "other" else lora_family)
    raise ModelError(f"{lora_name} is an {label} LoRA but {model_name} is an {FAMILY_LABELS[model_family]} "
                     f"checkpoint; a LoRA only fits the model family it was trained on")


@dataclass(frozen=True)
class Layer:
    name: str                          # the sd-scripts LoRA name (the family's own spelling)
    weight: str                        # checkpoint key of the weight
    bias: str | None                   # its bias key, if the checkpoint has one
    chunk: tuple[int, int] | None      # (i, n): rows i/n .. (i+1)/n of a fused weight (OpenCLIP q / k / v)
    part: str                          # unet | text_encoder
    kind: str                          # attn | res | down | up | te | other (which preset class it belongs to)


def _unet_kind(sub_rest: str) -> str:
    if sub_rest.startswith(("proj_in", "proj_out", "transformer_blocks")):
        return "attn"
    if sub_rest.startswith(("in_layers", "emb_layers", "out_layers", "skip_connection")):
        return "res"
    return {"op": "down", "conv": "up"}.get(sub_rest, "other")


def _bias(weight_key: str, key_set: set[str]) -> str | None:
    bias = (weight_key[: -len("in_proj_weight")] + "in_proj_bias" if weight_key.endswith("in_proj_weight")
            else weight_key[: -len("weight")] + "bias")
    return bias if bias in key_set else None


def _openclip(keys: list[str], prefix: str, lora_prefix: str, key_set: set[str], max_layers: int | None) -> list[Layer]:
    out = []
    for key in keys:
        if not key.startswith(prefix):
            continue
        m = _RESBLOCK.match(key[len(prefix):])
        if not m or (max_layers is not None and int(m.group(1)) >= max_layers):
            continue
        base = f"{lora_prefix}_text_model_encoder_layers_{m.group(1)}_"
        if m.group(2) == "attn.in_proj_weight":
            out += [Layer(base + leaf, key, _bias(key, key_set), (i, 3), "text_encoder", "te")
                    for i, leaf in enumerate(_QKV)]
        else:
            out.append(Layer(base + _OPENCLIP_LEAVES[m.group(2)[: -len(".weight")]], key, _bias(key, key_set), None,
                             "text_encoder", "te"))
    return out


def _clip(keys: list[str], prefix: str, lora_prefix: str, key_set: set[str]) -> list[Layer]:
    out = []
    for key in keys:
        if key.startswith(prefix) and (m := _CLIP_LAYER.match(key[len(prefix):])):
            name = f"{lora_prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"
            out.append(Layer(name, key, _bias(key, key_set), None, "text_encoder", "te"))
    return out


def _openclip_layers(keys: list[str], prefix: str) -> int:
    found = {int(m.group(1)) for k in keys if k.startswith(prefix)
             and (m := re.match(r"transformer\.resblocks\.(\d+)\.", k[len(prefix):]))}
    return len(found)


def family_layers(keys: Iterable[str], family: str, ndim: Callable[[str], int]) -> tuple[list[Layer], dict]:
    """(the Linear / Conv layers of an SD 2.x or SDXL checkpoint with their LoRA names, {alias name: Layer}).

    ndim(key) gives a tensor's rank (norm layers, rank 1, are left out). SD 2.x's text encoder is named for the
    23 layers sd-scripts builds (the last resblock is unused); aliases hold the diffusers-spelled SDXL U-Net names.
    """
    keys = list(keys)
    key_set = set(keys)
    layers: list[Layer] = []
    aliases: dict[str, Layer] = {}
    unet_keys = [k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".weight")
                 and ndim(k) >= 2]
    if family == "sdxl":
        for key in unet_keys:
            rest = key[len(UNET_PREFIX):]
            m = _SGM_SUB.match(rest)
            kind = _unet_kind(m.group(3)) if m else "other"
            layers.append(Layer("lora_unet_" + rest[: -len(".weight")].replace(".", "_"), key, _bias(key, key_set),
                                None, "unet", kind))
        blocks = {k[len(UNET_PREFIX):]: k for k in unet_keys
                  if k[len(UNET_PREFIX):].startswith(("input_blocks.", "middle_block.", "output_blocks."))
                  and not k[len(UNET_PREFIX):].startswith("input_blocks.0.")}
        by_key = {l.weight: l for l in layers}
        try:
            for diff, ldm in unet_ldm_to_diffusers(blocks).items():
                aliases["lora_unet_" + diff[: -len(".weight")].replace(".", "_")] = by_key[ldm]
        except ModelError:
            pass   # an unusual block layout: the sgm names still work
        layers += _clip(keys, SDXL_TE1, "lora_te1", key_set)
        layers += _openclip(keys, SDXL_TE2, "lora_te2", key_set, None)
    elif family == "sd2":
        ldm = {k[len(UNET_PREFIX):]: k for k in unet_keys}
        for diff, ldm_rest in unet_ldm_to_diffusers({k: k for k in ldm}).items():
            m = _SGM_SUB.match(ldm_rest)
            kind = _unet_kind(m.group(3)) if m else "other"
            key = ldm[ldm_rest]
            layers.append(Layer("lora_unet_" + diff[: -len(".weight")].replace(".", "_"), key, _bias(key, key_set),
                                None, "unet", kind))
        n = _openclip_layers(keys, SD2_TE)
        layers += _openclip(keys, SD2_TE, "lora_te", key_set, max(n - 1, 0))
    else:
        raise ValueError(f"family_layers handles sd2 / sdxl, not {family!r}")
    return layers, aliases


def preset_kinds(preset: str) -> set[str]:
    """networks.lora's module sets as checkpoint layer kinds (sd-scripts' class rule on SD-family U-Nets)."""
    if preset == "lierla":
        return {"attn", "te"}
    if preset == "c3lier":
        return {"attn", "res", "down", "up", "te"}
    raise ValueError(f"no checkpoint rule for preset {preset!r}")
