"""The few places where Gradio 3.41 (A1111, reForge) and Gradio 4.x (Forge) differ for this tab.

Everything else in the tab uses features the two share: Blocks/Row/Column/Group/Accordion/Tabs, Textbox,
Number, Checkbox, Radio (plain string choices), Dropdown (plain string choices), Button, Markdown, HTML, Image
(filepath), Gallery, File (no `type`), Dataframe (pandas values), State, `.click/.change/.input/.select`,
`Blocks.load`, `show_progress="hidden"`. No `.style()`, no `every=`.
"""
from __future__ import annotations

import os
from typing import Any

import gradio as gr

GRADIO_MAJOR = int(str(getattr(gr, "__version__", "3")).split(".")[0] or 3)


def js_kwargs(js: str | None) -> dict[str, Any]:
    """The keyword that attaches a browser-side function to an event: `_js` on 3.x, `js` on 4.x."""
    if not js:
        return {}
    return {"_js": js} if GRADIO_MAJOR < 4 else {"js": js}


def update(**kwargs: Any) -> Any:
    """`gr.update`, present in both (4.x keeps it as the generic update)."""
    return gr.update(**kwargs)


def no_change() -> Any:
    return gr.update()


def file_paths(value: Any) -> list[str]:
    """Paths of what a `gr.File(file_count="multiple")` hands a handler: 3.41 gives temp-file objects (`.name`),
    4.x gives path strings (or dicts with `path` / `name` from some clients)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(os.fspath(item))
        elif isinstance(item, dict):
            p = item.get("path") or item.get("name")
            if p:
                out.append(str(p))
        elif getattr(item, "name", None):
            out.append(str(item.name))
    return out


def select_index(evt: Any) -> Any:
    """The index of a `.select` event (`gr.SelectData.index`: an int, or [row, col] for tables)."""
    return getattr(evt, "index", None)


def dataframe(rows: list[list[Any]], headers: list[str]) -> Any:
    """A table value both versions render with its headers, also when empty (a bare [] loses them on 3.41)."""
    import pandas as pd
    return pd.DataFrame([list(r) for r in rows], columns=list(headers))
