"""State-dict key conversion between the CompVis/ldm (SD 1.x / 2.x) or sgm (SDXL) single-file layout and
diffusers/transformers.

The block layout is read from the keys themselves (how many resnets per level, where the attentions and the
down/upsamplers sit), so scaled-down SD1-family models convert as well as full-size ones. Tensors are never
copied: conversion renames keys, and the VAE mid-block attention 1x1 convs become Linear weights by a reshape
(a view of the same storage).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."                    # OpenCLIP ViT-H (SD 2.x)
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."     # CLIP-L in the transformers layout
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."           # OpenCLIP bigG
EMA_PREFIX = "model_ema."

_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_TE_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")

# Leaf renames inside one block, ldm name -> diffusers name. Kinds without a table keep their leaf names.
_LEAVES: dict[str, dict[str, str]] = {
    "unet_res": {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"},
    "vae_res": {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"},
    "vae_attn": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
    "down_op": {"op": "conv"},
}
_LEAVES_BACK = {kind: {d: l for l, d in table.items()} for kind, table in _LEAVES.items()}


@dataclass(frozen=True)
class _Module:
    ldm: str        # module path in the ldm layout (without the model prefix)
    diffusers: str  # the same module in diffusers
    kind: str       # "same" or a key of _LEAVES


@dataclass
class LdmParts:
    """An ldm checkpoint split by model; keys of unet/vae/text_encoder have their ldm prefix removed."""
    unet: dict[str, torch.Tensor] = field(default_factory=dict)
    vae: dict[str, torch.Tensor] = field(default_factory=dict)
    text_encoder: dict[str, torch.Tensor] = field(default_factory=dict)   # in the `text_model.*` layout
    open_clip: dict[str, torch.Tensor] = field(default_factory=dict)      # SD2 / SDXL bigG, OpenCLIP keys
    ema: dict[str, torch.Tensor] = field(default_factory=dict)            # full keys, model_ema.*
    other: dict[str, torch.Tensor] = field(default_factory=dict)          # full keys (alphas_cumprod, betas, ...)
    legacy_te_layout: bool = False   # the file had cond_stage_model.transformer.* without text_model


def split_ldm(sd: Mapping[str, torch.Tensor]) -> LdmParts:
    """Split by model on the key names only (values are passed through untouched). The CLIP-L text encoder is
    read from cond_stage_model.transformer.* (SD1) or conditioner.embedders.0.transformer.* (SDXL), the OpenCLIP
    one from cond_stage_model.model.* (SD2) or conditioner.embedders.1.model.* (SDXL)."""
    parts = LdmParts()
    te_flat = te_nested = 0
    te_prefix = SDXL_TE1_PREFIX if any(k.startswith(SDXL_TE1_PREFIX) for k in sd) else TE_PREFIX
    oc_prefixes = [p for p in (SD2_TE_PREFIX, SDXL_TE2_PREFIX) if any(k.startswith(p) for k in sd)]
    if len(oc_prefixes) > 1:
        raise ModelError("the checkpoint holds both cond_stage_model.model.* (SD 2.x) and conditioner.embedders.* "
                         "(SDXL) text encoders; it is damaged or a mix of two models")
    for key, t in sd.items():
        if key.startswith(UNET_PREFIX):
            parts.unet[key[len(UNET_PREFIX):]] = t
        elif key.startswith(VAE_PREFIX) and key[len(VAE_PREFIX):].startswith(_VAE_PARTS):
            parts.vae[key[len(VAE_PREFIX):]] = t
        elif key.startswith(te_prefix + "text_model."):
            parts.text_encoder[key[len(te_prefix):]] = t
            te_nested += 1
        elif key.startswith(te_prefix) and key[len(te_prefix):].startswith(_TE_PARTS):
            parts.text_encoder["text_model." + key[len(te_prefix):]] = t
            te_flat += 1
        elif oc_prefixes and key.startswith(oc_prefixes[0]):
            parts.open_clip[key[len(oc_prefixes[0]):]] = t
        elif key.startswith(EMA_PREFIX):
            parts.ema[key] = t
        else:
            parts.other[key] = t
    if te_flat and te_nested:
        raise ModelError("the text encoder keys mix cond_stage_model.transformer.text_model.* and "
                         "cond_stage_model.transformer.* (without text_model); the checkpoint is damaged")
    parts.legacy_te_layout = te_flat > 0
    return parts


_FAMILY_LABEL = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def require_complete(parts: LdmParts, family: str = "sd1") -> LdmParts:
    text = {"sd1": [("text encoder (cond_stage_model.transformer.*)", parts.text_encoder)],
            "sd2": [("text encoder (cond_stage_model.model.*)", parts.open_clip)],
            "sdxl": [("first text encoder (conditioner.embedders.0.transformer.*)", parts.text_encoder),
                     ("second text encoder (conditioner.embedders.1.model.*)", parts.open_clip)]}[family]
    for name, part in [("UNet (model.diffusion_model.*)", parts.unet), ("VAE (first_stage_model.*)", parts.vae),
                       *text]:
        if not part:
            raise ModelError(f"the checkpoint has no {name} weights; it is not a complete "
                             f"{_FAMILY_LABEL[family]} checkpoint")
    return parts


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(unet_sd, vae_sd, te_sd) in diffusers / transformers `text_model.*` keys. EMA and other keys are left
    out; `split_ldm(sd).ema / .other` hold them."""
    parts = require_complete(split_ldm(sd))
    return unet_ldm_to_diffusers(parts.unet), vae_ldm_to_diffusers(parts.vae), dict(parts.text_encoder)


def diffusers_to_ldm(unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
                     te_sd: Mapping[str, torch.Tensor], *, extra: Mapping[str, torch.Tensor] | None = None,
                     legacy_te_layout: bool = False, family: str = "sd1",
                     te2_sd: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One ldm (sgm for SDXL) state dict. `extra` (e.g. LdmParts.other / .ema) is added unchanged;
    `legacy_te_layout` writes an SD1 text encoder as cond_stage_model.transformer.* without the text_model level.
    family "sd2": `te_sd` goes to cond_stage_model.model.* in the OpenCLIP layout (the layer the loader dropped
    is in `extra` when it came from split_ldm(...).other); "sdxl": `te_sd` is CLIP-L, `te2_sd` bigG."""
    from .openclip import transformers_to_openclip

    if family not in _FAMILY_LABEL:
        raise ModelError(f"unknown model family {family!r}; expected one of {sorted(_FAMILY_LABEL)}")
    if (te2_sd is not None) != (family == "sdxl"):
        raise ModelError("te2_sd is given for SDXL (its second text encoder) and only for SDXL")
    out: dict[str, torch.Tensor] = {}
    for k, t in unet_diffusers_to_ldm(unet_sd).items():
        out[UNET_PREFIX + k] = t
    for k, t in vae_diffusers_to_ldm(vae_sd).items():
        out[VAE_PREFIX + k] = t
    if family == "sd2":
        out.update({SD2_TE_PREFIX + k: t for k, t in transformers_to_openclip(te_sd).items()})
    else:
        prefix = SDXL_TE1_PREFIX if family == "sdxl" else TE_PREFIX
        for k, t in te_to_text_model_layout(te_sd).items():
            out[prefix + (k[len("text_model."):] if legacy_te_layout else k)] = t
    if te2_sd is not None:
        out.update({SDXL_TE2_PREFIX + k: t for k, t in transformers_to_openclip(te2_sd).items()})
    for k, t in (extra or {}).items():
        if k in out:
            raise ModelError(f"extra key '{k}' collides with a converted model key")
        out[k] = t
    return out


def te_to_text_model_layout(te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text-encoder keys with the `text_model.` level (transformers >= 5.6 may save them without it);
    `text_projection.*` (CLIPTextModelWithProjection) stays at the top."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): t
            for k, t in te_sd.items()}


def te_for_model(te_sd: Mapping[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """`text_model.*` keys renamed to what a CLIPTextModel instance holds: transformers >= 5.6 flattened the
    class (no `.text_model` level); older versions keep it. Decided from the model's own state-dict keys."""
    nested = any(k.startswith("text_model.") for k in model_keys)
    sd = te_to_text_model_layout(te_sd)
    if nested:
        return sd
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): t for k, t in sd.items()}


# ---------------------------------------------------------------- UNet

_UNET_TOP = (_Module("time_embed.0", "time_embedding.linear_1", "same"),
             _Module("time_embed.2", "time_embedding.linear_2", "same"),
             _Module("input_blocks.0.0", "conv_in", "same"),
             _Module("out.0", "conv_norm_out", "same"),
             _Module("out.2", "conv_out", "same"),
             _Module("label_emb.0.0", "add_embedding.linear_1", "same"),    # SDXL's size / pooled-text embedding
             _Module("label_emb.0.2", "add_embedding.linear_2", "same"))


def _ldm_submodule_kinds(keys, block: str) -> dict[int, str]:
    """{sub index: kind} of the modules inside one ldm block (e.g. 'input_blocks.4')."""
    kinds: dict[int, str] = {}
    pat = re.compile(re.escape(block) + r"\.(\d+)\.([^.]+)")
    for k in keys:
        m = pat.match(k)
        if not m:
            continue
        leaf = m.group(2)
        kind = ("res" if leaf in ("in_layers", "emb_layers", "out_layers", "skip_connection") else
                "attn" if leaf in ("norm", "proj_in", "proj_out", "transformer_blocks") else
                "down" if leaf == "op" else "up" if leaf == "conv" else None)
        if kind is None:
            raise ModelError(f"unexpected UNet key in the ldm layout: model.diffusion_model.{k}")
        kinds[int(m.group(1))] = kind
    return kinds


def _indices(keys, pattern: str) -> list[int]:
    pat = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _unet_modules_from_ldm(keys) -> list[_Module]:
    mods = list(_UNET_TOP)
    level, j = 0, 0
    for i in _indices(keys, r"input_blocks\.(\d+)\."):
        if i == 0:
            continue
        kinds = _ldm_submodule_kinds(keys, f"input_blocks.{i}")
        if kinds.get(0) == "down":
            mods.append(_Module(f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", "down_op"))
            level, j = level + 1, 0
            continue
        mods += _res_attn(f"input_blocks.{i}", kinds, f"down_blocks.{level}", j)
        j += 1
    kinds = _ldm_submodule_kinds(keys, "middle_block")
    n_res = n_attn = 0
    for s in sorted(kinds):
        if kinds[s] == "res":
            mods.append(_Module(f"middle_block.{s}", f"mid_block.resnets.{n_res}", "unet_res"))
            n_res += 1
        elif kinds[s] == "attn":
            mods.append(_Module(f"middle_block.{s}", f"mid_block.attentions.{n_attn}", "same"))
            n_attn += 1
    level, j = 0, 0
    for i in _indices(keys, r"output_blocks\.(\d+)\."):
        kinds = _ldm_submodule_kinds(keys, f"output_blocks.{i}")
        mods += _res_attn(f"output_blocks.{i}", kinds, f"up_blocks.{level}", j)
        ups = [s for s, kind in kinds.items() if kind == "up"]
        if ups:
            mods.append(_Module(f"output_blocks.{i}.{ups[0]}", f"up_blocks.{level}.upsamplers.0", "same"))
            level, j = level + 1, 0
        else:
            j += 1
    return mods


def _res_attn(ldm_block: str, kinds: dict[int, str], diff_block: str, j: int) -> list[_Module]:
    if kinds.get(0) != "res":
        raise ModelError(f"expected a resnet at model.diffusion_model.{ldm_block}.0")
    mods = [_Module(f"{ldm_block}.0", f"{diff_block}.resnets.{j}", "unet_res")]
    if kinds.get(1) == "attn":
        mods.append(_Module(f"{ldm_block}.1", f"{diff_block}.attentions.{j}", "same"))
    return mods


def _require_whole_unet(keys) -> None:
    """The ldm block numbers count every resnet, attention and sampler before a module, so a partial key set
    (e.g. only the attention layers a LoRA adapts) would be numbered wrongly: refuse it instead."""
    problems = []
    for side, sampler in (("down_blocks", "downsamplers"), ("up_blocks", "upsamplers")):
        levels = _indices(keys, side + r"\.(\d+)\.")
        if levels != list(range(len(levels))):
            problems.append(f"{side} {levels} are not 0..n")
        for level in levels:
            blk = re.escape(f"{side}.{level}")
            res = _indices(keys, blk + r"\.resnets\.(\d+)\.")
            attn = _indices(keys, blk + r"\.attentions\.(\d+)\.")
            if not res or res != list(range(len(res))) or not set(attn) <= set(res):
                problems.append(f"{side}.{level} resnets {res} / attentions {attn}")
            has_sampler = any(k.startswith(f"{side}.{level}.{sampler}.0.") for k in keys)
            if level != levels[-1] and not has_sampler:
                problems.append(f"{side}.{level} has no {sampler}")
    if problems:
        raise ModelError("the diffusers UNet keys are not a whole UNet (" + "; ".join(problems[:3]) + "); convert "
                         "all of unet.state_dict()'s keys, or use unet_module_names(unet)")


def _unet_modules_from_diffusers(keys) -> list[_Module]:
    _require_whole_unet(keys)
    mods = list(_UNET_TOP)
    i = 1
    for level in _indices(keys, r"down_blocks\.(\d+)\."):
        blk = f"down_blocks.{level}"
        attn = set(_indices(keys, re.escape(blk) + r"\.attentions\.(\d+)\."))
        for j in _indices(keys, re.escape(blk) + r"\.resnets\.(\d+)\."):
            mods.append(_Module(f"input_blocks.{i}.0", f"{blk}.resnets.{j}", "unet_res"))
            if j in attn:
                mods.append(_Module(f"input_blocks.{i}.1", f"{blk}.attentions.{j}", "same"))
            i += 1
        if any(k.startswith(blk + ".downsamplers.0.") for k in keys):
            mods.append(_Module(f"input_blocks.{i}.0", f"{blk}.downsamplers.0", "down_op"))
            i += 1
    n_res = _indices(keys, r"mid_block\.resnets\.(\d+)\.")
    n_attn = set(_indices(keys, r"mid_block\.attentions\.(\d+)\."))
    s = 0
    for r in n_res:   # ldm middle_block interleaves: res, attn, res, ...
        mods.append(_Module(f"middle_block.{s}", f"mid_block.resnets.{r}", "unet_res"))
        s += 1
        if r in n_attn:
            mods.append(_Module(f"middle_block.{s}", f"mid_block.attentions.{r}", "same"))
            s += 1
    i = 0
    for level in _indices(keys, r"up_blocks\.(\d+)\."):
        blk = f"up_blocks.{level}"
        attn = set(_indices(keys, re.escape(blk) + r"\.attentions\.(\d+)\."))
        res = _indices(keys, re.escape(blk) + r"\.resnets\.(\d+)\.")
        has_up = any(k.startswith(blk + ".upsamplers.0.") for k in keys)
        for j in res:
            mods.append(_Module(f"output_blocks.{i}.0", f"{blk}.resnets.{j}", "unet_res"))
            if j in attn:
                mods.append(_Module(f"output_blocks.{i}.1", f"{blk}.attentions.{j}", "same"))
            if has_up and j == res[-1]:
                mods.append(_Module(f"output_blocks.{i}.{2 if j in attn else 1}", f"{blk}.upsamplers.0", "same"))
            i += 1
    return mods


def unet_ldm_to_diffusers(unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(unet, _unet_modules_from_ldm(list(unet)), to_diffusers=True, label="UNet")


def unet_diffusers_to_ldm(unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _rename(unet, _unet_modules_from_diffusers(list(unet)), to_diffusers=False, label="UNet")


def unet_module_names(diffusers_keys) -> dict[str, str]:
    """{diffusers module path: ldm / sgm module path} of every module holding parameters, e.g.
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" -> "input_blocks.4.1.transformer_blocks.0.attn1.
    to_q" (SDXL). `diffusers_keys`: ALL state-dict keys of the UNet (or the UNet itself): the ldm block numbers
    depend on the whole layout, so a single key cannot be converted alone."""
    if hasattr(diffusers_keys, "state_dict"):
        diffusers_keys = diffusers_keys.state_dict().keys()
    names = {k: k for k in diffusers_keys}
    out: dict[str, str] = {}
    for ldm_key, diff_key in unet_diffusers_to_ldm(names).items():
        out[diff_key.rpartition(".")[0]] = ldm_key.rpartition(".")[0]
    return out


# ---------------------------------------------------------------- VAE

def _vae_modules(n_levels: int, keys, from_ldm: bool) -> list[_Module]:
    mods = [_Module(n, n, "same") for n in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                                            "decoder.conv_in", "decoder.conv_out")]
    for side in ("encoder", "decoder"):
        mods += [_Module(f"{side}.norm_out", f"{side}.conv_norm_out", "same"),
                 _Module(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", "vae_res"),
                 _Module(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", "vae_res"),
                 _Module(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", "vae_attn")]
    for level in range(n_levels):
        for side, ldm_lvl, diff_lvl, sampler in (("encoder", f"down.{level}", f"down_blocks.{level}", "downsample"),
                                                 ("decoder", f"up.{level}", f"up_blocks.{n_levels - 1 - level}",
                                                  "upsample")):
            ldm_blk, diff_blk = f"{side}.{ldm_lvl}", f"{side}.{diff_lvl}"
            res = (_indices(keys, re.escape(ldm_blk) + r"\.block\.(\d+)\.") if from_ldm
                   else _indices(keys, re.escape(diff_blk) + r"\.resnets\.(\d+)\."))
            mods += [_Module(f"{ldm_blk}.block.{j}", f"{diff_blk}.resnets.{j}", "vae_res") for j in res]
            diff_sampler = "downsamplers.0" if sampler == "downsample" else "upsamplers.0"
            mods.append(_Module(f"{ldm_blk}.{sampler}", f"{diff_blk}.{diff_sampler}", "same"))
    return mods


def vae_ldm_to_diffusers(vae: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(_indices(vae, r"encoder\.down\.(\d+)\."))
    return _rename(vae, _vae_modules(n, list(vae), from_ldm=True), to_diffusers=True, label="VAE")


def vae_diffusers_to_ldm(vae: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(_indices(vae, r"encoder\.down_blocks\.(\d+)\."))
    return _rename(vae, _vae_modules(n, list(vae), from_ldm=False), to_diffusers=False, label="VAE")


# ---------------------------------------------------------------- shared renaming

def _rename(sd: Mapping[str, torch.Tensor], modules: list[_Module], *, to_diffusers: bool,
            label: str) -> dict[str, torch.Tensor]:
    lookup = {(m.ldm if to_diffusers else m.diffusers): m for m in modules}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        parts = key.split(".")
        mod = None
        for n in range(1, len(parts)):
            mod = lookup.get(".".join(parts[:n]))
            if mod is not None:
                rest = ".".join(parts[n:])
                break
        if mod is None:
            layout = "ldm" if to_diffusers else "diffusers"
            raise ModelError(f"unexpected {label} key in the {layout} layout: '{key}' (not an SD-shaped model?)")
        new_prefix = mod.diffusers if to_diffusers else mod.ldm
        new_rest, t = _rename_leaf(mod.kind, rest, t, to_diffusers, key)
        new_key = f"{new_prefix}.{new_rest}"
        if new_key in out:
            raise ModelError(f"two {label} keys map to '{new_key}'")
        out[new_key] = t
    return out


def _rename_leaf(kind: str, rest: str, t: torch.Tensor, to_diffusers: bool, key: str):
    if kind == "same":
        return rest, t
    table = _LEAVES[kind] if to_diffusers else _LEAVES_BACK[kind]
    leaf, _, param = rest.rpartition(".")
    if leaf not in table:
        raise ModelError(f"unexpected key '{key}'")
    if kind == "vae_attn" and param == "weight":
        # ldm stores the VAE attention projections as 1x1 convs, diffusers as Linear layers (a view, no copy)
        if to_diffusers and t.ndim == 4:
            t = t.reshape(t.shape[0], t.shape[1])
        elif not to_diffusers and t.ndim == 2:
            t = t.reshape(t.shape[0], t.shape[1], 1, 1)
    return f"{table[leaf]}.{param}", t
