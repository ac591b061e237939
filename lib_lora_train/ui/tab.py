"""The "Train LoRA" tab: its sections in order and their wiring (what opening a project shows: ui/views.py).

`build_tab(host, jobs)` returns a gr.Blocks that is never launched here: the WebUI renders it as a tab
(`on_ui_tabs`), the standalone page (ui/app.py) inside its own Blocks.
"""
from __future__ import annotations

from typing import Any

from ..hosts.base import Host
from ..jobs import JobManager
from . import form_store, history_section, params_section, preprocess_section, project_section, tags_section
from . import regimages_section, train_section
from .common import get_project
from .context import Result, UIContext
from .i18n import load as load_lang, translate_blocks, translator
from .preprocess_section import PP_KEYS
from .views import DATA_OUTPUTS, OPEN_OUTPUTS, OPTION_KEYS, open_view, resolution_of


def on_load(ctx: UIContext) -> Result:
    """A page (re)load: the project open last, with its saved form and its running job."""
    return open_view(ctx, form_store.last_project(ctx.host.paths.projects))


def open_project(ctx: UIContext, name: str | None) -> Result:
    return open_view(ctx, name)


def save_options(ctx: UIContext, project_name: str | None, *values: Any) -> Result:
    if project_name:
        form_store.save_form(get_project(ctx, project_name).root, dict(zip(OPTION_KEYS, values)))
    return {}


SECTIONS = (("Project & images", "project"), ("Preprocess", "preprocess"), ("Tags", "tags"),
            ("Parameters", "params"), ("Train", "train"), ("Compare", "compare"), ("History", "history"),
            ("Tools", "tools"))


def build_tab(host: Host, jobs: JobManager, *, lang: str | None = None) -> Any:
    """The whole tab as a gr.Blocks (not launched). `lang`: a localizations/<lang>.json applied to the labels
    (the standalone page; inside the WebUI its own localization does it)."""
    import gradio as gr

    mapping = load_lang(lang)
    ctx = UIContext(host, jobs, tr=translator(mapping))
    with gr.Blocks(analytics_enabled=False, title="Train LoRA") as blocks:
        with gr.Column(elem_id="lora_train_root"):
            # filled in the browser for events that must land in order (UIContext.on(latest=...))
            ctx.add("event_token", gr.Textbox(visible=False, elem_id="lora_train_event_token"))
            gr.Markdown("Train a LoRA on your own images: work through the sections from top to bottom.")
            for title, key in SECTIONS:
                with gr.Accordion(title, open=True, elem_id=f"lora_train_section_{key}"):
                    if key == "project":
                        project_section.build(ctx)
                    elif key == "preprocess":
                        preprocess_section.build(ctx, resolution_of(ctx) if resolution_of(ctx) % 64 == 0 else 512)
                    elif key == "tags":
                        tags_section.build(ctx)
                    elif key == "params":
                        params_section.build(ctx)
                    elif key == "train":
                        regimages_section.build(ctx)
                        train_section.build(ctx)
                    elif key == "history":
                        history_section.build(ctx)
                    elif key == "compare":
                        from .compare_section import build_compare_section
                        build_compare_section(host, jobs)
                    else:
                        from .tools_section import build_tools_section
                        build_tools_section(host, jobs)
        _wire(ctx, blocks)
    # The tab keeps its own form per project (form_store); the WebUI's ui-config.json, keyed by label, would
    # otherwise tie same-labelled fields of different sections (the Tools sub-tabs) to one saved value.
    for block in blocks.blocks.values():
        block.do_not_save_to_config = True
    blocks.lora_train_ctx = ctx   # tests and the standalone page reach the handlers' context through it
    if mapping:
        translate_blocks(blocks, mapping)
    return blocks


def _wire(ctx: UIContext, blocks: Any) -> None:
    c = ctx.c
    project_section.wire(ctx, OPEN_OUTPUTS, DATA_OUTPUTS, PP_KEYS)
    preprocess_section.wire(ctx, DATA_OUTPUTS)
    tags_section.wire(ctx)
    params_section.wire(ctx)
    train_section.wire(ctx, history_section.TABLE_KEYS)
    regimages_section.wire(ctx)
    history_section.wire(ctx)
    ctx.on(c["project"].input, open_project, ["project"], OPEN_OUTPUTS)
    for key in OPTION_KEYS:
        ctx.on(c[key].input if hasattr(c[key], "input") else c[key].change, save_options,
               ["project"] + OPTION_KEYS, [], show_progress="hidden", latest="options")
    ctx.on(blocks.load, on_load, [], OPEN_OUTPUTS)
