"""Architecture configs read from a state dict's shapes, plus SD1's conventions where shapes say nothing.

Family detection works on the raw ldm keys. Everything that assumes SD1 lives in functions named `sd1_*`, so
SD2 / SDXL can get their own next to them.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, ModelError
from .convert import TE_PREFIX, UNET_PREFIX

# SD1 conventions that the weights do not record.
SD1_UNET_HEADS = 8               # diffusers' SD1 config calls this attention_head_dim=8
SD1_TEXT_HEAD_WIDTH = 64
SD1_NORM_GROUPS = 32
SD1_LATENT_SCALE = 0.18215
SD1_UNET_SAMPLE_SIZE = 64        # 512 px / 8
SD1_VAE_SAMPLE_SIZE = 512
SD1_TEXT_ACT = "quick_gelu"
CLIP_BOS, CLIP_EOS = 49406, 49407

OVERRIDE_KEYS = {
    "prediction_type": "epsilon | v_prediction",
    "num_heads": "UNet attention heads (int, or one per level)",
    "text_num_heads": "text-encoder attention heads",
    "latent_scale": "VAE latent scaling factor",
    "norm_num_groups": "UNet GroupNorm groups",
    "vae_norm_num_groups": "VAE GroupNorm groups",
    "sample_size": "UNet sample size (latent pixels)",
    "vae_sample_size": "VAE sample size (pixels)",
    "upcast_attention": "upcast UNet attention to float32",
    "text_hidden_act": "text-encoder activation",
}


@dataclass
class SD1Architecture:
    unet: dict[str, Any]            # UNet2DConditionModel(**unet)
    vae: dict[str, Any]             # AutoencoderKL(**vae)
    text: dict[str, Any]            # CLIPTextConfig(**text)
    prediction_type: str = "epsilon"
    latent_scale: float = SD1_LATENT_SCALE
    notes: list[str] = field(default_factory=list)


def check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    ov = dict(overrides or {})
    for key in ov:
        if key not in OVERRIDE_KEYS:
            close = difflib.get_close_matches(key, list(OVERRIDE_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(OVERRIDE_KEYS)}"
            raise ConfigError(f"unknown model override '{key}'{hint}")
    pt = ov.get("prediction_type")
    if pt is not None and pt not in ("epsilon", "v_prediction"):
        raise ConfigError(f"model override prediction_type must be 'epsilon' or 'v_prediction', not {pt!r}")
    return ov


# ---------------------------------------------------------------- family detection (ldm keys)

def detect_family(sd: Mapping[str, Any]) -> str:
    """'sd1', or a ModelError saying what the file is instead."""
    keys = list(sd)
    if not keys:
        raise ModelError("the checkpoint is empty")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        raise ModelError("this is a LoRA / LyCORIS file, not a base model checkpoint")
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in keys):
        raise ModelError("this is an SDXL checkpoint; SDXL support comes in a later release (SD1 only for now)")
    if any(k.startswith(UNET_PREFIX + s) for k in keys for s in ("joint_blocks.", "double_blocks.")):
        raise ModelError("this checkpoint is not Stable Diffusion 1.x (SD3 / Flux-style blocks); only SD1 is supported")
    if any(k.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for k in keys):
        raise ModelError("the keys are in the diffusers layout; load a single-file (ldm/CompVis) SD1 checkpoint")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in sd:
        raise ModelError("no model.diffusion_model.input_blocks.* weights: not a Stable Diffusion 1.x checkpoint")
    ctx = _context_dim(sd)
    if any(k.startswith("cond_stage_model.model.") for k in keys) or ctx == 1024:
        raise ModelError("this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); SD2 support comes "
                         "in a later release (SD1 only for now)")
    if ctx == 2048:
        raise ModelError("this looks like an SDXL UNet (context 2048); SDXL support comes in a later release")
    if not any(k.startswith(TE_PREFIX) for k in keys):
        raise ModelError("no cond_stage_model.transformer.* (CLIP text encoder) weights: not a complete SD1 "
                         "checkpoint")
    return "sd1"


def _context_dim(sd: Mapping[str, Any]) -> int | None:
    for k, t in sd.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return int(t.shape[1])
    return None


# ---------------------------------------------------------------- SD1 configs (diffusers-layout keys)

def _indices(keys, pattern: str) -> list[int]:
    pat = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _shape(sd: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in sd:
        raise ModelError(f"missing {what} weight '{key}' (not an SD1-shaped model?)")
    return tuple(sd[key].shape)


def _groups_fit(groups: int, channels, what: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ModelError(f"{what} channels {bad} are not divisible by {groups} GroupNorm groups; "
                         f"set the override for the group count")


def sd1_unet_config(unet: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    ov = dict(overrides or {})
    levels = _indices(unet, r"down_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ModelError(f"the UNet's down blocks are not numbered 0..n ({levels})")
    channels = tuple(_shape(unet, f"down_blocks.{l}.resnets.0.conv1.weight", "UNet")[0] for l in levels)
    per_level = [len(_indices(unet, rf"down_blocks\.{l}\.resnets\.(\d+)\.")) for l in levels]
    if len(set(per_level)) != 1:
        raise ModelError(f"the UNet levels have different resnet counts {per_level}; not supported")
    layers = per_level[0]
    up_levels = _indices(unet, r"up_blocks\.(\d+)\.")
    up_res = [len(_indices(unet, rf"up_blocks\.{l}\.resnets\.(\d+)\.")) for l in up_levels]
    if len(up_levels) != len(levels) or set(up_res) != {layers + 1}:
        raise ModelError(f"the UNet's up blocks {up_res} do not mirror its down blocks ({len(levels)} x {layers})")

    def depth(block: str) -> int:
        return len(_indices(unet, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))

    down_attn = [depth(f"down_blocks.{l}.attentions.0") for l in levels]
    up_attn = [depth(f"up_blocks.{l}.attentions.0") for l in up_levels]
    mid_depth = depth("mid_block.attentions.0")
    if not mid_depth:
        raise ModelError("the UNet mid block has no attention; SD1 always has one")
    if up_attn != down_attn[::-1]:
        raise ModelError(f"UNet attention depths down {down_attn} / up {up_attn} are not symmetric; not supported")
    if down_attn[-1] and down_attn[-1] != mid_depth:
        raise ModelError("the deepest UNet level and the mid block have different transformer depths")
    # diffusers reads the mid block's depth from the last entry; entries of levels without attention are unused
    tlpb = [d or mid_depth for d in down_attn]
    attn_key = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelError("the UNet has no cross-attention layers")
    proj_in = next(k for k in unet if k.endswith("proj_in.weight"))

    heads = ov.get("num_heads", SD1_UNET_HEADS)
    head_list = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(levels)
    if len(head_list) != len(levels):
        raise ModelError(f"num_heads override has {len(head_list)} entries for {len(levels)} UNet levels")
    for c, h, d in zip(channels, head_list, down_attn):
        if d and c % int(h):
            raise ModelError(f"UNet attention width {c} is not divisible by {h} heads; set num_heads")
    groups = int(ov.get("norm_num_groups", SD1_NORM_GROUPS))
    _groups_fit(groups, channels, "UNet")

    cfg: dict[str, Any] = dict(
        sample_size=int(ov.get("sample_size", SD1_UNET_SAMPLE_SIZE)),
        in_channels=_shape(unet, "conv_in.weight", "UNet")[1],
        out_channels=_shape(unet, "conv_out.weight", "UNet")[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_attn),
        block_out_channels=channels,
        layers_per_block=layers,
        cross_attention_dim=int(unet[attn_key].shape[1]),
        transformer_layers_per_block=tlpb[0] if len(set(tlpb)) == 1 else tuple(tlpb),
        attention_head_dim=head_list[0] if len(set(head_list)) == 1 else tuple(int(h) for h in head_list),
        use_linear_projection=len(unet[proj_in].shape) == 2,
        norm_num_groups=groups,
        upcast_attention=bool(ov.get("upcast_attention", False)),
    )
    time_dim = _shape(unet, "time_embedding.linear_1.weight", "UNet")[0]
    if time_dim != 4 * channels[0]:
        cfg["time_embedding_dim"] = time_dim
    return cfg


def sd1_vae_config(vae: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    ov = dict(overrides or {})
    levels = _indices(vae, r"encoder\.down_blocks\.(\d+)\.")
    if not levels:
        raise ModelError("the VAE has no encoder down blocks")
    channels = tuple(_shape(vae, f"encoder.down_blocks.{l}.resnets.0.conv1.weight", "VAE")[0] for l in levels)
    per_level = [len(_indices(vae, rf"encoder\.down_blocks\.{l}\.resnets\.(\d+)\.")) for l in levels]
    up_res = [len(_indices(vae, rf"decoder\.up_blocks\.{l}\.resnets\.(\d+)\."))
              for l in _indices(vae, r"decoder\.up_blocks\.(\d+)\.")]
    if len(set(per_level)) != 1 or set(up_res) != {per_level[0] + 1} or len(up_res) != len(levels):
        raise ModelError(f"unsupported VAE layout: encoder resnets {per_level}, decoder resnets {up_res}")
    groups = int(ov.get("vae_norm_num_groups", SD1_NORM_GROUPS))
    _groups_fit(groups, channels, "VAE")
    cfg: dict[str, Any] = dict(
        in_channels=_shape(vae, "encoder.conv_in.weight", "VAE")[1],
        out_channels=_shape(vae, "decoder.conv_out.weight", "VAE")[0],
        down_block_types=("DownEncoderBlock2D",) * len(levels),
        up_block_types=("UpDecoderBlock2D",) * len(levels),
        block_out_channels=channels,
        layers_per_block=per_level[0],
        latent_channels=_shape(vae, "decoder.conv_in.weight", "VAE")[1],
        norm_num_groups=groups,
        sample_size=int(ov.get("vae_sample_size", SD1_VAE_SAMPLE_SIZE)),
        scaling_factor=float(ov.get("latent_scale", SD1_LATENT_SCALE)),
    )
    # Only named when they differ from the default, so both diffusers versions see the same arguments.
    if not any(k.startswith("encoder.mid_block.attentions.0.") for k in vae):
        cfg["mid_block_add_attention"] = False
    if "quant_conv.weight" not in vae:
        cfg["use_quant_conv"] = False
    if "post_quant_conv.weight" not in vae:
        cfg["use_post_quant_conv"] = False
    return cfg


def sd1_text_config(te: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs from `text_model.*` keys (OpenAI CLIP ViT-L/14 text tower, scaled by shapes)."""
    ov = dict(overrides or {})
    vocab, hidden = _shape(te, "text_model.embeddings.token_embedding.weight", "text-encoder")
    positions = _shape(te, "text_model.embeddings.position_embedding.weight", "text-encoder")[0]
    layers = len(_indices(te, r"text_model\.encoder\.layers\.(\d+)\."))
    if not layers:
        raise ModelError("the text encoder has no transformer layers")
    intermediate = _shape(te, "text_model.encoder.layers.0.mlp.fc1.weight", "text-encoder")[0]
    heads = int(ov.get("text_num_heads", max(1, hidden // SD1_TEXT_HEAD_WIDTH)))
    if hidden % heads:
        raise ModelError(f"text-encoder width {hidden} is not divisible by {heads} heads; set text_num_heads")
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=positions, projection_dim=hidden,
                hidden_act=ov.get("text_hidden_act", SD1_TEXT_ACT), layer_norm_eps=1e-5,
                bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS)


def sd1_architecture(unet: Mapping[str, Any], vae: Mapping[str, Any], te: Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None) -> SD1Architecture:
    ov = check_overrides(overrides)
    arch = SD1Architecture(unet=sd1_unet_config(unet, ov), vae=sd1_vae_config(vae, ov),
                           text=sd1_text_config(te, ov),
                           prediction_type=ov.get("prediction_type", "epsilon"),
                           latent_scale=float(ov.get("latent_scale", SD1_LATENT_SCALE)))
    if arch.unet["cross_attention_dim"] != arch.text["hidden_size"]:
        raise ModelError(f"UNet cross-attention width {arch.unet['cross_attention_dim']} does not match the "
                         f"text encoder width {arch.text['hidden_size']}")
    if arch.unet["in_channels"] not in (arch.vae["latent_channels"], 8, 9):   # 8 / 9: pix2pix / inpainting
        raise ModelError(f"UNet input channels {arch.unet['in_channels']} do not fit the VAE latent channels "
                         f"{arch.vae['latent_channels']}")
    return arch
