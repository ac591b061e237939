"""Tiny SD 1.x / SD 2.x / SDXL-shaped checkpoints with random weights, in the original ldm / sgm layouts (fused
OpenCLIP q/k/v, label_emb, conditioner.embedders.*), for tests and demos.

The modules are instantiated on the meta device only to learn the parameter names, shapes and layer types;
every tensor is then drawn here from one seeded generator in sorted key order, so the same seed gives the same
weights in both supported library stacks. Nothing is zero-initialised (diffusers zeroes output convs and
proj_out), so the UNet output depends on the prompt from the start.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..errors import ModelError
from .ckpt import save_checkpoint
from .convert import SDXL_TE1_PREFIX, TE_PREFIX, diffusers_to_ldm
from .detect import V_PRED_KEY

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class TinySizes:
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    unet_attention: tuple[bool, ...] | None = None   # default as SD1: every level but the deepest
    unet_layers: int = 2
    transformer_depth: int | tuple[int, ...] = 1     # one for all levels, or one per level (SDXL: 0 / 2 / 10)
    use_linear_projection: bool = False
    in_channels: int = 4
    text_hidden: int = 32              # the (first) text encoder's width
    text_layers: int = 2               # as stored in the file (SD2: the loader drops the last one)
    text_intermediate: int = 64
    vocab_size: int = 49408
    max_positions: int = 77
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers: int = 1
    latent_channels: int = 4
    norm_groups: int = 32
    # SDXL's second text encoder (OpenCLIP bigG) and size conditioning
    text_hidden_2: int = 64
    text_layers_2: int = 3
    text_intermediate_2: int = 128
    projection_dim: int = 32           # bigG text_projection width (the pooled embedding)
    time_ids_dim: int = 8              # per size / crop number (256 in SDXL)

    def attention_levels(self) -> tuple[bool, ...]:
        if self.unet_attention is not None:
            return tuple(bool(a) for a in self.unet_attention)
        n = len(self.unet_channels)
        return (True,) if n == 1 else (True,) * (n - 1) + (False,)


# Structural defaults per family: SD2 = SD1 with linear projections and OpenCLIP (gelu); SDXL = 3 levels,
# no attention at the first, deeper transformers further down, two text encoders.
_FAMILY_DEFAULTS = {
    "sd1": {},
    "sd2": dict(use_linear_projection=True, text_layers=3),
    "sdxl": dict(unet_channels=(32, 64, 64), unet_attention=(False, True, True), transformer_depth=(1, 1, 2),
                 use_linear_projection=True, vae_channels=(32, 32, 32)),
}


def tiny_sizes(family: str = "sd1", **sizes) -> TinySizes:
    if family not in FAMILIES:
        raise ModelError(f"unknown tiny model family {family!r}; expected one of {FAMILIES}")
    names = {f.name for f in fields(TinySizes)}
    unknown = sorted(set(sizes) - names)
    if unknown:
        raise ModelError(f"unknown tiny model size(s) {unknown}; known: {sorted(names)}")
    given = {**_FAMILY_DEFAULTS[family], **sizes}
    s = replace(TinySizes(), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items()})
    attn = s.attention_levels()
    if len(attn) != len(s.unet_channels):
        raise ModelError(f"unet_attention has {len(attn)} entries for {len(s.unet_channels)} UNet levels")
    if isinstance(s.transformer_depth, tuple) and len(s.transformer_depth) != len(s.unet_channels):
        raise ModelError(f"transformer_depth has {len(s.transformer_depth)} entries for {len(s.unet_channels)} "
                         f"UNet levels")
    for what, chans in (("unet_channels", s.unet_channels), ("vae_channels", s.vae_channels)):
        if any(c % s.norm_groups for c in chans):
            raise ModelError(f"{what} {chans} must be multiples of norm_groups={s.norm_groups}")
    return s


def tiny_module_configs(s: TinySizes, family: str = "sd1") -> tuple[dict, dict, dict]:
    """diffusers UNet / VAE kwargs and CLIPTextConfig kwargs for the tiny sizes (heads do not change shapes)."""
    attn = s.attention_levels()
    context = s.text_hidden + (s.text_hidden_2 if family == "sdxl" else 0)
    unet = dict(sample_size=64, in_channels=s.in_channels, out_channels=s.latent_channels,
                block_out_channels=tuple(s.unet_channels), layers_per_block=s.unet_layers,
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                cross_attention_dim=context, transformer_layers_per_block=s.transformer_depth,
                attention_head_dim=1, use_linear_projection=s.use_linear_projection, norm_num_groups=s.norm_groups)
    if family == "sdxl":
        unet.update(addition_embed_type="text_time", addition_time_embed_dim=s.time_ids_dim,
                    projection_class_embeddings_input_dim=s.projection_dim + 6 * s.time_ids_dim)
    n = len(s.vae_channels)
    vae = dict(in_channels=3, out_channels=3, block_out_channels=tuple(s.vae_channels), layers_per_block=s.vae_layers,
               down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
               latent_channels=s.latent_channels, norm_num_groups=s.norm_groups, sample_size=64)
    text = dict(vocab_size=s.vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=1, max_position_embeddings=s.max_positions,
                hidden_act="gelu" if family == "sd2" else "quick_gelu")
    return unet, vae, text


def _text_2_config(s: TinySizes) -> dict:
    return dict(vocab_size=s.vocab_size, hidden_size=s.text_hidden_2, intermediate_size=s.text_intermediate_2,
                num_hidden_layers=s.text_layers_2, num_attention_heads=1, max_position_embeddings=s.max_positions,
                hidden_act="gelu", projection_dim=s.projection_dim)


def _param_kinds(module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{state-dict key: (layer kind, shape)} of a module built on the meta device."""
    kinds = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                kind = "norm"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "position" if "position" in mod_name else "embedding"
            else:
                kind = "dense"
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = (f"{kind}.{p_name}", tuple(p.shape))
    return kinds


def _draw(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "norm.weight":
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if kind == "norm.bias":
        return 0.05 * torch.randn(shape, generator=gen)
    if kind.startswith("embedding."):
        return 0.02 * torch.randn(shape, generator=gen)
    if kind.startswith("position."):
        return 0.01 * torch.randn(shape, generator=gen)
    # dense weights and biases: PyTorch's default uniform(+-1/sqrt(fan_in)); biases share their weight's fan_in
    return torch.rand(shape, generator=gen) * 2.0 - 1.0


def _module_tensors(module, seed: int, salt: int, rename=lambda k: k) -> dict[str, torch.Tensor]:
    kinds = {rename(k): v for k, v in _param_kinds(module).items()}
    gen = torch.Generator().manual_seed(seed * 1000 + salt)
    out = {}
    for key in sorted(kinds):
        kind, shape = kinds[key]
        t = _draw(kind, shape, gen)
        if kind.startswith("dense."):
            weight_key = key[: -len("bias")] + "weight" if key.endswith(".bias") else key
            w_shape = kinds[weight_key][1] if weight_key in kinds else shape
            fan_in = math.prod(w_shape[1:]) if len(w_shape) > 1 else w_shape[0]
            t = t / math.sqrt(fan_in)
        out[key] = t.contiguous()
    return out


def tiny_sd1_state_dict(seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """An SD1-shaped ldm state dict (float32, random weights). Sizes: see TinySizes."""
    return _tiny_state_dict("sd1", seed, sizes)


def tiny_sd2_state_dict(seed: int = 0, v_pred: bool = False, **sizes) -> dict[str, torch.Tensor]:
    """An SD 2.x-shaped ldm state dict: linear projections, OpenCLIP text tower under cond_stage_model.model.*
    (fused in_proj, text_projection; `text_layers` resblocks, the last of which the loader drops). `v_pred` adds
    the v_pred marker key of v-prediction files."""
    sd = _tiny_state_dict("sd2", seed, sizes)
    if v_pred:
        sd[V_PRED_KEY] = torch.zeros(0)
    return sd


def tiny_sdxl_state_dict(seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """An SDXL-shaped sgm state dict: label_emb, CLIP-L under conditioner.embedders.0.transformer.*, OpenCLIP
    bigG (fused in_proj, text_projection) under conditioner.embedders.1.model.*."""
    return _tiny_state_dict("sdxl", seed, sizes)


def _tiny_state_dict(family: str, seed: int, sizes: dict) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    s = tiny_sizes(family, **sizes)
    unet_cfg, vae_cfg, text_cfg = tiny_module_configs(s, family)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        te = CLIPTextModel(CLIPTextConfig(**text_cfg))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**_text_2_config(s))) if family == "sdxl" else None
    to_text_model = (lambda k: k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k)
    unet_sd = _module_tensors(unet, seed, 1)
    vae_sd = _module_tensors(vae, seed, 2)
    te_sd = _module_tensors(te, seed, 3, rename=to_text_model)
    te2_sd = _module_tensors(te2, seed, 4, rename=to_text_model) if te2 is not None else None
    sd = diffusers_to_ldm(unet_sd, vae_sd, te_sd, family=family, te2_sd=te2_sd)
    if family == "sd2":   # the OpenCLIP tower carries a projection that SD2 does not use
        gen = torch.Generator().manual_seed(seed * 1000 + 5)
        sd["cond_stage_model.model.text_projection"] = torch.randn(s.text_hidden, s.text_hidden,
                                                                   generator=gen) / math.sqrt(s.text_hidden)
    else:   # real SD1 / SDXL files carry CLIP-L's (int64) position ids; keep that so loaders are tested against it
        prefix = SDXL_TE1_PREFIX if family == "sdxl" else TE_PREFIX
        sd[prefix + "text_model.embeddings.position_ids"] = torch.arange(s.max_positions).unsqueeze(0)
    return sd


def tiny_state_dict(family: str = "sd1", seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """tiny_sd1/sd2/sdxl_state_dict by family name (`v_pred=True` only for sd2)."""
    if family == "sd2":
        return tiny_sd2_state_dict(seed, **sizes)
    if "v_pred" in sizes:
        raise ModelError("v_pred is a tiny SD 2.x option")
    return _tiny_state_dict(family, seed, sizes)


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False, family: str = "sd1",
                          **sizes):
    """Write tiny_state_dict(family, seed, **sizes) as a .safetensors file; returns the path."""
    v_pred = bool(sizes.get("v_pred", False))
    shape_sizes = {k: v for k, v in sizes.items() if k != "v_pred"}
    meta = {"lib_lora_train.tiny": "1", "lib_lora_train.tiny_seed": str(seed), "lib_lora_train.tiny_family": family,
            "lib_lora_train.tiny_sizes": repr(asdict(tiny_sizes(family, **shape_sizes)))}
    if v_pred:
        meta["lib_lora_train.tiny_v_pred"] = "1"
    return save_checkpoint(path, tiny_state_dict(family, seed, **sizes), meta, overwrite=overwrite)
