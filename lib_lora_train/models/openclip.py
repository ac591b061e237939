"""OpenCLIP text tower (SD 2.x ViT-H, SDXL bigG) <-> transformers CLIPTextModel keys.

OpenCLIP fuses q/k/v into one `attn.in_proj_weight` [3w, w] and stores `text_projection` as [w, p] for
`x @ P`. Loading splits the fused tensors into three row blocks and transposes the projection, both as views of
the given tensors (no copy), so a model loaded from a live state dict shares its memory. Writing back fuses
them with a copy (a file needs its own tensors anyway).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import ModelError

# OpenCLIP leaf (inside transformer.resblocks.N) -> transformers leaf (inside encoder.layers.N)
_LAYER_LEAVES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_LAYER_LEAVES_BACK = {v: k for k, v in _LAYER_LEAVES.items()}
_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$")
# Keys of the OpenCLIP text model that a CLIPTextModel has no place for.
_UNUSED = ("logit_scale", "attn_mask")


def openclip_layer_count(keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ModelError(f"the OpenCLIP text encoder's resblocks are not numbered 0..n ({sorted(found)[:8]} ...)")
    return len(found)


def openclip_to_transformers(oc: Mapping[str, torch.Tensor], *, drop_last_layer: bool, with_projection: bool,
                             label: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(`text_model.*` state dict [+ `text_projection.weight`], the OpenCLIP keys not used, by their own name).

    `oc` holds the OpenCLIP text model's keys without their checkpoint prefix. `drop_last_layer`: SD 2.x, whose
    ldm conditioner stops at the penultimate resblock (sd-scripts converts it to a model without the last one)."""
    n = openclip_layer_count(oc)
    if n == 0:
        raise ModelError(f"the {label} has no transformer.resblocks.* layers")
    keep = n - 1 if drop_last_layer else n
    if keep < 1:
        raise ModelError(f"the {label} has only {n} layer; the penultimate layer does not exist")
    out: dict[str, torch.Tensor] = {}
    unused: dict[str, torch.Tensor] = {}
    for key, t in oc.items():
        if key in _TOP:
            out["text_model." + _TOP[key]] = t
            continue
        if key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = t.t()   # [w, p] used as x @ P  ->  Linear weight [p, w], a view
            else:
                unused[key] = t
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            if key in _UNUSED:
                unused[key] = t
                continue
            raise ModelError(f"unexpected key in the {label}: '{key}'")
        layer, leaf, param = int(m.group(1)), m.group(2), m.group(3)
        if layer >= keep:
            unused[key] = t
            continue
        base = f"text_model.encoder.layers.{layer}."
        if leaf == "attn" and param in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if param == "in_proj_weight" else "bias"
            if t.shape[0] % 3:
                raise ModelError(f"{label} key '{key}' is not a fused q/k/v tensor (shape {tuple(t.shape)})")
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):   # views, no copy
                out[f"{base}self_attn.{name}.{kind}"] = piece
        elif leaf in _LAYER_LEAVES and param in ("weight", "bias"):
            out[f"{base}{_LAYER_LEAVES[leaf]}.{param}"] = t
        else:
            raise ModelError(f"unexpected key in the {label}: '{key}'")
    for needed in (*_TOP.values(), *(["text_projection.weight"] if with_projection else [])):
        full = needed if needed.startswith("text_projection") else "text_model." + needed
        if full not in out:
            raise ModelError(f"the {label} has no '{(_TOP_BACK.get(needed) or 'text_projection')}' weight")
    return out, unused


def transformers_to_openclip(te_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP keys (no checkpoint prefix) of a CLIPTextModel[WithProjection] state dict (`text_model.*` or the
    flat transformers >= 5.6 layout). q/k/v are fused by concatenation (a copy)."""
    flat = {(k[len("text_model."):] if k.startswith("text_model.") else k): t for k, t in te_sd.items()
            if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        if key in _TOP_BACK:
            out[_TOP_BACK[key]] = t
            continue
        if key == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise ModelError(f"unexpected text-encoder key '{key}' for the OpenCLIP layout")
        layer, leaf, param = int(m.group(1)), m.group(2), m.group(3)
        if leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer, param), {})[leaf[-6]] = t
        elif leaf in _LAYER_LEAVES_BACK:
            out[f"transformer.resblocks.{layer}.{_LAYER_LEAVES_BACK[leaf]}.{param}"] = t
        else:
            raise ModelError(f"unexpected text-encoder key '{key}' for the OpenCLIP layout")
    for (layer, param), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ModelError(f"text-encoder layer {layer} lacks one of q/k/v_proj.{param}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
