"""Names that come from outside (HTTP API, uploads): refused unless they are plain, portable file names.

A name is taken exactly as given, never cleaned up: a name that only differs from an existing one by whitespace,
control characters, case or Unicode form is refused with the reason instead of being mapped onto it.
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Iterable

from .errors import ConfigError

MAX_NAME_BYTES = 200           # under every file system's 255, with room for suffixes like -000001.safetensors
FORBIDDEN = set('/\\:*?"<>|\0')
# slashes that NFKC leaves alone but that read as one: a name showing "a/b" is refused like "a/b"
LOOKALIKE_SLASHES = set("\u2215\u2044\u29f8\u29f5\u2216\u29f9\u2571\u2572\u27cb\u27cd")
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)$", re.IGNORECASE)


def _problem(name: object) -> str | None:
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    for ch in name:
        cat = unicodedata.category(ch)
        if cat.startswith("C"):
            return f"contains the control or invisible character U+{ord(ch):04X}"
        if cat.startswith("Z") and ch != " ":
            return f"contains the unusual space U+{ord(ch):04X}"
    if name != name.strip():
        return "starts or ends with a space"
    if unicodedata.normalize("NFC", name) != name:
        return "is not in Unicode normal form C (it would look like another name)"
    folded = unicodedata.normalize("NFKC", name)
    bad = sorted({c for c in name + folded if c in FORBIDDEN or c in LOOKALIKE_SLASHES})
    if bad:
        shown = ' '.join(repr(c) for c in bad)
        return f"contains {shown} (directly or as a look-alike character)"
    if folded in (".", "..") or folded.startswith("."):
        return "starts with a dot"
    if folded.endswith((".", " ")):
        return "ends with a dot or space (Windows drops them)"
    if _RESERVED.match(folded.split(".", 1)[0].rstrip(" ")):
        return "is a reserved device name on Windows"
    return None


def check_name(name: object, what: str = "name", *, existing: Iterable[str] = ()) -> str:
    """`name` unchanged when it is a plain, portable name; ConfigError naming `what` and the reason otherwise.
    `existing`: names it must not collide with by case or Unicode look-alikes (an exact match is fine)."""
    problem = _problem(name)
    if problem:
        raise ConfigError(f"{what}: {name!r} {problem}; use letters, digits, spaces, '-', '_' or '.'")
    key = _fold(name)  # type: ignore[arg-type]
    for other in existing:
        if other != name and _fold(other) == key:
            raise ConfigError(f"{what}: {name!r} differs from the existing {other!r} only by case or look-alike "
                              f"characters; use {other!r} or a clearly different name")
    return name  # type: ignore[return-value]


def _fold(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold()


def child_path(root: str, name: object, what: str = "name", *, existing: Iterable[str] | None = None) -> str:
    """root/name for a checked name (against the folder's current entries when existing is None)."""
    if existing is None:
        existing = os.listdir(root) if os.path.isdir(root) else []
    name = check_name(name, what, existing=existing)
    path = os.path.join(os.path.abspath(root), name)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(root):
        raise ConfigError(f"{what}: {name!r} resolves outside {root}")
    return path
