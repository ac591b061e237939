"""Architecture configs read from a state dict's shapes, plus each family's conventions where shapes say nothing.

Family detection (models/detect.py) works on the raw ldm keys; the configs here read the diffusers-layout keys.
Every size comes from a shape, so scaled-down models of any family load through the same code as full-size ones.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, ModelError
from .detect import detect_family  # noqa: F401  (re-exported: tools import it from here)

# SD1 conventions that the weights do not record.
SD1_UNET_HEADS = 8               # diffusers' SD1 config calls this attention_head_dim=8
SD1_TEXT_HEAD_WIDTH = 64
SD1_NORM_GROUPS = 32
SD1_LATENT_SCALE = 0.18215
SD1_UNET_SAMPLE_SIZE = 64        # 512 px / 8
SD1_VAE_SAMPLE_SIZE = 512
SD1_TEXT_ACT = "quick_gelu"
CLIP_BOS, CLIP_EOS = 49406, 49407
# SD 2.x / SDXL conventions: attention heads of width 64 everywhere (UNet and OpenCLIP), OpenCLIP's plain gelu.
HEAD_WIDTH = 64
OPENCLIP_TEXT_ACT = "gelu"
SDXL_LATENT_SCALE = 0.13025
SDXL_TIME_IDS = 6   # original h, w, crop top, left, target h, w: each a sinusoidal embedding in label_emb's input
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2_v": 768, "sdxl": 1024}

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
    family: str = "sd1"
    text_2: dict[str, Any] | None = None   # SDXL: CLIPTextConfig(**text_2) of CLIPTextModelWithProjection


Architecture = SD1Architecture


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


def _default_heads(channels, family: str) -> list[int]:
    """SD1: 8 heads per level. SD2 / SDXL: heads of width 64 (one head when a scaled-down level is narrower or
    not a multiple of 64)."""
    if family == "sd1":
        return [SD1_UNET_HEADS] * len(channels)
    return [c // HEAD_WIDTH if c >= HEAD_WIDTH and c % HEAD_WIDTH == 0 else 1 for c in channels]


def sd1_unet_config(unet: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *, family: str = "sd1",
                    pooled_dim: int | None = None) -> dict[str, Any]:
    """UNet2DConditionModel kwargs. SDXL (`pooled_dim` = the second text encoder's projection width) adds the
    text_time embedding whose input width label_emb records: pooled_dim + 6 x time-id embedding width."""
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

    heads = ov.get("num_heads")
    head_list = (_default_heads(channels, family) if heads is None else
                 list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(levels))
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
    has_label = "add_embedding.linear_1.weight" in unet
    if family == "sdxl" or has_label:
        if not (family == "sdxl" and has_label and pooled_dim):
            raise ModelError("only SDXL UNets have the size / pooled-text embedding (label_emb)")
        label_in = _shape(unet, "add_embedding.linear_1.weight", "UNet")[1]
        time_ids_width, rest = divmod(label_in - pooled_dim, SDXL_TIME_IDS)
        if rest or time_ids_width <= 0 or time_ids_width % 2:
            raise ModelError(f"the UNet's label_emb input width {label_in} is not the pooled text width "
                             f"{pooled_dim} + 6 x an even time-id embedding width")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_ids_width,
                   projection_class_embeddings_input_dim=label_in)
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


def openclip_text_config(te: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs of a converted OpenCLIP text tower (SD2 ViT-H, SDXL bigG): heads of width 64, gelu,
    pad id 0; projection_dim from text_projection when there is one."""
    cfg = sd1_text_config(te, {"text_hidden_act": OPENCLIP_TEXT_ACT, **dict(overrides or {})})
    hidden = cfg["hidden_size"]
    if "text_num_heads" not in (overrides or {}):
        heads = hidden // HEAD_WIDTH if hidden >= HEAD_WIDTH and hidden % HEAD_WIDTH == 0 else 1
        cfg["num_attention_heads"] = heads
    if "text_projection.weight" in te:
        proj_out, proj_in = _shape(te, "text_projection.weight", "text-encoder")
        if proj_in != hidden:
            raise ModelError(f"text_projection takes {proj_in} channels, the text encoder has {hidden}")
        cfg["projection_dim"] = proj_out
    cfg["pad_token_id"] = 0
    return cfg


def sd1_architecture(unet: Mapping[str, Any], vae: Mapping[str, Any], te: Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None, *, family: str = "sd1",
                     te2: Mapping[str, Any] | None = None) -> SD1Architecture:
    """Configs of every module. family "sd2": `te` is the converted OpenCLIP ViT-H; "sdxl": `te` CLIP-L and
    `te2` the converted bigG (with text_projection)."""
    ov = check_overrides(overrides)
    if family not in ("sd1", "sd2", "sdxl"):
        raise ModelError(f"unknown model family {family!r}")
    text = openclip_text_config(te, ov) if family == "sd2" else sd1_text_config(te, ov)
    text_2 = openclip_text_config(te2, ov) if family == "sdxl" else None
    if (family == "sdxl") != (te2 is not None):
        raise ModelError("SDXL has two text encoders; the other families one")
    if text_2 is not None and "text_projection.weight" not in te2:
        raise ModelError("the SDXL second text encoder has no text_projection")
    default_scale = SDXL_LATENT_SCALE if family == "sdxl" else SD1_LATENT_SCALE
    ov.setdefault("latent_scale", default_scale)
    if family != "sd1":
        native = NATIVE_RESOLUTION["sdxl" if family == "sdxl" else
                                   "sd2_v" if ov.get("prediction_type") == "v_prediction" else "sd2"]
        ov.setdefault("sample_size", native // 8)
    arch = SD1Architecture(unet=sd1_unet_config(unet, ov, family=family,
                                                pooled_dim=text_2["projection_dim"] if text_2 else None),
                           vae=sd1_vae_config(vae, ov), text=text, text_2=text_2, family=family,
                           prediction_type=ov.get("prediction_type", "epsilon"),
                           latent_scale=float(ov["latent_scale"]))
    context = text["hidden_size"] + (text_2["hidden_size"] if text_2 else 0)
    if arch.unet["cross_attention_dim"] != context:
        what = "the two text encoders' widths together" if text_2 else "the text encoder width"
        raise ModelError(f"UNet cross-attention width {arch.unet['cross_attention_dim']} does not match "
                         f"{what} ({context})")
    if arch.unet["in_channels"] != arch.vae["latent_channels"]:
        raise ModelError(f"UNet input channels {arch.unet['in_channels']} do not fit the VAE latent channels "
                         f"{arch.vae['latent_channels']}")
    return arch
