"""The "Train LoRA" tab (Gradio), shared by the WebUI extension and the standalone page.

    build_tab(host, jobs) -> gr.Blocks      the whole tab; the WebUI returns it from on_ui_tabs
    python -m lib_lora_train ui             the standalone page (ui/app.py)

Gradio is imported only when the tab is built, so the engine and the CLI work without it.
"""
from __future__ import annotations

from typing import Any


def build_tab(host: Any, jobs: Any, **kwargs: Any) -> Any:
    from .tab import build_tab as _build
    return _build(host, jobs, **kwargs)


__all__ = ["build_tab"]
