"""Merge several networks into one LoRA: exact SVD of the summed updates, or concatenation of the ranks.

SVD (sd-scripts svd_merge_lora.py): per layer ΔW = Σ_i ratio_i · lbw_i(block) · ΔW_i (any module type, any ranks,
LoCon included), then the best rank-`new_rank` factorisation up = U·S, down = Vhᵀ with alpha = rank (scale 1).
At a rank >= the sum of the input ranks the result equals the summed updates. For LoRA / LoCon inputs the SVD
is done on the stacked factors (QR of both sides, SVD of a Σr×Σr matrix): exact and fast, the layer's full
matrix is never formed. Differences from sd-scripts: no 0.99-quantile clamp unless asked (sd-scripts always
clamps, so even its full-rank merge is not exact); 1×1 convs take new_rank like Linear layers.

Concat (sd-scripts merge_lora.py --concat): ranks are stacked, rank = Σ r_i. Each input's factor c_i =
ratio_i · lbw_i · alpha_i / r_i is split as sqrt(|c_i|) on up and sign(c_i)·sqrt(|c_i|) on down, with alpha = Σ r_i
(scale 1), so the result is exact. sd-scripts scales both factors by sqrt(alpha_i / alpha_first) · ratio and keeps
the first input's alpha over the summed rank, which changes the update (ratio², diluted scale); we do not.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import torch

from ..errors import ConfigError, ModelError
from .common import (LoraResult, ToolContext, cast_tensors, check_output, dims_label, input_record, lora_modelspec,
                     merged_tag_frequency, minimum_network_metadata, precision, save_lora, tool_metadata)
from .merge import LoadedInput, LoraInput, load_inputs
from .modules import (LowRank, clamp_quantile, flat, lora_factors, lora_tensors, module_kind, module_update,
                      retained, svd_dense, svd_factors, type_label, update_shape)


def _contributions(loaded: list[LoadedInput]) -> dict[str, list[tuple[float, dict, str]]]:
    """layer name -> [(factor, tensors, input name)] over the inputs, ratio-0 contributions left out."""
    per: dict[str, list[tuple[float, dict, str]]] = {}
    for item in loaded:
        for name, w in item.modules().items():
            f = item.factor(name)
            per.setdefault(name, [])
            if f != 0.0:
                per[name].append((f, w, item.lora.name))
    return per


def _shape(name: str, parts: list[tuple[float, dict, str]]) -> tuple[int, ...]:
    shapes = [update_shape(name, w) for _, w, _ in parts]
    known = [s for s in shapes if s is not None]
    if not known:
        raise ModelError(f"{name}: {type_label(parts[0][1])} modules cannot be merged into a LoRA without the "
                         f"base model (merge them into a checkpoint instead)")
    first = known[0]
    for s, (_, w, src) in zip(shapes, parts):
        if s is not None and math.prod(s) != math.prod(first):
            raise ModelError(f"{name}: {src} has shape {s}, another input {first} (networks for different models?)")
    # prefer a 4-D (conv) shape when inputs disagree only on Linear vs 1x1 conv
    return max(known, key=len)


def _svd_module(name: str, parts, shape, rank: int, device) -> LowRank:
    factors = [lora_factors(w) for _, w, _ in parts]
    if all(f is not None for f in factors):
        A = torch.cat([up * (c * s) for (c, _, _), (up, _, s) in zip(parts, factors)], dim=1)
        B = torch.cat([down for (_, down, _) in factors], dim=0)
        return svd_factors(A, B, rank)
    total = None
    for c, w, src in parts:
        if module_kind(w) in ("ia3", "norm"):
            raise ModelError(f"{name}: {type_label(w)} modules of {src} cannot be turned into a LoRA without the "
                             f"base model (merge them into a checkpoint instead)")
        delta, _ = module_update(name, w, shape=shape)
        total = c * flat(delta) if total is None else total + c * flat(delta)
    return svd_dense(total, rank, device)


def merge_loras(inputs: Sequence[LoraInput | Any], *, new_rank: int | None = None, new_conv_rank: int | None = None,
                concat: bool = False, shuffle: bool = False, seed: int = 0, clamp: float | None = None,
                device: str | None = None, sink=None, stop=None,
                _loaded: list[LoadedInput] | None = None) -> LoraResult:
    """Merge the networks (SVD to new_rank / new_conv_rank, or concat=True) into new LoRA tensors (float32).

    Modules present in only some inputs take only those inputs' updates; a module whose every contribution has
    ratio 0 is left out of the result.
    """
    t0 = time.time()
    if concat == (new_rank is not None):
        raise ConfigError("choose either new_rank (SVD merge, --new_rank N) or concat (--concat); sd-scripts' plain "
                          "sum of up and down weights is not offered because it is not the sum of the updates")
    if new_rank is not None and new_rank < 1:
        raise ConfigError(f"new_rank={new_rank}: must be >= 1")
    conv_rank = new_conv_rank if new_conv_rank is not None else new_rank
    ctx = ToolContext(sink, stop, "merge-lora")
    loaded = _loaded if _loaded is not None else load_inputs(inputs, ctx)
    per = _contributions(loaded)
    tensors: dict[str, torch.Tensor] = {}
    report: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(seed)
    for name in ctx.steps("merge", list(per)):
        parts = per[name]
        if not parts:
            continue
        if all(module_kind(w) == "norm" for _, w, _ in parts):
            _sum_norms(name, parts, tensors)
            continue
        shape = _shape(name, parts)
        kxk = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        if any(module_kind(w) == "full" and "diff_b" in w for _, w, _ in parts):
            ctx.warn(f"{name}: the bias part (diff_b) of a full module cannot be kept in a LoRA and is left out")
        if concat:
            w_out, r = _concat_module(name, parts, shape, shuffle, gen)
            tensors.update({f"{name}.{k}": v for k, v in w_out.items()})
            report.append({"name": name, "rank": r, "kxk": kxk, "inputs": len(parts)})
            continue
        rank = min(conv_rank if kxk else new_rank, shape[0], math.prod(shape[1:]))
        lr = _pad(clamp_quantile(_svd_module(name, parts, shape, rank, device), clamp), rank)
        r = lr.down.shape[0]
        tensors.update({f"{name}.{k}": v for k, v in lora_tensors(lr, shape, float(r)).items()})
        report.append({"name": name, "rank": r, "kxk": kxk, "inputs": len(parts), **retained(lr.S, r)})
    if not tensors:
        raise ConfigError("every module has ratio 0: nothing to merge")
    metas = [x.lora.metadata for x in loaded]
    ranks = [m["rank"] for m in report]
    lin = [m["rank"] for m in report if not m.get("kxk")] or ranks
    conv = [m["rank"] for m in report if m.get("kxk")]
    args = {"conv_dim": dims_label(conv), "conv_alpha": dims_label(conv, alpha=True)} if conv else None
    meta = minimum_network_metadata(metas, dims_label(lin), dims_label(lin, alpha=True), args)
    summary = {"modules": len(report), "inputs": [x.lora.name for x in loaded], "rank_min": min(ranks),
               "rank_max": max(ranks), "method": "concat" if concat else "svd"}
    if not concat:
        summary["mean_fro_retained"] = sum(m["fro_retained"] for m in report) / len(report)
    return LoraResult(tensors, meta, report, summary, seconds=time.time() - t0)


def _pad(lr: LowRank, rank: int) -> LowRank:
    """Zero directions up to the requested rank when the summed update has a lower rank (as sd-scripts' SVD
    gives): every layer then has the rank the metadata states."""
    missing = rank - lr.down.shape[0]
    if missing <= 0:
        return lr
    up = torch.cat([lr.up, lr.up.new_zeros(lr.up.shape[0], missing)], 1)
    down = torch.cat([lr.down, lr.down.new_zeros(missing, lr.down.shape[1])], 0)
    return LowRank(up, down, lr.S, lr.full_len)


def _sum_norms(name: str, parts, tensors: dict) -> None:
    for key in ("w_norm", "b_norm"):
        vals = [c * w[key].float() for c, w, _ in parts if key in w]
        if vals:
            tensors[f"{name}.{key}"] = torch.stack(vals).sum(0)


def _concat_module(name: str, parts, shape, shuffle: bool, gen: torch.Generator) -> tuple[dict, int]:
    ups, downs = [], []
    for c, w, src in parts:
        f = lora_factors(w)
        if f is None:
            raise ConfigError(f"--concat stacks LoRA / LoCon ranks; {name} of {src} is {type_label(w)} "
                              f"(use --new_rank N for an SVD merge)")
        up, down, scale = f
        k = c * scale
        ups.append(up * math.sqrt(abs(k)))
        downs.append(down * (math.copysign(math.sqrt(abs(k)), k)))
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    r = down.shape[0]
    if shuffle:
        perm = torch.randperm(r, generator=gen)
        up, down = up[:, perm], down[perm]
    return lora_tensors(LowRank(up, down, torch.zeros(0), 0), shape, float(r)), r


def merge_loras_to_file(inputs: Sequence[LoraInput | Any], save_to: str | os.PathLike, *,
                        new_rank: int | None = None, new_conv_rank: int | None = None, concat: bool = False,
                        shuffle: bool = False, clamp: float | None = None, device: str | None = None,
                        save_precision: str | None = None, no_metadata: bool = False, overwrite: bool = False,
                        sink=None, stop=None) -> LoraResult:
    """merge_loras, then write save_to with rewritten metadata (inputs' metadata under lib_lora_train.inputs)."""
    specs = [s if isinstance(s, LoraInput) else LoraInput(s) for s in inputs]
    save_to = check_output(save_to, [s.source for s in specs if isinstance(s.source, (str, os.PathLike))],
                           overwrite=overwrite)
    dtype = precision(save_precision, "save_precision")
    loaded = load_inputs(specs, ToolContext(sink, stop, "merge-lora"))
    result = merge_loras(specs, new_rank=new_rank, new_conv_rank=new_conv_rank, concat=concat, shuffle=shuffle,
                         clamp=clamp, device=device, sink=sink, stop=stop, _loaded=loaded)
    metas = [x.lora.metadata for x in loaded]
    titles = [x.lora.metadata.get("modelspec.title") or os.path.splitext(x.lora.name)[0] for x in loaded]
    listing = ", ".join(f"{t} ({x.spec.ratio:g})" for t, x in zip(titles, loaded))
    result.metadata["ss_training_comment"] = f"merged ({result.summary['method']}) from {listing} by lib_lora_train"
    tags = merged_tag_frequency(metas)
    if tags:
        result.metadata["ss_tag_frequency"] = tags
    if not no_metadata:
        triggers = [m.get("modelspec.trigger_phrase") for m in metas if m.get("modelspec.trigger_phrase")]
        result.metadata.update(lora_modelspec(
            title=os.path.splitext(os.path.basename(save_to))[0], merged_from=", ".join(titles),
            family=loaded[0].lora.family,
            v_pred=any(m.get("modelspec.prediction_type") == "v" for m in metas),
            extra={"modelspec.trigger_phrase": ", ".join(dict.fromkeys(triggers)) or None}))
        records = [input_record(x.lora.path, x.lora.metadata, ratio=x.spec.ratio, rank=x.spec.rank,
                                block_weights=list(x.weights) if x.weights else None) for x in loaded]
        result.metadata.update(tool_metadata("merge-lora", {"new_rank": new_rank, "new_conv_rank": new_conv_rank,
                                                             "concat": concat, "clamp_quantile": clamp}, records))
    result.tensors = cast_tensors(result.tensors, dtype)
    ToolContext(sink, stop, "merge-lora").check_stop()
    return save_lora(result, save_to, overwrite=overwrite)
