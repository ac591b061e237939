"""sd-scripts-named options from any source -> this engine's config, one report entry per source field.

The format readers (kohya_json, lora_scripts, sd_toml) turn their fields into sd-scripts options and call
`Translator.arg`; what the config (lib_lora_train/config.py) accepts is read from the config itself, so an
option the training stream adds later is carried over without a change here.
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from .. import config as cfgmod
from ..errors import ConfigError
from .report import Report
from .sdnames import NO_EFFECT, SD_SCRIPTS_OPTIONS, SDXL_ONLY_OPTIONS, ZERO_IS_OFF

FAMILIES = ("sd1", "sd2", "sdxl")
# sd-scripts defaults that differ from this engine's: a source that leaves them out meant sd-scripts' value.
SD_SCRIPTS_DEFAULTS = {"caption_extension": ".caption", "learning_rate": 2e-6}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _zero(value: Any) -> bool:
    if isinstance(value, bool):
        return value is False
    try:
        return float(str(value).strip()) == 0.0
    except ValueError:
        return False


def _falsy(value: Any) -> bool:
    return _empty(value) or _zero(value) or (isinstance(value, str) and value.strip().lower() in ("false", "no"))


def closest_option(key: str) -> str | None:
    names = sorted(set(cfgmod._FIELDS) | SD_SCRIPTS_OPTIONS)
    m = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return m[0] if m else None


def _round8(text: str) -> list[int] | None:
    try:
        return [int(p) for p in str(text).replace("x", ",").split(",") if p.strip()]
    except ValueError:
        return None


def _fix_value(key: str, value: Any) -> tuple[Any, str] | None:
    """Values sd-scripts accepts but this engine refuses, where the intent is clear: (new value, why)."""
    if key == "bucket_reso_steps" and not _empty(value):
        try:
            steps = int(float(value))
        except (TypeError, ValueError):
            return None
        if steps > 0 and steps % 8:
            new = max(8, steps - steps % 8)
            return new, (f"sd-scripts takes {steps} but then makes buckets whose sides are not multiples of 8, which "
                         f"the VAE cannot map to latents exactly; {new} is the nearest step that can")
    if key == "resolution" and not _empty(value) and not isinstance(value, (list, tuple)):
        sides = _round8(value)
        if sides and all(s >= 64 for s in sides) and any(s % 8 for s in sides):
            new = ",".join(str(s - s % 8) for s in sides)
            return new, ("sides must be multiples of 8 (the VAE's factor); rounded down, as sd-scripts rounds its "
                         "buckets")
    return None


class Translator:
    def __init__(self, report: Report):
        self.report = report
        self.values: dict[str, Any] = {}
        self.seen: set[str] = set()          # sd-scripts keys the source set (even to "unset")

    # ---------------------------------------------------------------- direct entries
    def ignore(self, field: str, value: Any, why: str) -> None:
        self.report.add(field, "ignored", value, why=why)

    def unsupported(self, field: str, value: Any, why: str, *, blocking: bool = False) -> None:
        self.report.add(field, "unsupported", value, why=why, blocking=blocking)

    def error(self, field: str, value: Any, why: str) -> None:
        self.report.add(field, "error", value, why=why, blocking=True)

    def _coerce(self, key: str, value: Any) -> Any:
        return cfgmod._coerce(key, value)

    def set(self, field: str, old: Any, new: dict[str, Any], why: str, *, changed: bool = True) -> bool:
        """Set our keys directly (values are checked with the config's own coercion)."""
        done: dict[str, Any] = {}
        for key, value in new.items():
            try:
                done[key] = None if value is None else self._coerce(key, value)
            except ConfigError as exc:
                self.error(field, old, str(exc))
                return False
        for key, value in done.items():
            self.seen.add(key)
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
        self.report.add(field, "changed" if changed else "carried", old, done, why)
        return True

    # ---------------------------------------------------------------- one sd-scripts option
    def arg(self, field: str, key: str, value: Any, why: str = "") -> None:
        """`field` of the source holds sd-scripts option `key` = `value`."""
        key = cfgmod.ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        family = self.report.family
        if family not in FAMILIES and key not in cfgmod._FIELDS and key not in SD_SCRIPTS_OPTIONS:
            self.unsupported(field, value, f"an option of {family} training")
            return
        if key in ("use_8bit_adam", "use_lion_optimizer") and not _falsy(value):
            name = "AdamW8bit" if key == "use_8bit_adam" else "Lion"
            self.set(field, value, {"optimizer_type": name}, f"sd-scripts' old switch for optimizer_type {name}")
            return
        fixed = _fix_value(key, value)
        if fixed is not None:
            self.set(field, value, {key: fixed[0]}, fixed[1])
            return
        if key in SDXL_ONLY_OPTIONS and family != "sdxl" and not _falsy(value):
            self.ignore(field, value, f"an SDXL option; sd-scripts' train_network.py ({family}) does not read it")
            return
        if key in ("xformers", "sdpa", "mem_eff_attn"):   # speed only, and xformers may be absent here
            self.ignore(field, value, NO_EFFECT[key])
            return
        if key in cfgmod._FIELDS:
            self.seen.add(key)
            if _empty(value) or (key in ZERO_IS_OFF and _falsy(value)):
                self.values.pop(key, None)
                off = "empty" if _empty(value) else "0"
                self.report.add(field, "carried", value, {key: None},
                                why or f"{off} means unset in sd-scripts; the default applies")
                return
            try:
                coerced = self._coerce(key, value)
            except ConfigError as exc:
                self.error(field, value, str(exc))
                return
            self.values[key] = coerced
            self.report.add(field, "changed" if why else "carried", value,
                            {key: coerced} if (key != field or coerced != value) else None, why)
            return
        if key in NO_EFFECT:
            self.ignore(field, value, NO_EFFECT[key])
            return
        if key in cfgmod.UNSUPPORTED or key in SD_SCRIPTS_OPTIONS:
            if _falsy(value):
                self.ignore(field, value, "off; not used by this engine either")
            else:
                self.unsupported(field, value, cfgmod.UNSUPPORTED.get(key, "an sd-scripts option this engine "
                                                                          "does not implement") +
                                 "; the run here goes without it")
            return
        hint = closest_option(key)
        self.error(field, value, "not an sd-scripts option (sd-scripts silently ignores unknown keys in a config "
                                 "file)" + (f"; did you mean '{hint}'?" if hint else ""))

    # ---------------------------------------------------------------- the end
    def source_defaults(self, defaults: dict[str, Any], source: str) -> None:
        """Options the source left out, where its default differs from this engine's."""
        for key, value in defaults.items():
            if key not in self.seen and key in cfgmod._FIELDS:
                self.set(f"({key} not set)", None, {key: value},
                         f"{source}'s default; this engine's default differs")

    def finish(self) -> dict[str, Any]:
        """Validate the result with the config's own checks; the report says why a run cannot start."""
        rep = self.report
        if rep.family in FAMILIES:
            flag = {"sd2": "v2", "sdxl": "sdxl"}.get(rep.family)
            if flag and flag in cfgmod._FIELDS and not self.values.get(flag):
                self.values[flag] = True
        rep.config = dict(self.values)
        probe = dict(self.values)
        try:
            cfg = cfgmod.config_from_dict(probe)
            from ..networks.config import check_run_network_options
            check_run_network_options(cfg)
        except ConfigError as exc:
            rep.validation_error = f"the config's own validation: {exc}"
        ckpt = str(self.values.get("pretrained_model_name_or_path") or "")
        if ckpt and not ckpt.lower().endswith((".safetensors", ".ckpt")) and not os.path.isfile(ckpt):
            rep.notes.append(f"pretrained_model_name_or_path {ckpt!r} looks like a Hugging Face id or a diffusers "
                             f"folder: this engine reads single .safetensors / .ckpt files, offline")
        for key, what in (("pretrained_model_name_or_path", "the base checkpoint"),
                          ("train_data_dir", "the training images")):
            if not self.values.get(key) and not (key == "train_data_dir" and self.values.get("dataset_config")):
                rep.notes.append(f"{key} is not set: give {what} on the command line or in the file "
                                 f"(the tab and the API take it from the loaded model / the project)")
        return rep.config
