"""Inspect a network file (any trainer's key convention) and edit its user-facing metadata.

Shows: key convention, base model, module types / ranks / alphas, per-module update norm ||ΔW||_F (with its
alpha / rank scale) flagged "untrained" (zero), "non-finite" or "exploded" (above EXPLODED_FACTOR × the median
norm of the modules of its type), training metadata (ss_*, modelspec.*), top tags, and the hash check:
sshs_model_hash must equal the sha256 of the file's tensor data (the WebUI's addnet hash), sshs_legacy_hash the
old additional-networks hash of the tensors serialised with the ss_* metadata (sd-scripts' rule). LyCORIS
writes "0x…" per-tensor hashes of another kind; those are reported as not comparable.
"""
from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from .blocks import LBW26, lbw_index
from .formats import LoraFile, normalise
from .modules import lora_factors, module_alpha, module_kind, module_rank, module_update, type_label, update_shape

EXPLODED_FACTOR = 25.0
_LONG_KEYS = ("ss_tag_frequency", "ss_datasets", "ss_bucket_info", "ss_dataset_dirs", "ss_reg_dataset_dirs",
              "lib_lora_train.inputs")


@dataclass
class ModuleReport:
    name: str
    part: str                 # unet | text_encoder | other
    block: str                # LBW block (BASE, IN01, ..., OUT11) or "-"
    type: str                 # LoRA, LoCon, LoHa, LoKr, IA3, Full, ...
    rank: int | None
    alpha: float | None
    shape: list[int] | None
    dtype: str
    norm: float | None        # ||ΔW||_F including alpha / rank (IA3: norm of the scale vector)
    flags: list[str] = field(default_factory=list)


@dataclass
class Inspection:
    path: str | None
    file_size: int | None
    convention: str
    family: str
    base_model_version: str | None
    network_module: str | None
    network_dim: str | None
    network_alpha: str | None
    network_args: Any
    title: str | None
    trigger_phrase: str | None
    description: str | None
    modules: list[ModuleReport]
    types: dict[str, int]
    ranks: dict[str, int]
    alphas: dict[str, int]
    parts: dict[str, int]
    blocks: dict[str, int]
    top_tags: list[tuple[str, int]]
    hash: dict[str, Any]
    metadata: dict[str, str]
    unknown_keys: list[str]
    warnings: list[str]

    def to_json(self, modules: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not modules:
            out.pop("modules")
        return out


def _norm(name: str, w) -> float | None:
    kind = module_kind(w)
    if kind == "ia3":
        return float(w["weight"].float().norm())
    if kind == "dora":
        return None
    f = lora_factors(w)
    if f is not None:   # ||up·down||² = Σ (upᵀup) ∘ (down downᵀ): no need to form the product
        up, down, scale = f
        gram = (up.double().t() @ up.double()) * (down.double() @ down.double().t())
        return float(gram.sum().clamp_min(0).sqrt()) * abs(scale)
    delta, bias = module_update(name, w, shape=update_shape(name, w))
    return float(delta.norm())


def _part(name: str) -> str:
    if name.startswith("lora_unet_"):
        return "unet"
    if name.startswith("lora_te"):
        return "text_encoder"
    return "other"


def _top_tags(meta: dict[str, str], n: int) -> list[tuple[str, int]]:
    counts: Counter = Counter()
    sources = []
    try:
        if meta.get("ss_tag_frequency"):
            sources.append(json.loads(meta["ss_tag_frequency"]))
        elif meta.get("ss_datasets"):
            sources += [d.get("tag_frequency", {}) for d in json.loads(meta["ss_datasets"]) if isinstance(d, dict)]
    except ValueError:
        return []
    for freq in sources:
        if isinstance(freq, dict):
            for tags in freq.values():
                if isinstance(tags, dict):
                    for tag, c in tags.items():
                        if isinstance(c, (int, float)):
                            counts[str(tag).strip()] += int(c)
    return counts.most_common(n)


def check_hashes(path: str, raw: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    from ..networks.io import addnet_hash, network_hashes

    stored, stored_legacy = meta.get("sshs_model_hash"), meta.get("sshs_legacy_hash")
    actual = addnet_hash(path)
    out: dict[str, Any] = {"addnet_hash": actual, "stored_model_hash": stored, "stored_legacy_hash": stored_legacy}
    if stored is None:
        out["status"] = "missing"
    elif stored.startswith("0x"):
        out["status"] = "lycoris-format (not comparable; rewrite the metadata to get sd-scripts hashes)"
    else:
        legacy = network_hashes(raw, meta)[1]
        out["legacy_hash"] = legacy
        model_ok = stored == actual
        legacy_ok = stored_legacy is None or stored_legacy == legacy
        out["model_hash_ok"], out["legacy_hash_ok"] = model_ok, legacy_ok
        out["status"] = "ok" if model_ok and legacy_ok else "MISMATCH"
    return out


def inspect_lora(source, *, norms: bool = True, top_tags: int = 20, check_hash: bool = True) -> Inspection:
    """Inspection of a network file (path) or of raw tensors / a LoraFile (no hash check then)."""
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    raw: dict[str, torch.Tensor] | None = None
    if path is not None:
        from ..networks.io import read_network_file
        if not path.lower().endswith(".safetensors"):
            raise ConfigError(f"{path}: inspect reads .safetensors network files")
        raw, meta = read_network_file(path)
        lora = normalise(raw, meta, path=path)
    elif isinstance(source, LoraFile):
        lora = source
    else:
        lora = normalise(source)
    meta = lora.metadata
    reports: list[ModuleReport] = []
    for name, w in lora.modules.items():
        try:
            label = type_label(w)
        except Exception as e:  # noqa: BLE001 - show what we can of odd modules
            reports.append(ModuleReport(name, _part(name), "-", f"unknown ({e})", None, None, None, "-", None))
            continue
        shape = update_shape(name, w)
        idx = lbw_index(name) if lora.family in ("sd1", "sd2", "sdxl") else None
        first = next(iter(w.values()))
        rep = ModuleReport(name, _part(name), LBW26[idx] if idx is not None else "-", label, module_rank(w),
                           module_alpha(w), list(shape) if shape else None, str(first.dtype).replace("torch.", ""),
                           None)
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in w.values()):
            rep.flags.append("non-finite")
        elif norms:
            rep.norm = _norm(name, w)
            if rep.norm == 0.0:
                rep.flags.append("untrained")
        reports.append(rep)
    _flag_exploded(reports)
    warnings = []
    if lora.unknown_keys:
        warnings.append(f"{len(lora.unknown_keys)} keys are not network tensors, e.g. {lora.unknown_keys[:3]}")
    for flag in ("untrained", "exploded", "non-finite"):
        n = sum(flag in r.flags for r in reports)
        if n:
            warnings.append(f"{n} modules {flag}")
    try:
        args = json.loads(meta["ss_network_args"]) if meta.get("ss_network_args") else None
    except ValueError:
        args = meta.get("ss_network_args")
    hashes = check_hashes(path, raw, meta) if (check_hash and path is not None) else {"status": "not checked"}
    if hashes.get("status") == "MISMATCH":
        warnings.append("the stored hashes do not match the file (edited after saving?)")
    return Inspection(
        path=path, file_size=os.path.getsize(path) if path else None, convention=lora.convention,
        family=lora.family, base_model_version=meta.get("ss_base_model_version") or _guess_version(lora.family),
        network_module=meta.get("ss_network_module"), network_dim=meta.get("ss_network_dim"),
        network_alpha=meta.get("ss_network_alpha"), network_args=args, title=meta.get("modelspec.title"),
        trigger_phrase=meta.get("modelspec.trigger_phrase"), description=meta.get("modelspec.description"),
        modules=reports, types=dict(Counter(r.type for r in reports)),
        ranks={str(k): v for k, v in Counter(r.rank for r in reports).items()},
        alphas={str(k): v for k, v in Counter(r.alpha for r in reports).items()},
        parts=dict(Counter(r.part for r in reports)), blocks=dict(Counter(r.block for r in reports)),
        top_tags=_top_tags(meta, top_tags), hash=hashes, metadata=dict(meta), unknown_keys=lora.unknown_keys,
        warnings=warnings)


def _guess_version(family: str) -> str | None:
    return {"sd1": "sd_v1 (guessed from the keys)", "sd2": "sd_v2 (guessed from the keys)",
            "sdxl": "sdxl_base_v1-0 (guessed from the keys)"}.get(family)


def _flag_exploded(reports: list[ModuleReport]) -> None:
    by_type: dict[str, list[float]] = {}
    for r in reports:
        if r.norm:
            by_type.setdefault(r.type, []).append(r.norm)
    for r in reports:
        vals = by_type.get(r.type, [])
        if r.norm and len(vals) >= 4 and r.norm > EXPLODED_FACTOR * statistics.median(vals):
            r.flags.append("exploded")


def format_inspection(ins: Inspection, *, modules: bool = False) -> str:
    """A human-readable summary (the CLI's `inspect` output without --json)."""
    lines = [f"file:        {ins.path}  ({ins.file_size or 0:,} bytes)", f"convention:  {ins.convention}",
             f"base model:  {ins.base_model_version} ({ins.family})",
             f"network:     {ins.network_module}  dim {ins.network_dim}  alpha {ins.network_alpha}"
             + (f"  args {ins.network_args}" if ins.network_args else ""),
             f"title:       {ins.title}", f"trigger:     {ins.trigger_phrase}"]
    if ins.description:
        lines.append(f"description: {ins.description}")
    lines += [f"modules:     {len(ins.modules)}  {dict(ins.parts)}", f"types:       {ins.types}",
              f"ranks:       {ins.ranks}", f"alphas:      {ins.alphas}",
              f"blocks:      " + ", ".join(f"{b}:{n}" for b, n in ins.blocks.items())]
    normed = [r.norm for r in ins.modules if r.norm is not None]
    if normed:
        lines.append(f"update norm: min {min(normed):.4g}  median {statistics.median(normed):.4g}  "
                     f"max {max(normed):.4g}")
    lines.append(f"hash:        {ins.hash.get('status')}  (stored {ins.hash.get('stored_model_hash')}, "
                 f"file {ins.hash.get('addnet_hash')})")
    if ins.top_tags:
        lines.append("top tags:    " + ", ".join(f"{t} ({n})" for t, n in ins.top_tags))
    lines.append("metadata:")
    for k in sorted(ins.metadata):
        v = ins.metadata[k]
        if k in _LONG_KEYS or len(v) > 200:
            v = v[:120] + f"... ({len(v)} chars)"
        lines.append(f"  {k} = {v}")
    for w in ins.warnings:
        lines.append(f"warning: {w}")
    if modules:
        lines.append("modules:")
        for r in ins.modules:
            norm = "-" if r.norm is None else f"{r.norm:.4g}"
            lines.append(f"  {r.name:70s} {r.block:5s} {r.type:12s} rank {r.rank} alpha {r.alpha} norm {norm}"
                         + (f"  [{', '.join(r.flags)}]" if r.flags else ""))
    return "\n".join(lines)


def edit_metadata(path: str | os.PathLike, *, title: str | None = None, trigger_words: str | None = None,
                  description: str | None = None, save_to: str | os.PathLike | None = None, in_place: bool = False,
                  overwrite: bool = False) -> dict[str, str]:
    """Set modelspec.title / trigger_phrase / description (None: unchanged, "": removed) and rewrite the
    sshs_* hashes, atomically, to save_to, or over the input itself only with in_place=True. Returns the
    written metadata."""
    from ..networks.io import read_network_file, save_network_file

    path = os.fspath(path)
    if save_to is None and not in_place:
        raise ConfigError("give an output file (--save_to) or ask for in-place editing explicitly (--in_place)")
    if save_to is not None and in_place:
        raise ConfigError("give either save_to or in_place, not both")
    target = path if in_place else os.fspath(save_to)
    if not in_place:
        if os.path.realpath(target) == os.path.realpath(path):
            raise ConfigError("save_to is the input file; use in_place to edit it in place")
        if os.path.exists(target) and not overwrite:
            raise ConfigError(f"{target} exists already (pass overwrite to replace it)")
    tensors, meta = read_network_file(path)
    for key, value in (("modelspec.title", title), ("modelspec.trigger_phrase", trigger_words),
                       ("modelspec.description", description)):
        if value is None:
            continue
        if value == "":
            meta.pop(key, None)
        else:
            meta[key] = value
    for k in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(k, None)
    hashes = save_network_file(target, tensors, meta, overwrite=in_place or overwrite)
    meta.update(hashes)
    return meta
