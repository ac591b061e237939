"""Read a saved network file the plain way: ΔW of each layer from its tensors, and merging into a model.

Semantics follow sd-scripts (merge_lora.py) and the WebUI's built-in Lora extension (network_lora / network_hada /
network_lokr / network_ia3). This is deliberately independent of the training modules so tests can check the
trained behaviour against what a reader of the file gets.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import ConfigError
from .targets import TE_PREFIX, UNET_PREFIX, module_index


def _f(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dt)


def _scale(tensors: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """alpha / rank; a file without alpha (or a layer without a rank) has scale 1."""
    alpha = tensors.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Rebuild [out, in, *k] from a Tucker core t [r, r, *k] and wa [r, out], wb [r, in]."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def _lora(w: Mapping[str, torch.Tensor], shape: torch.Size, dt: torch.dtype) -> torch.Tensor:
    up, down, mid = (_f(w.get(k), dt) for k in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"))
    rank = down.shape[0]
    if mid is not None:
        delta = _tucker(mid, up.reshape(up.shape[0], -1).t(), down.reshape(rank, -1))
    elif down.dim() == 4 and down.shape[2:] != (1, 1):
        # up (1×1) after down (k×k): compose as a convolution over the rank axis
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
    return delta.reshape(shape) * _scale(w, rank)


def _loha(w: Mapping[str, torch.Tensor], shape: torch.Size, dt: torch.dtype) -> torch.Tensor:
    w1a, w1b, w2a, w2b, t1, t2 = (_f(w.get(k), dt) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                                             "hada_t1", "hada_t2"))
    rank = w1b.shape[0]
    d1 = _tucker(t1, w1a, w1b) if t1 is not None else (w1a @ w1b)
    d2 = _tucker(t2, w2a, w2b) if t2 is not None else (w2a @ w2b)
    return (d1.reshape(shape) * d2.reshape(shape)) * _scale(w, rank)


def _lokr(w: Mapping[str, torch.Tensor], shape: torch.Size, dt: torch.dtype) -> torch.Tensor:
    f = {k: _f(v, dt) for k, v in w.items() if k != "alpha"}
    rank = None
    if "lokr_w1" in f:
        w1 = f["lokr_w1"]
    else:
        w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
        rank = w["lokr_w1_b"].shape[0]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        rank = w["lokr_w2_b"].shape[0]
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        rank = w["lokr_w2_b"].shape[0]
    # alpha / rank applies only when a factor is low-rank; with two full factors the file's alpha is unused
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()).reshape(shape) * _scale(w, rank)


def _ia3(w: Mapping[str, torch.Tensor], org_weight: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    scale = _f(w["weight"], dt).flatten()
    on_input = bool(w["on_input"].item()) if "on_input" in w else False
    view = [1] * org_weight.dim()
    view[1 if on_input else 0] = -1
    return org_weight.to(scale.dtype) * scale.reshape(view)


def module_kind(tensors: Mapping[str, torch.Tensor]) -> str:
    """lora | loha | lokr | ia3, from the keys of one layer."""
    if "lora_up.weight" in tensors and "lora_down.weight" in tensors:
        return "lora"
    if "hada_w1_a" in tensors:
        return "loha"
    if ("lokr_w1" in tensors or "lokr_w1_a" in tensors) and ("lokr_w2" in tensors or "lokr_w2_a" in tensors):
        return "lokr"
    if "weight" in tensors:
        return "ia3"
    raise ConfigError(f"unknown layer format with keys {sorted(tensors)}")


def module_delta(tensors: Mapping[str, torch.Tensor], org_weight: torch.Tensor, *,
                 multiplier: float = 1.0) -> torch.Tensor:
    """ΔW (shaped like org_weight) of one layer from its saved tensors (keys without the name prefix).

    Computed in float32 (float64 for a float64 model), as the WebUI computes deltas in float32.
    """
    dt = torch.float64 if org_weight.dtype == torch.float64 else torch.float32
    kind = module_kind(tensors)
    shape = org_weight.shape
    if kind == "lora":
        delta = _lora(tensors, shape, dt)
    elif kind == "loha":
        delta = _loha(tensors, shape, dt)
    elif kind == "lokr":
        delta = _lokr(tensors, shape, dt)
    else:
        delta = _ia3(tensors, org_weight, dt)
    return delta * multiplier


def split_by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"<name>.<key>": t} -> {name: {key: t}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, t in tensors.items():
        name, _, key = full_key.partition(".")
        if not key:
            raise ConfigError(f"tensor key {full_key!r} has no module prefix")
        out.setdefault(name, {})[key] = t
    return out


@torch.no_grad()
def apply_deltas(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], part: str, *,
                 multiplier: float = 1.0, strict: bool = True, family: str = "sd1",
                 prefix: str | None = None) -> list[str]:
    """Merge the file's layers for `part` ("unet" | "text_encoder") into model's weights in place.

    family "sdxl": U-Net names in the sgm layout; prefix: lora_te1 / lora_te2 for SDXL's encoders.
    Returns the names merged. With strict, a layer of that part that the model does not have is an error.
    """
    if part not in ("unet", "text_encoder"):
        raise ValueError(f"part must be 'unet' or 'text_encoder', not {part!r}")
    index = module_index(model, part, family=family, prefix=prefix)
    prefix = (prefix or (UNET_PREFIX if part == "unet" else TE_PREFIX)) + "_"
    merged = []
    missing = []
    for name, w in split_by_module(tensors).items():
        if not name.startswith(prefix):
            continue
        module = index.get(name)
        if module is None:
            missing.append(name)
            continue
        delta = module_delta(w, module.weight, multiplier=multiplier)
        module.weight.copy_((module.weight.to(delta.dtype) + delta).to(module.weight.dtype))
        merged.append(name)
    if strict and missing:
        raise ConfigError(f"{len(missing)} layers of the file are not in the model, e.g. {missing[:3]}")
    return merged
