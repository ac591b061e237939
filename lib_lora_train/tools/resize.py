"""Reduce a network's rank (sd-scripts resize_lora.py): fixed rank or dynamic (sv_ratio / sv_fro / sv_cumulative).

Per module: SVD of up @ down (k×k convs flattened), keep the chosen rank r, up = U·S, down = Vhᵀ, and
alpha' = (alpha / old_rank) · r so the effective scale alpha / rank is preserved. The rank is chosen as
sd-scripts does, quirks included:
  sv_ratio X:      count of singular values > S[0] / X
  sv_cumulative X: first k with cumsum(S)[k-1] / sum(S) >= X        (searchsorted on the cumulative share)
  sv_fro X:        first k with cumsum(S²)[k-1] / sum(S²) >= X²
each clamped to [1, n-1] (n = min(out, in·k·k), the full spectrum) and then **plus one** (sd-scripts' +1 rank:
every dynamic method keeps one rank more than its strict criterion), capped by new_rank (new_conv_rank for k×k
convs); a zero update gets rank 1. The report gives per module sum(S) / Frobenius share kept and max(S)/S[r-1].
Differences from sd-scripts: 1×1 convs use new_rank (sd-scripts gives every 4-D weight new_conv_rank); the rank
never grows above the input's (sd-scripts pads with zero directions: same update, bigger file); LoHa / LoKr /
full / Tucker modules are converted to LoRA by the SVD of their update (sd-scripts copies them unchanged);
IA3 and norm modules are copied unchanged.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from ..errors import ConfigError
from .common import (LoraResult, ToolContext, cast_tensors, check_output, dims_label, input_record, precision,
                     save_lora, tool_metadata)
from .formats import read_lora
from .modules import (flat, lora_factors, lora_tensors, module_alpha, module_kind, module_rank, module_update,
                      retained, svd_dense, svd_factors, type_label, update_shape)

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6


def _clamp(index: int, n: int) -> int:
    return max(1, min(index, n - 1))


def dynamic_rank(S: torch.Tensor, full_len: int, method: str, param: float) -> int:
    """sd-scripts' rank for a dynamic method (before the cap), +1 quirk included. S: known singular values,
    descending; the spectrum is taken as S followed by zeros up to full_len."""
    S = S.float()
    if S.shape[0] < full_len:
        S = torch.cat([S, torch.zeros(full_len - S.shape[0])])
    n = S.shape[0]
    if method == "sv_ratio":
        index = int((S > S[0] / param).sum())
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(S, 0) / S.sum(), torch.tensor(float(param)))) + 1
    elif method == "sv_fro":
        sq = S.pow(2)
        index = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(float(param) ** 2))) + 1
    else:
        raise ConfigError(f"dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
    return _clamp(index, n) + 1


def _check(new_rank: int, new_conv_rank: int | None, method: str | None, param: float | None) -> None:
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ConfigError("new_rank and new_conv_rank must be >= 1")
    if method is not None:
        if method not in DYNAMIC_METHODS:
            raise ConfigError(f"dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
        if param is None or param <= 0:
            raise ConfigError(f"dynamic_method {method} needs a positive dynamic_param "
                              "(sv_ratio: e.g. 2; sv_fro / sv_cumulative: a share in (0, 1])")
        if method in ("sv_fro", "sv_cumulative") and param > 1:
            raise ConfigError(f"dynamic_param {param} for {method} must be at most 1 (a share of the spectrum)")


def resize_lora(model, *, new_rank: int = 4, new_conv_rank: int | None = None, dynamic_method: str | None = None,
                dynamic_param: float | None = None, device: str | None = None, sink=None, stop=None) -> LoraResult:
    """Resized tensors (float32), the input's metadata updated as sd-scripts does, and a per-module report."""
    t0 = time.time()
    _check(new_rank, new_conv_rank, dynamic_method, dynamic_param)
    conv_cap = new_conv_rank if new_conv_rank is not None else new_rank
    ctx = ToolContext(sink, stop, "resize")
    lora = read_lora(model)
    tensors: dict[str, torch.Tensor] = {}
    report: list[dict[str, Any]] = []
    for name in ctx.steps("resize", list(lora.modules)):
        w = lora.modules[name]
        kind = module_kind(w)
        if kind in ("ia3", "norm"):
            tensors.update({f"{name}.{k}": v for k, v in w.items()})
            report.append({"name": name, "type": type_label(w), "kept": "unchanged"})
            continue
        shape = update_shape(name, w)
        kxk = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        cap = conv_cap if kxk else new_rank
        n_full = min(shape[0], int(torch.tensor(shape[1:]).prod()))
        factors = lora_factors(w)
        old_rank = module_rank(w)
        if factors is not None:
            up, down, scale = factors
            # sd-scripts: SVD of up @ down without the scale; alpha carries it
            lr = svd_factors(up, down, min(cap, n_full, old_rank))
            known, limit = lr.S, old_rank
            alpha0 = module_alpha(w)
            scale = 1.0 if alpha0 is None else alpha0 / old_rank
        else:
            delta, _ = module_update(name, w, shape=shape)
            lr = svd_dense(flat(delta), min(cap, n_full), device)
            known, limit, scale = lr.S, n_full, 1.0
        if dynamic_method:
            r = dynamic_rank(known, n_full, dynamic_method, float(dynamic_param))
        else:
            r = cap
        r = 1 if float(known[0]) <= MIN_SV else min(r, cap, limit, n_full)
        if r < lr.down.shape[0]:
            lr.up, lr.down = lr.up[:, :r], lr.down[:r]
        r = lr.down.shape[0]
        new_alpha = float(scale * r)
        tensors.update({f"{name}.{k}": v for k, v in lora_tensors(lr, shape, new_alpha).items()})
        report.append({"name": name, "type": type_label(w) + ("" if factors is not None else " -> LoRA"),
                       "kxk": kxk, "old_rank": old_rank, "new_rank": r, "old_alpha": module_alpha(w),
                       "new_alpha": new_alpha, **retained(known, r)})
    resized = [m for m in report if "new_rank" in m]
    meta = _metadata(lora, resized, new_rank, conv_cap, dynamic_method, dynamic_param,
                     all_lora=len(resized) == len(report))
    fro = [m["fro_retained"] for m in resized]
    summary = {"modules": len(report), "resized": len(resized),
               "old_rank_max": max((m["old_rank"] or 0 for m in resized), default=0),
               "new_rank_min": min((m["new_rank"] for m in resized), default=None),
               "new_rank_max": max((m["new_rank"] for m in resized), default=None),
               "mean_fro_retained": sum(fro) / len(fro) if fro else None,
               "std_fro_retained": float(torch.tensor(fro).std(unbiased=False)) if fro else None}
    return LoraResult(tensors, meta, report, summary, path=None, seconds=time.time() - t0)


def _metadata(lora, resized, new_rank, conv_cap, method, param, all_lora: bool) -> dict[str, str]:
    meta = dict(lora.metadata)
    replaced = {k: meta[k] for k in ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_network_args",
                                     "ss_training_comment", "sshs_model_hash", "sshs_legacy_hash") if k in meta}
    for k in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(k, None)
    old_dim = max((m["old_rank"] or 0 for m in resized), default=0)
    comment = meta.get("ss_training_comment", "")
    if method is None:
        conv_desc = "" if conv_cap == new_rank else f" (conv: {conv_cap})"
        meta["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
    else:
        meta["ss_training_comment"] = f"Dynamic resize with {method}: {param} from {old_dim}; {comment}"
    lin = [m for m in resized if not m["kxk"]] or resized
    conv = [m for m in resized if m["kxk"]]
    meta["ss_network_dim"] = "Dynamic" if method else dims_label(m["new_rank"] for m in lin)
    meta["ss_network_alpha"] = "Dynamic" if method else dims_label((m["new_alpha"] for m in lin), alpha=True)
    if all_lora and any("->" in m["type"] for m in resized):
        meta["ss_network_module"] = "networks.lora"    # every layer is a plain LoRA now
        meta["ss_network_args"] = "{}"
    if conv:
        try:
            args = json.loads(meta.get("ss_network_args") or "{}")
        except ValueError:
            args = {}
        args = args if isinstance(args, dict) else {}
        args["conv_dim"] = "Dynamic" if method else dims_label(m["new_rank"] for m in conv)
        args["conv_alpha"] = "Dynamic" if method else dims_label((m["new_alpha"] for m in conv), alpha=True)
        meta["ss_network_args"] = json.dumps(args)
    record = input_record(lora.path, lora.metadata, keep_metadata=False, replaced=replaced)
    meta.update(tool_metadata("resize", {"new_rank": new_rank, "new_conv_rank": conv_cap,
                                         "dynamic_method": method, "dynamic_param": param}, [record]))
    return meta


def resize_lora_to_file(model, save_to: str | os.PathLike, *, new_rank: int = 4, new_conv_rank: int | None = None,
                        dynamic_method: str | None = None, dynamic_param: float | None = None,
                        device: str | None = None, save_precision: str | None = None, overwrite: bool = False,
                        sink=None, stop=None) -> LoraResult:
    """resize_lora, then write save_to (metadata kept as sd-scripts keeps it, fresh sshs_* hashes)."""
    src = [model] if isinstance(model, (str, os.PathLike)) else []
    save_to = check_output(save_to, src, overwrite=overwrite)
    dtype = precision(save_precision, "save_precision")
    result = resize_lora(model, new_rank=new_rank, new_conv_rank=new_conv_rank, dynamic_method=dynamic_method,
                         dynamic_param=dynamic_param, device=device, sink=sink, stop=stop)
    result.tensors = cast_tensors(result.tensors, dtype)
    ToolContext(sink, stop, "resize").check_stop()
    return save_lora(result, save_to, overwrite=overwrite)
