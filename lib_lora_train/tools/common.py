"""What every tool shares: progress events and interruption, precision names, output-path safety, metadata."""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from .. import __version__
from ..errors import ConfigError, Interrupted
from ..events import LOG, PROGRESS, WARNING, Event, EventSink  # noqa: F401 - PROGRESS re-exported

# Our own metadata keys on tool outputs (never ss_*: those enter sd-scripts' legacy hash).
META_TOOL = "lib_lora_train.tool"        # JSON {"tool", "version", "params"}
META_INPUTS = "lib_lora_train.inputs"    # JSON list, one entry per input: file, title, sshs_model_hash, ratio,
#                                          and "metadata" = that input's ss_* / modelspec.* (its training metadata)

_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass
class ToolContext:
    """Progress and interruption for one tool run: `sink(Event)` gets the events, `stop.set()` interrupts."""
    sink: EventSink | None = None
    stop: threading.Event | None = None
    tool: str = ""

    def emit(self, kind: str, **data: Any) -> None:
        if self.sink is not None:
            try:
                self.sink(Event(kind, {"tool": self.tool, **data}))
            except Exception:  # noqa: BLE001 - a broken display must not break the tool
                pass

    def progress(self, stage: str, done: int, total: int, message: str | None = None) -> None:
        self.emit(PROGRESS, stage=stage, done=done, total=total, message=message)

    def log(self, message: str) -> None:
        self.emit(LOG, message=message)

    def warn(self, message: str) -> None:
        self.emit(WARNING, message=message)

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted(f"{self.tool or 'tool'} stopped on request; nothing was written")

    def steps(self, stage: str, items: Iterable, total: int | None = None, every: int = 1):
        """Iterate items, checking for a stop and reporting progress."""
        items = list(items) if total is None else items
        total = len(items) if total is None else total
        self.progress(stage, 0, total)
        for i, item in enumerate(items, 1):
            self.check_stop()
            yield item
            if i % every == 0 or i == total:
                self.progress(stage, i, total)


def precision(name: str | torch.dtype | None, what: str = "precision") -> torch.dtype | None:
    """sd-scripts precision names (float / fp16 / bf16, also fp32 / float16 / bfloat16) -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key not in _PRECISIONS:
        raise ConfigError(f"{what} {name!r}: use float, fp16 or bf16")
    return _PRECISIONS[key]


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                 overwrite: bool = False, suffixes: tuple[str, ...] = (".safetensors",)) -> str:
    """The output path, refusing to overwrite any input (always) or an existing file (unless overwrite)."""
    if not path:
        raise ConfigError("no output file given (--save_to)")
    path = os.fspath(path)
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"the output {path} must be a {' / '.join(suffixes)} file")
    out = os.path.realpath(path)
    for p in inputs:
        if p is not None and isinstance(p, (str, os.PathLike)) and os.path.realpath(os.fspath(p)) == out:
            raise ConfigError(f"the output {path} is one of the inputs; inputs are never overwritten")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path} exists already (pass overwrite / --overwrite to replace it)")
    return path


def title_of(metadata: Mapping[str, str], path: str | None) -> str:
    """modelspec.title, else the file name without extension (sd-scripts' build_merged_from rule)."""
    title = metadata.get("modelspec.title")
    if title:
        return title
    return os.path.splitext(os.path.basename(path))[0] if path else "model"


def training_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """An input's ss_* and modelspec.* keys (not its sshs_* hashes, which belong to that file)."""
    return {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}


def input_record(path: str | None, metadata: Mapping[str, str], *, ratio: float | None = None,
                 keep_metadata: bool = True, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"file": os.path.basename(path) if path else None, "title": title_of(metadata, path),
                           "sshs_model_hash": metadata.get("sshs_model_hash")}
    if ratio is not None:
        rec["ratio"] = ratio
    rec.update({k: v for k, v in extra.items() if v is not None})
    if keep_metadata:
        rec["metadata"] = training_metadata(metadata)
    return rec


def tool_metadata(tool: str, params: Mapping[str, Any], inputs: list[dict[str, Any]]) -> dict[str, str]:
    return {META_TOOL: json.dumps({"tool": tool, "version": __version__, "params": dict(params)}, default=str),
            META_INPUTS: json.dumps(inputs, ensure_ascii=False, default=str)}


_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_SGM = "https://github.com/Stability-AI/generative-models"


def _arch(family: str, v_pred: bool) -> str:
    return "stable-diffusion-v2-768-v" if family == "sd2" and v_pred else _ARCH.get(family, _ARCH["sd1"])


def _resolution(family: str, v_pred: bool) -> str:
    n = 1024 if family == "sdxl" else 768 if family == "sd2" and v_pred else 512
    return f"{n}x{n}"


def lora_modelspec(*, title: str, timestamp: float | None = None, merged_from: str | None = None,
                   v_pred: bool = False, extra: Mapping[str, str | None] | None = None,
                   family: str = "sd1") -> dict[str, str]:
    """ModelSpec 1.0.1 keys of a LoRA written by a tool (sd-scripts' sai_model_spec values for the family: SDXL
    LoRAs name the sgm implementation, SD 1.x / 2.x ones diffusers; the family's native resolution)."""
    ts = time.time() if timestamp is None else timestamp
    spec = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": _arch(family, v_pred) + "/lora",
            "modelspec.implementation": _SGM if family == "sdxl" else "diffusers", "modelspec.title": title,
            "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
            "modelspec.resolution": _resolution(family, v_pred),
            "modelspec.prediction_type": "v" if v_pred else "epsilon",
            "modelspec.implementation_version": f"lib_lora_train/{__version__}"}
    if merged_from:
        spec["modelspec.merged_from"] = merged_from
    spec.update({k: v for k, v in (extra or {}).items() if v is not None})
    return spec


def checkpoint_modelspec(*, title: str, merged_from: str, v_pred: bool = False,
                         timestamp: float | None = None, family: str = "sd1") -> dict[str, str]:
    """ModelSpec keys of a merged checkpoint, as sd-scripts' merge_lora.py / sdxl_merge_lora.py write them."""
    spec = lora_modelspec(title=title, timestamp=timestamp, merged_from=merged_from, v_pred=v_pred, family=family)
    spec["modelspec.architecture"] = _arch(family, v_pred)
    spec["modelspec.implementation"] = _SGM
    return spec


def family_metadata(family: str, v_pred: bool = False) -> dict[str, str]:
    """ss_v2 / ss_base_model_version of a LoRA for a family (sd-scripts' values)."""
    from ..models.bundle import base_model_version
    return {"ss_v2": str(family == "sd2"), "ss_base_model_version": base_model_version(family, v_pred)}


@dataclass
class LoraResult:
    """A LoRA made by a tool: its file tensors, metadata, hashes, and a report per module."""
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[dict[str, Any]]            # one entry per module: name, rank, retained energy, ...
    summary: dict[str, Any]
    path: str | None = None
    hashes: dict[str, str] | None = None     # sshs_model_hash / sshs_legacy_hash of the written file
    seconds: float = 0.0

    def to_json(self, modules: bool = True) -> dict[str, Any]:
        out = {"path": self.path, **(self.hashes or {}), "summary": self.summary, "seconds": round(self.seconds, 3)}
        if modules:
            out["modules"] = self.modules
        return out


def cast_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to dtype (None: float32, sd-scripts' default save precision for its LoRA tools)."""
    dtype = dtype or torch.float32
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def save_lora(result: LoraResult, save_to: str, *, overwrite: bool = False) -> LoraResult:
    """Write the result atomically with fresh sshs_* hashes (networks.io.save_network_file)."""
    from ..networks.io import save_network_file

    result.hashes = save_network_file(save_to, result.tensors, result.metadata, overwrite=overwrite)
    result.metadata.update(result.hashes)
    result.path = save_to
    return result


def minimum_network_metadata(sources: list[Mapping[str, str]], dim: str, alpha: str,
                             network_args: Mapping[str, Any] | None) -> dict[str, str]:
    """sd-scripts' build_minimum_network_metadata, with v2 / base version from the first input having them."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    for key in ("ss_v2", "ss_base_model_version"):
        value = next((m[key] for m in sources if m.get(key)), None)
        if value is not None:
            meta[key] = value
    if network_args:
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    return meta


def merged_tag_frequency(sources: list[Mapping[str, str]]) -> str | None:
    """The inputs' ss_tag_frequency combined (counts added per folder and tag), for the WebUI's tag list."""
    merged: dict[str, dict[str, int]] = {}
    for meta in sources:
        try:
            freq = json.loads(meta.get("ss_tag_frequency") or "{}")
        except ValueError:
            continue
        if not isinstance(freq, dict):
            continue
        for folder, tags in freq.items():
            if isinstance(tags, dict):
                slot = merged.setdefault(str(folder), {})
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        slot[str(tag)] = slot.get(str(tag), 0) + int(n)
    return json.dumps(merged, ensure_ascii=False) if merged else None


def dims_label(values: Iterable[float], *, alpha: bool = False) -> str:
    """The common value as sd-scripts writes it (a rank "8", an alpha "8.0"), or "Dynamic" if modules differ."""
    vals = {float(v) for v in values}
    if len(vals) != 1:
        return "Dynamic"
    v = vals.pop()
    return str(v) if alpha or not v.is_integer() else str(int(v))
