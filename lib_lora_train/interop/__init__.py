"""Bring settings in and take runs out: lora-scripts train.ps1 / train.sh, sd-scripts --config_file TOML and
kohya_ss GUI JSON -> this engine's config with a report of every field; a run -> sd-scripts' TOML + command.

    result = import_settings("train.ps1")       # ImportResult(config, report, extra_files)
    result.report.text(); result.report.can_start; result.toml()
"""
from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .. import config as cfgmod
from .report import Report
from .translate import Translator

FORMATS = ("kohya_ss GUI JSON", "lora-scripts train.ps1", "lora-scripts train.sh", "sd-scripts TOML",
           "lora-scripts TOML")


@dataclass
class ImportResult:
    config: dict[str, Any]
    report: Report
    extra_files: dict[str, str] = field(default_factory=dict)   # {file name: text}, written beside the TOML

    def toml(self, extra_names: dict[str, str] | None = None) -> str:
        """Our run TOML; `extra_names` renames the extra files (their config values follow)."""
        from .tomlfmt import header, table
        values = dict(self.config)
        for old, new in (extra_names or {}).items():
            for k, v in values.items():
                if v == old:
                    values[k] = new
        order = [f for f in cfgmod._FIELDS if f in values] + [k for k in values if k not in cfgmod._FIELDS]
        rep = self.report
        head = [f"Imported by `python -m lib_lora_train import` from {os.path.basename(rep.source)} "
                f"({rep.format}), model family {rep.family}.",
                "Every field of the source is listed in the import report; keys use sd-scripts' names."]
        head += [f"note: {n}" for n in rep.notes]
        return header(head) + table({k: values[k] for k in order})


def _fail(path: str, fmt: str, why: str, field_: str = "file") -> ImportResult:
    rep = Report(os.path.abspath(path) if path else "(text)", fmt, family="unknown")
    rep.add(field_, "error", None, why=why)
    return ImportResult({}, rep)


def _sniff(name: str, raw: bytes) -> str:
    lower = name.lower()
    text = raw[:4096].decode("utf-8", "replace")
    if lower.endswith(".ps1"):
        return "ps1"
    if lower.endswith(".sh") or lower.endswith(".bash"):
        return "sh"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith(".toml"):
        return "toml"
    s = text.lstrip("\ufeff \t\r\n")
    if s.startswith("{") or s.startswith("["):
        return "json" if s.startswith("{") else "toml"
    if "$pretrained_model" in text:
        return "ps1"
    if text.startswith("#!") or "pretrained_model=" in text:
        return "sh"
    return "toml"


def import_settings(path: str | None = None, *, data: bytes | None = None, name: str | None = None) -> ImportResult:
    """Read a settings file (or its bytes, e.g. an upload) and translate it. Never raises for bad input: the
    report says what is wrong (`report.can_start` is False)."""
    name = name or (os.path.basename(path) if path else "upload")
    source = os.path.abspath(path) if path else name
    if data is None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return _fail(source, "unreadable", f"cannot read the file: {exc.strerror or exc}")
    if b"\x00" in data[:4096]:
        return _fail(source, "binary file", "a binary file (a model or an image?), not a settings file; this reads "
                                            "kohya_ss .json, lora-scripts train.ps1 / train.sh and sd-scripts .toml")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _fail(source, "unreadable", f"not UTF-8 text: {exc}")
    kind = _sniff(name, data)
    source_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    if kind == "json":
        return _import_json(source, text)
    if kind in ("ps1", "sh"):
        return _import_script(source, text, kind, source_dir)
    return _import_toml(source, text, source_dir)


def _open_at_end(text: str) -> bool:
    """Whether a string, object or list is still open at the end of the text (a cut-off file)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            esc = ch == "\\" and not esc
            if ch == '"' and not esc:
                in_str = False
        elif ch == '"':
            in_str, esc = True, False
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_str or depth > 0


def _import_json(source: str, text: str) -> ImportResult:
    from . import kohya_json
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        end = "the file ends early (truncated?)" if _open_at_end(text) else "invalid JSON"
        return _fail(source, "JSON", f"{end}: {exc.msg} at line {exc.lineno}, column {exc.colno}")
    if not isinstance(data, dict):
        return _fail(source, "JSON", "the top level is not an object: not a kohya_ss configuration")
    if "datasets" in data and "LoRA_type" not in data:
        return _fail(source, "dataset_config JSON", "a dataset_config file (the datasets, not the training "
                                                    "options): name it as dataset_config in a training config")
    known = {"LoRA_type", "max_resolution", "optimizer", "train_data_dir", "pretrained_model_name_or_path",
             "network_dim", "learning_rate", "epoch", "save_precision"}
    if len(known & set(data)) < 2:
        hint = ""
        if "concepts" in data or "model_type" in data and "training_method" in data:
            hint = " (it looks like a OneTrainer configuration)"
        return _fail(source, "JSON", "not a kohya_ss LoRA configuration: none of its fields (LoRA_type, "
                                     f"max_resolution, optimizer, ...) are there{hint}")
    rep = Report(source, "kohya_ss GUI JSON", family=kohya_json.family_of(data))
    t = Translator(rep)
    extra = kohya_json.read(data, t)
    return ImportResult(t.finish(), rep, extra)


def _import_script(source: str, text: str, kind: str, source_dir: str) -> ImportResult:
    from . import lora_scripts
    fmt = f"lora-scripts train.{kind}"
    if kind == "ps1" and "$pretrained_model" not in text and "accelerate" not in text:
        return _fail(source, "PowerShell script", "not a lora-scripts train.ps1 (no $pretrained_model variable, "
                                                  "no accelerate launch)")
    rep = Report(source, fmt)
    t = Translator(rep)
    try:
        lora_scripts.read(text, t, ps=kind == "ps1", source_dir=source_dir)
    except lora_scripts.ScriptSyntaxError as exc:
        return _fail(source, fmt, str(exc), "script")
    return ImportResult(t.finish(), rep)


def _import_toml(source: str, text: str, source_dir: str) -> ImportResult:
    from . import sd_toml
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return _fail(source, "TOML", f"not valid TOML: {exc}")
    if "datasets" in data or "general" in data and not any(isinstance(v, dict) and k != "general"
                                                           for k, v in data.items()):
        return _fail(source, "dataset_config TOML", "a dataset_config file (the datasets, not the training "
                                                    "options): name it as dataset_config in a training config")
    preset = isinstance(data.get("metadata"), dict) and isinstance(data.get("data"), dict)
    flat = {k for _, k, _ in sd_toml.flatten(data)}
    lora_scripts = preset or bool(flat & {"model_train_type", "lr_restart_cycles"})
    from .sdnames import SD_SCRIPTS_OPTIONS
    if not preset and not (flat & (SD_SCRIPTS_OPTIONS | set(cfgmod._FIELDS))):
        return _fail(source, "TOML", "none of its keys is an sd-scripts option: not a training configuration "
                                     "this importer reads")
    fmt = "lora-scripts preset TOML" if preset else "lora-scripts TOML" if lora_scripts else "sd-scripts TOML"
    rep = Report(source, fmt, family=sd_toml.family_of(data))
    t = Translator(rep)
    extra = sd_toml.read(data, t, source_dir=source_dir, lora_scripts=preset)
    if preset:
        rep.notes.append("a preset holds only the options it changes; the rest keep their defaults")
    return ImportResult(t.finish(), rep, extra)
