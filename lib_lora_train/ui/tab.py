"""The "Train LoRA" tab: its sections in order, and what opening a project shows in all of them.

`build_tab(host, jobs)` returns a gr.Blocks that is never launched here: the WebUI renders it as a tab
(`on_ui_tabs`), the standalone page (ui/app.py) inside its own Blocks.
"""
from __future__ import annotations

from typing import Any

from ..hosts.base import Host
from ..jobs import JobManager
from . import form_store, history_section, params_section, preprocess_section, project_section, tags_section
from . import regimages_section, train_section
from .common import get_project, project_names
from .compat import update
from .context import Result, UIContext
from .i18n import load as load_lang, translate_blocks, translator
from .presets import FORM_KEYS
from .preprocess_section import PP_DEFAULTS, PP_KEYS
from .tags_section import TAG_KEYS

TAG_DEFAULTS = {"tag_tagger": "no tagger", "tag_model": "", "tag_csv": "", "tag_threshold": 0.35,
                "tag_existing": "replace"}
OPTION_KEYS = ["import_path"] + PP_KEYS + TAG_KEYS + regimages_section.REG_KEYS   # saved with the form
DATA_OUTPUTS = tags_section.VIEW_KEYS + params_section.ESTIMATE_KEYS
OPEN_OUTPUTS = (["project", "base_model", "trigger", "purpose", "preset"] + OPTION_KEYS + list(FORM_KEYS)
                + params_section.ESTIMATE_KEYS + tags_section.VIEW_KEYS + ["tag_filter", "tag_status", "tag_selected"]
                + history_section.VIEW_KEYS + ["history_status"] + train_section.VIEW_KEYS
                + ["check_report", "check_gallery", "pp_status"])


def _resolution(ctx: UIContext) -> int:
    try:
        return int(str(ctx.host.base_config().get("resolution", 512)).split(",")[0])
    except ValueError:
        return 512


def open_view(ctx: UIContext, name: str | None) -> Result:
    """Everything the tab shows for project `name` (None: no project): used on page load, on opening and on
    creating a project. Remembers the project as the one open last."""
    names = project_names(ctx)
    out: Result = {"project": update(choices=names, value=name if name in names else None),
                   "base_model": ctx.host.checkpoint_label()}   # the WebUI loads its model after the tab is built
    if name not in names:
        name = None
    out.update(train_section.job_view(ctx, train_section.job_for(ctx, name)))
    out.update(history_section.view(ctx, name))
    out.update(tags_section.view(ctx, name))
    out.update({"tag_filter": "", "tag_status": "", "tag_selected": "", "check_report": "", "check_gallery": [],
                "pp_status": "", "history_status": ""})
    if name is None:
        out.update(params_section.estimate(ctx, None, {}))
        return out
    project = get_project(ctx, name)
    form_store.set_last_project(ctx.host.paths.projects, project.name)
    saved = form_store.load_form(project.root)
    out.update({"trigger": project.trigger, "purpose": saved.get("purpose") or project.purpose or "concept"})
    options = dict(PP_DEFAULTS, pp_resolution=_resolution(ctx) if _resolution(ctx) % 64 == 0 else 512)
    options.update(TAG_DEFAULTS)
    options.update(regimages_section.REG_DEFAULTS)
    options["import_path"] = ""
    options.update({k: v for k, v in saved.items() if k in OPTION_KEYS})
    out.update(options)
    out.update(params_section.form_view(ctx, project))
    out.setdefault("preset", None)
    return out


def refresh_after_data_change(ctx: UIContext, name: str) -> Result:
    """After images changed (import, preprocess): the tag views and the steps formula."""
    out = tags_section.view(ctx, name)
    project = get_project(ctx, name)
    out.update(params_section.estimate(ctx, name, params_section.form_for_project(ctx, project)))
    return out


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
                        preprocess_section.build(ctx, _resolution(ctx) if _resolution(ctx) % 64 == 0 else 512)
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
