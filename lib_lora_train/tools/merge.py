"""Merge LoRA / LoCon / LoHa / LoKr / IA3 / full networks into an SD 1.x / SD 2.x / SDXL checkpoint (sd-scripts
merge_lora.py / sdxl_merge_lora.py).

W' = W + Σ_i ratio_i · block_ratio_i(layer) · ΔW_i, accumulated in the merge precision (float32 by default) and
cast once to the output precision. Works on the ldm state dict itself, so the result has exactly the input's
keys and layout (VAE, EMA and extra tensors untouched); `merge_into_state_dict` does it in memory (e.g. on a
live model's state dict, with a backup of the changed tensors for restoring) without writing a file.
Differences from sd-scripts: the default output precision is the input's (sd-scripts: float32); any LyCORIS
module type is merged (sd-scripts: LoRA / LoCon only); per-block (LBW) ratios are accepted. A network of another
family than the checkpoint (e.g. an SDXL LoRA and an SD 1.x checkpoint) is refused, naming both families.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, MutableMapping, Sequence

import torch

from ..errors import ConfigError, ModelError
from .blocks import block_ratio, parse_block_weights
from .checkpoint import family_name_index, rows
from .families import checkpoint_family, refuse_mismatch
from .common import (ToolContext, check_output, checkpoint_modelspec, input_record, precision, title_of,
                     tool_metadata)
from .formats import LoraFile, read_lora
from .modules import dylora_slice, module_kind, module_update, update_shape


@dataclass
class LoraInput:
    """One network to merge: a path / LoraFile / tensors, its ratio, optional LBW ratios and DyLoRA rank."""
    source: Any
    ratio: float = 1.0
    block_weights: Any = None        # LBW preset, "1,0,..." (SD1/2: 17 / 26 values, SDXL: 12 / 20 / 26); None: 1
    rank: int | None = None          # DyLoRA: merge only the first `rank` ranks (sd-scripts' split)
    dylora_keep_alpha: bool = True   # see modules.dylora_slice


@dataclass
class LoadedInput:
    spec: LoraInput
    lora: LoraFile
    weights: tuple[float, ...] | None    # 26 LBW ratios

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.spec.rank is None:
            return self.lora.modules
        return {n: dylora_slice(w, self.spec.rank, keep_alpha=self.spec.dylora_keep_alpha)
                for n, w in self.lora.modules.items()}

    def factor(self, name: str) -> float:
        return float(self.spec.ratio) * block_ratio(name, self.weights)


def load_inputs(inputs: Sequence[LoraInput | Any], ctx: ToolContext | None = None) -> list[LoadedInput]:
    """Read every input network (a bare path / LoraFile means ratio 1); they must all be of one family."""
    if not inputs:
        raise ConfigError("no networks given (--models)")
    out = []
    for i, spec in enumerate(inputs):
        spec = spec if isinstance(spec, LoraInput) else LoraInput(spec)
        lora = read_lora(spec.source)
        if lora.family == "other":
            raise ModelError(f"{lora.name} is not a Stable Diffusion 1.x / 2.x / SDXL network")
        if out and lora.family != out[0].lora.family and not (
                {lora.family, out[0].lora.family} <= {"sd1", "sd2"}
                and (lora.family_guessed or out[0].lora.family_guessed)):
            raise ModelError(f"{lora.name} is {_article(lora.family)} but {out[0].lora.name} is "
                             f"{_article(out[0].lora.family)}; networks of different model families cannot be "
                             f"merged together")
        weights = parse_block_weights(spec.block_weights, what=f"block weights of {lora.name}", family=lora.family)
        if spec.rank is not None:
            if spec.rank < 1:
                raise ConfigError(f"DyLoRA rank for {lora.name} must be >= 1")
            if ctx is not None and lora.metadata.get("ss_network_module") != "networks.dylora":
                ctx.warn(f"{lora.name} is not marked as DyLoRA (ss_network_module); slicing its ranks anyway")
        out.append(LoadedInput(spec, lora, weights))
    return out


def _article(family: str) -> str:
    from ..networks.names import FAMILY_LABELS
    return f"an {FAMILY_LABELS.get(family, family)} network"


@dataclass
class MergeReport:
    changed_keys: list[str] = field(default_factory=list)   # checkpoint keys whose tensors were replaced
    merged: dict[str, int] = field(default_factory=dict)    # input name -> modules merged
    skipped: dict[str, list[str]] = field(default_factory=dict)   # input name -> modules the model lacks
    zero_ratio: dict[str, int] = field(default_factory=dict)      # input name -> modules left out (ratio 0)


def _fit(delta: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    if delta.shape == target.shape:
        return delta
    if delta.numel() == target.numel():   # Linear <-> 1x1 conv (SD1 proj_in / proj_out)
        return delta.reshape(target.shape)
    raise ModelError(f"{name}: the network's update has shape {tuple(delta.shape)} but the model's layer has "
                     f"{tuple(target.shape)} (a network for another model?)")


@torch.no_grad()
def merge_into_state_dict(sd: MutableMapping[str, torch.Tensor], inputs: Sequence[LoraInput | Any], *,
                          merge_dtype: torch.dtype | str = torch.float32, out_dtype: torch.dtype | str | None = None,
                          backup: MutableMapping[str, torch.Tensor] | None = None, strict: bool = False,
                          sink=None, stop=None, _loaded: list[LoadedInput] | None = None,
                          model_name: str = "the model") -> MergeReport:
    """Merge the networks into an ldm state dict in place (see the module docstring).

    out_dtype: dtype of the changed tensors (None: each keeps its own). backup: receives the original tensor of
    every changed key (restore with sd.update(backup)). strict: a module the model lacks is an error instead of
    being reported in MergeReport.skipped. Nothing in `sd` changes if an error is raised.
    """
    ctx = ToolContext(sink, stop, "merge")
    merge_dtype, out_dtype = precision(merge_dtype, "precision"), precision(out_dtype, "save_precision")
    family = checkpoint_family(sd.keys())   # a clear error for diffusers-layout / LoRA files given as the model
    loaded = _loaded if _loaded is not None else load_inputs(inputs, ctx)
    for item in loaded:
        refuse_mismatch(item.lora.family, family, item.lora.name, model_name, guessed=item.lora.family_guessed)
    index = family_name_index(list(sd.keys()), family, lambda k: sd[k].dim())
    acc: dict[str, torch.Tensor] = {}
    report = MergeReport()
    total = sum(len(x.lora.modules) for x in loaded)
    done = 0
    ctx.progress("merge", 0, total)
    for item in loaded:
        label = item.lora.name
        merged = zero = 0
        missing: list[str] = []
        for name, w in item.modules().items():
            ctx.check_stop()
            done += 1
            factor = item.factor(name)
            if factor == 0.0:
                zero += 1
                continue
            keys = index.get(name)
            if keys is None:
                missing.append(name)
                continue
            base = rows(sd[keys.weight], keys.chunk)
            org = base.to(merge_dtype) if module_kind(w) == "ia3" else None
            own = update_shape(name, w)
            shape = tuple(base.shape) if own is None or math.prod(own) == base.numel() else own
            delta, dbias = module_update(name, w, org, shape=shape, dtype=merge_dtype)
            for key, d in ((keys.weight, delta), (keys.bias, dbias)):
                if d is None:
                    continue
                if key is None:
                    raise ModelError(f"{name}: the network changes a bias the model does not have")
                cur = acc.get(key)
                if cur is None:
                    cur = acc[key] = sd[key].to(merge_dtype).clone()
                part = rows(cur, keys.chunk)       # a view: q / k / v rows of a fused OpenCLIP weight
                part += factor * _fit(d, part, name).to(device=cur.device, dtype=merge_dtype)
            merged += 1
            if done % 16 == 0 or done == total:
                ctx.progress("merge", done, total)
        report.merged[label] = merged
        report.zero_ratio[label] = zero
        if missing:
            report.skipped[label] = missing
            if strict:
                raise ModelError(f"{label}: {len(missing)} modules are not in the model, e.g. {missing[:3]}")
            ctx.warn(f"{label}: {len(missing)} modules have no layer in the model and were skipped, "
                     f"e.g. {missing[:3]}")
        if merged == 0 and zero == 0:
            raise ModelError(f"{label}: none of its {len(item.lora.modules)} modules fits this model")
    ctx.progress("merge", total, total)
    for key, t in acc.items():
        if backup is not None and key not in backup:
            backup[key] = sd[key]
        sd[key] = t.to(out_dtype or sd[key].dtype)
        report.changed_keys.append(key)
    return report


@dataclass
class MergeResult:
    path: str
    sha256: str | None           # A1111 "sha256" of the written file
    legacy_hash: str | None      # A1111's old 8-hex model hash
    metadata: dict[str, str]
    report: MergeReport
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "legacy_hash": self.legacy_hash,
                "merged": self.report.merged, "skipped": {k: len(v) for k, v in self.report.skipped.items()},
                "zero_ratio": self.report.zero_ratio, "changed_tensors": len(self.report.changed_keys),
                "seconds": round(self.seconds, 3)}


def merge_into_checkpoint(sd_model: str | os.PathLike, inputs: Sequence[LoraInput | Any],
                          save_to: str | os.PathLike, *, merge_precision: str = "float",
                          save_precision: str | None = None, no_metadata: bool = False, overwrite: bool = False,
                          strict: bool = False, compute_hashes: bool = True, sink=None, stop=None) -> MergeResult:
    """Merge networks into the checkpoint file `sd_model` and write a new single-file checkpoint `save_to`.

    save_precision: float / fp16 / bf16 for every floating tensor; None keeps each tensor's dtype.
    Metadata: the input checkpoint's own keys, modelspec.* rewritten (title = output name, merged_from = the
    checkpoint's and the networks' titles) and lib_lora_train.inputs with each network's ratio and metadata.
    """
    from ..models.ckpt import file_hashes, read_checkpoint, read_safetensors_metadata, save_checkpoint

    t0 = time.time()
    ctx = ToolContext(sink, stop, "merge")
    specs = [s if isinstance(s, LoraInput) else LoraInput(s) for s in inputs]
    save_to = check_output(save_to, [sd_model] + [s.source for s in specs if isinstance(s.source, (str,
                                                                                                  os.PathLike))],
                           overwrite=overwrite)
    out_dtype = precision(save_precision, "save_precision")
    loaded = load_inputs(specs, ctx)
    from .checkpoint import CheckpointSource
    with CheckpointSource(sd_model) as head:       # the family from the keys, before reading any tensor
        family = checkpoint_family(head.keys)
    for item in loaded:
        refuse_mismatch(item.lora.family, family, item.lora.name, os.path.basename(os.fspath(sd_model)),
                        guessed=item.lora.family_guessed)
    ctx.log(f"reading {os.path.basename(os.fspath(sd_model))}")
    ctx.progress("load", 0, 1)
    sd = read_checkpoint(sd_model)
    ctx.progress("load", 1, 1)
    base_meta = read_safetensors_metadata(sd_model) if os.fspath(sd_model).lower().endswith(".safetensors") else {}
    report = merge_into_state_dict(sd, specs, merge_dtype=merge_precision, sink=sink, stop=stop, strict=strict,
                                   model_name=os.path.basename(os.fspath(sd_model)),
                                   _loaded=loaded)
    if out_dtype is not None:
        for k, t in sd.items():
            if t.is_floating_point() and t.dtype != out_dtype:
                sd[k] = t.to(out_dtype)
    meta: dict[str, str] = {}
    if not no_metadata:
        meta = {k: v for k, v in base_meta.items() if not k.startswith("modelspec.")}
        titles = [title_of(base_meta, os.fspath(sd_model))] + [x.lora.metadata.get("modelspec.title")
                                                                or title_of({}, x.lora.path) for x in loaded]
        v_pred = base_meta.get("modelspec.prediction_type") == "v" or "v_pred" in sd
        meta.update(checkpoint_modelspec(title=os.path.splitext(os.path.basename(save_to))[0],
                                         merged_from=", ".join(titles), v_pred=v_pred,
                                         family=family))
        records = [input_record(x.lora.path, x.lora.metadata, ratio=x.spec.ratio,
                                block_weights=list(x.weights) if x.weights else None, rank=x.spec.rank)
                   for x in loaded]
        meta.update(tool_metadata("merge", {"precision": merge_precision, "save_precision": save_precision,
                                            "base": os.path.basename(os.fspath(sd_model))}, records))
    ctx.check_stop()
    ctx.log(f"writing {save_to}")
    ctx.progress("save", 0, 1)
    save_checkpoint(save_to, sd, meta, overwrite=overwrite)
    ctx.progress("save", 1, 1)
    del sd
    sha = legacy = None
    if compute_hashes:
        ctx.progress("hash", 0, 1)
        h = file_hashes(save_to)
        sha, legacy = h.sha256, h.legacy
        ctx.progress("hash", 1, 1)
    return MergeResult(save_to, sha, legacy, meta, report, time.time() - t0)
