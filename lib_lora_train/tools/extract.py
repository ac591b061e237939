"""Extract a LoRA / LoCon from a tuned and a base SD 1.x / SD 2.x / SDXL checkpoint (sd-scripts
extract_lora_from_models.py; the family is read from the keys, both checkpoints must be of the same one).

For every layer a networks.lora network would adapt (LierLa; C3Lier with conv_dim): ΔW = W_tuned − W_base, the
truncated SVD at rank min(dim, out, in) (conv_dim for k×k convs), up = U·S, down = Vhᵀ, both clamped to ±the
clamp_quantile of their joined values, alpha = rank. If no text-encoder weight differs by more than min_diff,
the text encoder is left out ("text encoder is same"). Each module's report says how much of its update the
rank keeps (sum / Frobenius share of the singular values) and the actual relative error after the clamp.
Checkpoints are read one tensor at a time (safetensors), so two full models are never in memory.
Differences from sd-scripts: the SVD computes only the kept vectors (sd-scripts computes full U and V, same
result, much slower); the family comes from the checkpoint, not from --v2 / --sdxl flags.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from .checkpoint import CheckpointSource, TargetRef, family_targets, rows
from .common import (LoraResult, ToolContext, cast_tensors, check_output, family_metadata, input_record,
                     lora_modelspec, precision, save_lora, tool_metadata)
from .families import checkpoint_family
from .modules import clamp_quantile as clamp_factors
from .modules import flat, lora_tensors, retained, svd_dense


def _diff(org: CheckpointSource, tuned: CheckpointSource, key: str, load_dtype, chunk=None) -> torch.Tensor:
    a, b = rows(org.get(key), chunk), rows(tuned.get(key), chunk)
    if a.shape != b.shape:
        raise ModelError(f"{key}: shape {tuple(a.shape)} in {org.name} but {tuple(b.shape)} in {tuned.name}; "
                         f"the two checkpoints are not the same architecture")
    if load_dtype is not None:
        a, b = a.to(load_dtype), b.to(load_dtype)
        return (b - a).float()
    return b.float() - a.float()


def _te_differs(org, tuned, targets: list[TargetRef], min_diff: float, load_dtype, ctx: ToolContext) -> float:
    """The largest |ΔW| over the text encoder (stops early once above min_diff)."""
    largest = 0.0
    for t in ctx.steps("compare text encoder", [t for t in targets if t.part == "text_encoder"]):
        largest = max(largest, float(_diff(org, tuned, t.weight_key, load_dtype, t.chunk).abs().max()))
        if largest > min_diff:
            break
    return largest


def extract_lora(model_org, model_tuned, *, dim: int = 4, conv_dim: int | None = None,
                 clamp_quantile: float | None = 0.99, min_diff: float = 0.01, device: str | None = None,
                 load_precision: str | None = None, sink=None, stop=None) -> LoraResult:
    """The extracted LoRA tensors (float32) and a per-module report; model_org / model_tuned: paths or ldm
    state dicts."""
    t0 = time.time()
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise ConfigError("dim and conv_dim must be >= 1")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise ConfigError(f"clamp_quantile={clamp_quantile}: must be in (0, 1]")
    ctx = ToolContext(sink, stop, "extract")
    load_dtype = precision(load_precision, "load_precision")
    with CheckpointSource(model_org) as org, CheckpointSource(model_tuned) as tuned:
        family, tuned_family = checkpoint_family(org.keys), checkpoint_family(tuned.keys)
        if family != tuned_family:
            from ..networks.names import FAMILY_LABELS
            raise ModelError(f"{org.name} is {FAMILY_LABELS[family]} but {tuned.name} is "
                             f"{FAMILY_LABELS[tuned_family]}; extract needs two checkpoints of one family")
        targets = family_targets(org, family, "c3lier" if conv_dim else "lierla")
        missing = [t.weight_key for t in targets if t.weight_key not in tuned]
        if missing:
            raise ModelError(f"{tuned.name} lacks {len(missing)} layers of {org.name}, e.g. {missing[:3]}")
        te_max = _te_differs(org, tuned, targets, min_diff, load_dtype, ctx)
        te_same = te_max <= min_diff
        if te_same:
            ctx.warn(f"text encoder is the same (largest difference {te_max:.3g} <= min_diff {min_diff}): "
                     f"extracting the U-Net only")
            targets = [t for t in targets if t.part == "unet"]
        tensors: dict[str, torch.Tensor] = {}
        report: list[dict[str, Any]] = []
        for t in ctx.steps("extract", targets):
            delta = _diff(org, tuned, t.weight_key, load_dtype, t.chunk)
            shape = tuple(delta.shape)
            rank = min(conv_dim if t.kxk else dim, shape[0], shape[1])
            mat = flat(delta)
            lr = clamp_factors(svd_dense(mat, rank, device), clamp_quantile)
            norm = float(mat.norm())
            err = float((mat - lr.up @ lr.down).norm()) / norm if norm > 0 else 0.0
            tensors.update({f"{t.name}.{k}": v for k, v in lora_tensors(lr, shape, float(rank)).items()})
            report.append({"name": t.name, "rank": rank, "kxk": t.kxk, "update_norm": norm,
                           **retained(lr.S, rank), "rel_error": err})
    fro = [m["fro_retained"] for m in report]
    summary = {"modules": len(report), "family": family, "text_encoder": "same" if te_same else "extracted",
               "text_encoder_max_diff": te_max, "dim": dim, "conv_dim": conv_dim,
               "mean_fro_retained": sum(fro) / len(fro) if fro else None,
               "min_fro_retained": min(fro) if fro else None,
               "max_rel_error": max((m["rel_error"] for m in report), default=None)}
    net_args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim else {}
    meta = {**family_metadata(family), "ss_network_module": "networks.lora",
            "ss_network_dim": str(dim), "ss_network_alpha": str(float(dim)), "ss_network_args": json.dumps(net_args)}
    return LoraResult(tensors, meta, report, summary, seconds=time.time() - t0)


def extract_lora_to_file(model_org, model_tuned, save_to: str | os.PathLike, *, dim: int = 4,
                         conv_dim: int | None = None, clamp_quantile: float | None = 0.99, min_diff: float = 0.01,
                         device: str | None = None, load_precision: str | None = None,
                         save_precision: str | None = None, v_parameterization: bool = False,
                         no_metadata: bool = False, overwrite: bool = False, sink=None, stop=None) -> LoraResult:
    """extract_lora, then write save_to (sd-scripts' minimum metadata + modelspec + lib_lora_train.inputs)."""
    paths = [p for p in (model_org, model_tuned) if isinstance(p, (str, os.PathLike))]
    save_to = check_output(save_to, paths, overwrite=overwrite)
    dtype = precision(save_precision, "save_precision")
    result = extract_lora(model_org, model_tuned, dim=dim, conv_dim=conv_dim, clamp_quantile=clamp_quantile,
                          min_diff=min_diff, device=device, load_precision=load_precision, sink=sink, stop=stop)
    family = result.summary["family"]
    if v_parameterization:
        result.metadata.update(family_metadata(family, v_pred=True))
    s = result.summary
    result.metadata["ss_training_comment"] = (
        f"extracted by lib_lora_train from {_label(model_tuned)} - {_label(model_org)}, rank {dim}"
        + (f", conv rank {conv_dim}" if conv_dim else "")
        + (f"; mean Frobenius share kept {s['mean_fro_retained']:.3f}" if s["mean_fro_retained"] is not None else ""))
    if not no_metadata:
        result.metadata.update(lora_modelspec(title=os.path.splitext(os.path.basename(save_to))[0],
                                              v_pred=v_parameterization, family=family))
        records = [input_record(_path(m), _meta(m), role=role, keep_metadata=False)
                   for m, role in ((model_org, "base"), (model_tuned, "tuned"))]
        result.metadata.update(tool_metadata("extract", {"dim": dim, "conv_dim": conv_dim,
                                                          "clamp_quantile": clamp_quantile,
                                                          "min_diff": min_diff}, records))
    result.tensors = cast_tensors(result.tensors, dtype)
    ToolContext(sink, stop, "extract").check_stop()
    return save_lora(result, save_to, overwrite=overwrite)


def _path(m) -> str | None:
    return os.fspath(m) if isinstance(m, (str, os.PathLike)) else None


def _label(m) -> str:
    p = _path(m)
    return os.path.basename(p) if p else "state dict"


def _meta(m) -> dict[str, str]:
    p = _path(m)
    if p and p.lower().endswith(".safetensors"):
        from ..models.ckpt import read_safetensors_metadata
        return read_safetensors_metadata(p)
    return {}
