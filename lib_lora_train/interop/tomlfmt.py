"""A small TOML writer for flat option tables (strings, numbers, booleans, lists of them): no dependency."""
from __future__ import annotations

import json
import math
from typing import Any


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to TOML")
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)   # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


def table(values: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    lines = []
    for key, v in values.items():
        if v is None:
            continue
        line = f"{key} = {value(v)}"
        note = (comments or {}).get(key)
        if note:
            line += "  # " + note.replace("\n", " ")
        lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


def header(lines: list[str]) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in lines)
