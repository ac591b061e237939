"""The tab's visible English strings and their Simplified Chinese translation (localizations/zh_CN.json).

Inside the WebUI the translation is the WebUI's own: it replaces the text of page elements that exactly match a
key of the JSON. The standalone page (`--lang zh_CN`) applies the same JSON here, to the components' labels,
help lines, placeholders, button texts, Markdown text, word choices and table headers before the page is served.
`visible_strings` is what the i18n test checks against the JSON.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Callable, Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCALIZATIONS = os.path.join(REPO_ROOT, "localizations")
_TAG = re.compile(r"(<[^>]+>)")
_MD_PREFIX = re.compile(r"^(\s*(?:#{1,6}\s+|[-*]\s+|>\s*)?)(.*?)(\s*)$")


def load(lang: str | None) -> dict[str, str]:
    """The mapping for a language name (the JSON file's name), {} for English / None."""
    if not lang or lang.lower() in ("en", "english", "none"):
        return {}
    path = os.path.join(LOCALIZATIONS, f"{lang}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no translation file {path} (available: "
                                f"{', '.join(sorted(n[:-5] for n in os.listdir(LOCALIZATIONS) if n.endswith('.json')))})")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return {str(k): str(v) for k, v in data.items()}


def translator(mapping: dict[str, str]) -> Callable[[str], str]:
    return lambda s: mapping.get(s, s)


def _markup_texts(value: str) -> Iterator[str]:
    """Text pieces of Markdown (raw, or as the HTML Gradio 3.41 stores): what the page shows as text nodes."""
    for piece in _TAG.split(value):
        if not piece or piece.startswith("<"):
            continue
        for line in html.unescape(piece).splitlines():
            core = _MD_PREFIX.match(line).group(2).strip()
            if core:
                yield core


def _choice_labels(choices: Any) -> list[str]:
    out = []
    for c in choices or []:
        out.append(str(c[0]) if isinstance(c, (tuple, list)) else str(c))
    return out


def _kind(block: Any) -> str:
    return type(block).__name__


def components(blocks: Any) -> list[Any]:
    """Every block of a Blocks (and of Blocks rendered inside it), in creation order."""
    return list(getattr(blocks, "blocks", {}).values())


def visible_strings(blocks: Any) -> list[tuple[str, str]]:
    """(text, where) for every static English string the tab shows. Dropdown choices are names (optimizers,
    schedulers, network types, projects) and are not words to translate; Radio choices are."""
    found: list[tuple[str, str]] = []

    def add(text: Any, where: str) -> None:
        if isinstance(text, str) and text.strip():
            found.append((text.strip(), where))

    for b in components(blocks):
        kind = _kind(b)
        name = getattr(b, "elem_id", None) or kind
        if kind in ("State", "Blocks", "Row", "Column", "Group", "Box", "Form", "Tabs"):
            continue
        if kind != "Button" or getattr(b, "label", None) != getattr(b, "value", None):
            add(getattr(b, "label", None), f"{name}.label")
        add(getattr(b, "info", None), f"{name}.info")
        add(getattr(b, "placeholder", None), f"{name}.placeholder")
        if kind in ("Button", "UploadButton"):
            add(getattr(b, "value", None), f"{name}.value")
        if kind == "Markdown" and isinstance(getattr(b, "value", None), str):
            for t in _markup_texts(b.value):
                add(t, f"{name}.text")
        if kind == "Radio":
            for t in _choice_labels(getattr(b, "choices", None)):
                add(t, f"{name}.choice")
        if kind == "Dataframe":
            for h in getattr(b, "headers", None) or []:
                add(str(h), f"{name}.header")
    return found


def missing(blocks: Any, mapping: dict[str, str]) -> list[tuple[str, str]]:
    return [(t, w) for t, w in visible_strings(blocks) if t not in mapping]


def _translate_markup(value: str, tr: Callable[[str], str]) -> str:
    parts = []
    for piece in _TAG.split(value):
        if not piece or piece.startswith("<"):
            parts.append(piece)
            continue
        lines = []
        for line in piece.splitlines(keepends=True):
            body = line.rstrip("\r\n")
            end = line[len(body):]
            m = _MD_PREFIX.match(body)
            core = html.unescape(m.group(2).strip())
            new = tr(core) if core else core
            if new != core:
                body = m.group(1) + html.escape(new, quote=False) + m.group(3)
            lines.append(body + end)
        parts.append("".join(lines))
    return "".join(parts)


def translate_blocks(blocks: Any, mapping: dict[str, str]) -> int:
    """Apply `mapping` to the static strings of every component (before the page is served); returns how many
    strings changed. Values handlers read (Radio values, Dropdown choices) stay English."""
    if not mapping:
        return 0
    tr = translator(mapping)
    n = 0

    def swap(obj: Any, attr: str) -> None:
        nonlocal n
        v = getattr(obj, attr, None)
        if isinstance(v, str) and v.strip() and tr(v.strip()) != v.strip():
            setattr(obj, attr, tr(v.strip()))
            n += 1

    for b in components(blocks):
        kind = _kind(b)
        for attr in ("label", "info", "placeholder"):
            swap(b, attr)
        if kind in ("Button", "UploadButton"):
            swap(b, "value")
        if kind == "Markdown" and isinstance(getattr(b, "value", None), str):
            new = _translate_markup(b.value, tr)
            n += new != b.value
            b.value = new
        if kind == "Radio" and getattr(b, "choices", None):
            pairs = [c if isinstance(c, (tuple, list)) else (str(c), c) for c in b.choices]
            b.choices = [(tr(str(label)), value) for label, value in pairs]
            n += 1
        if kind == "Dataframe" and getattr(b, "headers", None):
            b.headers = [tr(str(h)) for h in b.headers]
            if isinstance(getattr(b, "value", None), dict) and "headers" in b.value:
                b.value = dict(b.value, headers=list(b.headers))   # 3.41 keeps the initial table here
            n += 1
    return n
