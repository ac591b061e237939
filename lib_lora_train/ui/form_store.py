"""What a user typed, kept on the server so a page reload (or another browser) shows it again.

    <project>/ui_form.json              the project's form: parameters, preprocess and tagger options
    <projects>/.lora_train_ui.json      which project was open last (a hidden name: never a project's name)
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..fsutil import atomic_write_json

FORM_FILE = "ui_form.json"
UI_STATE_FILE = ".lora_train_ui.json"
FORM_VERSION = 1


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_form(project_root: str) -> dict[str, Any]:
    """The saved values ({} when none or unreadable: the form falls back to its defaults)."""
    data = _read(os.path.join(project_root, FORM_FILE))
    values = data.get("values")
    return dict(values) if isinstance(values, dict) else {}


def save_form(project_root: str, values: dict[str, Any]) -> None:
    """Merge `values` into the saved form (atomic; other keys are kept)."""
    path = os.path.join(project_root, FORM_FILE)
    merged = load_form(project_root)
    merged.update({k: _plain(v) for k, v in values.items()})
    atomic_write_json(path, {"version": FORM_VERSION, "values": merged})


def _plain(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def last_project(projects_root: str) -> str | None:
    name = _read(os.path.join(projects_root, UI_STATE_FILE)).get("project")
    return name if isinstance(name, str) and name else None


def set_last_project(projects_root: str, name: str | None) -> None:
    os.makedirs(projects_root, exist_ok=True)
    atomic_write_json(os.path.join(projects_root, UI_STATE_FILE), {"project": name})
