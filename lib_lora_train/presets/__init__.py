"""Presets as data, one source for the tab, the command line and the HTTP API.

A preset is a table of sd-scripts options (built in: builtin.toml beside this file; users add `NAME.toml` files
to a presets folder) with per-family tables (`sd1`, `sd2`, `sdxl`). `preset = "character"` in a run TOML,
`--preset character` or `"preset": "character"` in an API config puts the preset's values under the explicit
keys (`expand_preset`, called by config.config_from_dict). Several presets apply in order:
`preset = ["character", "sdxl-8gb"]` or "character+sdxl-8gb". A family-qualified name ("sdxl-character")
picks the family; otherwise it comes from sdxl / v2 or the checkpoint's keys.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}
META_KEYS = ("description", "repeats", "families")
ENV_DIRS = "LORA_TRAIN_PRESETS"          # os.pathsep-separated folders of user presets
_BUILTIN = os.path.join(os.path.dirname(__file__), "builtin.toml")
_registered: list[str] = []             # folders hosts add (the tab's <data>/presets)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    common: dict[str, Any]
    per_family: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeats: int | None = None
    families: tuple[str, ...] = FAMILIES
    source: str = "built-in"             # "built-in" or the user file

    def describe(self, family: str = "sd1") -> str:
        return str(self.per_family.get(family, {}).get("description", self.description))

    def values(self, family: str = "sd1") -> dict[str, Any]:
        """The options of this preset for a model family."""
        if family not in self.families:
            raise ConfigError(f"preset '{self.name}' is for {', '.join(self.families)} models, not {family}")
        out = dict(self.common)
        out.update({k: v for k, v in self.per_family.get(family, {}).items() if k != "description"})
        return out


def _preset_from_table(name: str, table: dict[str, Any], source: str) -> Preset:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: preset '{name}' must be a table")
    common = {k: v for k, v in table.items() if k not in META_KEYS and not (k in FAMILIES and isinstance(v, dict))}
    per_family = {k: dict(v) for k, v in table.items() if k in FAMILIES and isinstance(v, dict)}
    families = table.get("families") or list(FAMILIES)
    if isinstance(families, str):
        families = [families]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ConfigError(f"{source}: preset '{name}': unknown families {bad}; use {', '.join(FAMILIES)}")
    _check_keys(name, source, common, *({k: v for k, v in t.items() if k != "description"}
                                          for t in per_family.values()))
    repeats = table.get("repeats")
    return Preset(name, str(table.get("description", "")), common, per_family,
                  int(repeats) if repeats is not None else None, tuple(families), source)


def _check_keys(name: str, source: str, *tables: dict[str, Any]) -> None:
    """Every key must be an option the config knows (the config's own check, with its closest-key hint)."""
    from ..config_schema import _FIELDS, UNSUPPORTED, _closest
    for t in tables:
        for key in t:
            k = key.replace("-", "_")
            if k not in _FIELDS and k not in UNSUPPORTED and k != "preset":
                raise ConfigError(f"{source}: preset '{name}': unknown option '{key}'{_closest(k)}")


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def builtin() -> dict[str, Preset]:
    return {name: _preset_from_table(name, table, "built-in") for name, table in _read(_BUILTIN).items()}


def register_dir(path: str) -> None:
    """A host's user-presets folder (the tab lists its presets; runs can name them)."""
    path = os.path.abspath(path)
    if path not in _registered:
        _registered.append(path)


def user_dirs(extra: list[str] | None = None) -> list[str]:
    env = [p for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p]
    out = []
    for p in list(extra or []) + env + _registered:
        p = os.path.abspath(p)
        if p not in out:
            out.append(p)
    return out


def load_user_presets(folder: str) -> dict[str, Preset]:
    """`NAME.toml` files of a folder: sd-scripts options at the top level, family tables, description."""
    out: dict[str, Preset] = {}
    if not os.path.isdir(folder):
        return out
    for fn in sorted(os.listdir(folder)):
        if fn.lower().endswith(".toml") and not fn.startswith("."):
            name = fn[:-5]
            path = os.path.join(folder, fn)
            out[name] = _preset_from_table(name, _read(path), path)
    return out


def all_presets(extra_dirs: list[str] | None = None) -> dict[str, Preset]:
    """Built-in presets, then the user folders' (a user preset of the same name replaces the built-in one)."""
    out = builtin()
    for folder in user_dirs(extra_dirs):
        out.update(load_user_presets(folder))
    return out


def split_names(spec: Any) -> list[str]:
    if spec is None or spec == "":
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).replace("+", ",").split(",")
    return [str(s).strip() for s in items if str(s).strip()]


def _family_from(values: dict[str, Any]) -> str:
    from ..config_schema import _coerce
    try:
        if values.get("sdxl") is not None and _coerce("sdxl", values["sdxl"]):
            return "sdxl"
        if values.get("v2") is not None and _coerce("v2", values["v2"]):
            return "sd2"
    except (ConfigError, KeyError):
        pass
    ckpt = values.get("pretrained_model_name_or_path")
    if ckpt and isinstance(ckpt, str) and os.path.isfile(ckpt):
        try:
            from ..models.detect import detect_checkpoint
            fam = detect_checkpoint(ckpt)[0]
            if fam in FAMILIES:
                return fam
        except Exception:   # noqa: BLE001 - an unreadable checkpoint is reported when the run loads it
            pass
    return "sd1"


def resolve(names: Any, family: str | None = None, *, values: dict[str, Any] | None = None,
            extra_dirs: list[str] | None = None) -> dict[str, Any]:
    """The merged options of one or more presets (later ones win) for a family (or the family `values` imply)."""
    presets = all_presets(extra_dirs)
    out: dict[str, Any] = {}
    for raw in split_names(names):
        name, fam = raw, family
        head, _, rest = raw.partition("-")
        if raw not in presets and head in FAMILIES and rest in presets:
            name, fam = rest, head
        if name not in presets:
            import difflib
            m = difflib.get_close_matches(name, list(presets), n=1)
            raise ConfigError(f"unknown preset '{raw}'" + (f"; did you mean '{m[0]}'?" if m else "")
                              + f" (presets: {', '.join(presets)})")
        fam = fam or _family_from(dict(values or {}, **out))
        out.update(presets[name].values(fam))
    return out


def expand_preset(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with its "preset" key replaced by the preset's options, explicit keys winning."""
    values = dict(values)
    names = values.pop("preset", None)
    base = resolve(names, values=values)
    base.update(values)
    return base


__all__ = ["Preset", "FAMILIES", "NATIVE_RESOLUTION", "builtin", "all_presets", "load_user_presets", "resolve",
           "expand_preset", "register_dir", "user_dirs", "split_names"]
