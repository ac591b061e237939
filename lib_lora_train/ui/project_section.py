"""Section 1, Project & images: create / open a project, import a folder or uploaded files, the check report
with thumbnails of the problem files and the reason for each."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..prep.project import check_path, import_images, is_project, open_project
from ..prep.project import create_project as prep_create_project
from ..prep.report import ERROR, WARNING, CheckReport
from . import form_store
from .common import cache_dir, gallery, get_project, project_names
from .compat import file_paths, update
from .context import Result, UIContext
from .data_views import refresh_after_data_change
from .preprocess_section import preprocess_options
from .views import open_view

PURPOSE_CHOICES = ("character", "style", "concept")
MAX_ISSUES_SHOWN = 60


def _purpose_for_project(purpose: str | None) -> str | None:
    # project.json knows character / style (the image-count guide); a concept has no guide
    return purpose if purpose in ("character", "style") else None


def report_view(report: CheckReport, project, *, imported: bool = False) -> Result:
    """The check report as text plus a gallery of problem files (thumbnail, "name: reason"). `imported`: the
    report of files being imported (unusable ones are skipped), else the training folder's check."""
    c = report.counts
    usable = c.get("usable_train_images", c.get("usable_images", 0))
    lines = [f"{c.get('images', 0)} images checked, {usable} usable."]
    n_err, n_warn = len(report.by_severity(ERROR)), len(report.by_severity(WARNING))
    if imported:
        lines.append(f"{n_err} errors (those files were skipped), {n_warn} warnings.")
    else:
        lines.append(f"{n_err} errors, {n_warn} warnings: training "
                     f"{'can start' if report.can_train else 'cannot start yet'}.")
    for issue in report.issues:
        if issue.severity in (ERROR, WARNING):
            lines.append(f"- {issue.severity}: {issue.message}")
    problems = []
    for f in report.files:
        shown = [i for i in f.issues if i.severity in (ERROR, WARNING)]
        if shown:
            reason = "; ".join(i.message for i in shown)
            lines.append(f"- {shown[0].severity}: {os.path.basename(f.path)}: {reason}")
            problems.append((f.path, f"{os.path.basename(f.path)}: {reason}"))
    if len(lines) > MAX_ISSUES_SHOWN:
        lines = lines[:MAX_ISSUES_SHOWN] + [f"... and {len(lines) - MAX_ISSUES_SHOWN} more lines"]
    if report.summary and report.summary.get("text"):
        lines.append(str(report.summary["text"]))
    thumbs = gallery(problems, cache_dir(project, "thumbs")) if project is not None else []
    return {"check_report": "\n".join(lines), "check_gallery": thumbs}


def create(ctx: UIContext, name: str, trigger: str, purpose: str) -> Result:
    """Create a project (or open the existing one of that name, taking the trigger word and purpose given)."""
    name = (name or "").strip()
    root = ctx.host.paths.project_dir(name)
    if purpose and purpose not in PURPOSE_CHOICES:
        raise ConfigError(f"purpose must be one of {', '.join(PURPOSE_CHOICES)}")
    if is_project(root):
        project = open_project(root)
        if trigger and trigger.strip() != project.trigger:
            project.trigger = trigger.strip()
        if purpose:
            project.purpose = _purpose_for_project(purpose)
        project.save()
        message = f"opened the existing project '{project.name}'"
    else:
        project = prep_create_project(root, name, trigger=trigger or "", purpose=_purpose_for_project(purpose))
        message = f"created project '{project.name}' in {project.root}"
    if purpose:
        form_store.save_form(project.root, {"purpose": purpose})
    result = open_view(ctx, project.name)
    result["proj_status"] = message
    return result


def save_settings(ctx: UIContext, project_name: str, trigger: str, purpose: str) -> Result:
    """Typing the trigger word or choosing the purpose of an open project saves it at once."""
    if not project_name:
        return {}
    project = get_project(ctx, project_name)
    project.trigger = (trigger or "").strip()
    project.purpose = _purpose_for_project(purpose)
    project.save()
    form_store.save_form(project.root, {"purpose": purpose})
    return {}


def _import(ctx: UIContext, project_name: str, sources: Any, recursive: bool, pp_values: tuple) -> Result:
    from .common import active_job
    project = get_project(ctx, project_name)
    if active_job(ctx, project.name) is not None:
        raise ConfigError("a run of this project is training; import after it ends (or stop it)")
    opts = preprocess_options(*pp_values)
    res = import_images(project, sources, recursive=bool(recursive), options=opts)
    view = report_view(res.check, project, imported=True)
    written = len(res.preprocess.written)
    msg = (f"imported {written} images into {os.path.relpath(res.folder, project.root)}"
           f" ({len(res.preprocess.skipped)} skipped)")
    if res.suggestion is not None:
        msg += f"; {res.suggestion.repeats} repeats suggested: {res.suggestion.reason}"
    out = refresh_after_data_change(ctx, project.name)
    out.update(view)
    out["proj_status"] = msg
    return out


def import_folder(ctx: UIContext, project_name: str, path: str, recursive: bool, *pp_values: Any) -> Result:
    path = (path or "").strip()
    if not path:
        raise ConfigError("type the path of a folder of images on this computer")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(f"not a folder: {path}")
    project = get_project(ctx, project_name)
    form_store.save_form(project.root, {"import_path": path})
    return _import(ctx, project_name, path, recursive, pp_values)


def import_uploads(ctx: UIContext, project_name: str, files: Any, *pp_values: Any) -> Result:
    paths = file_paths(files)
    if not paths:
        raise ConfigError("choose image files to upload first")
    result = _import(ctx, project_name, paths, False, pp_values)
    result["upload"] = None
    return result


def check(ctx: UIContext, project_name: str) -> Result:
    project = get_project(ctx, project_name)
    report = check_path(project.root, workers=1)
    out = report_view(report, project)
    out["proj_status"] = "checked the training folder"
    return out


def refresh_list(ctx: UIContext, current: str | None) -> Result:
    names = project_names(ctx)
    return {"project": update(choices=names, value=current if current in names else None)}


# ---------------------------------------------------------------- layout


def build(ctx: UIContext) -> None:
    import gradio as gr
    add = ctx.add
    gr.Markdown("Create a project or open one, then add the images to learn from.")
    with gr.Row():
        add("project", gr.Dropdown(label="Project", choices=project_names(ctx), value=None,
                                   elem_id="lora_train_project", info="Open an existing project", scale=3))
        add("project_refresh", gr.Button("Refresh list", elem_id="lora_train_project_refresh", scale=0,
                                         size="sm", min_width=120))
    with gr.Row():
        add("project_name", gr.Textbox(label="New project name", elem_id="lora_train_project_name",
                                       placeholder="e.g. my_character",
                                       info="A plain folder name: letters, digits, spaces, - and _"))
        add("trigger", gr.Textbox(label="Trigger word", elem_id="lora_train_trigger", placeholder="e.g. zkz",
                                  info="A rare word you will write in prompts to call up what was learned"))
        add("purpose", gr.Radio(label="Purpose", choices=list(PURPOSE_CHOICES), value="character",
                                elem_id="lora_train_purpose", info="What the LoRA should learn"))
    add("create_project", gr.Button("Create or open project", variant="primary", elem_id="lora_train_create_project"))
    add("proj_status", gr.Textbox(label="Status", interactive=False, elem_id="lora_train_project_status"))
    with gr.Row():
        with gr.Column():
            add("import_path", gr.Textbox(label="Folder on this computer", elem_id="lora_train_import_path",
                                          placeholder="/path/to/images",
                                          info="The images there are copied; the originals are never changed"))
            add("import_recursive", gr.Checkbox(label="Include sub-folders", value=False,
                                                elem_id="lora_train_import_recursive"))
            add("import_button", gr.Button("Import folder", elem_id="lora_train_import_button"))
        with gr.Column():
            add("upload", gr.File(label="Or upload images", file_count="multiple", file_types=["image"],
                                  elem_id="lora_train_upload"))
            add("upload_button", gr.Button("Import uploaded files", elem_id="lora_train_upload_button"))
    add("check_button", gr.Button("Check the training images", elem_id="lora_train_check_button"))
    add("check_report", gr.Textbox(label="Check report", lines=6, max_lines=30, interactive=False,
                                   elem_id="lora_train_check_report"))
    add("check_gallery", gr.Gallery(label="Files with problems", columns=6, height=260,
                                    elem_id="lora_train_check_gallery"))


def wire(ctx: UIContext, open_outputs: list[str], data_outputs: list[str], pp_keys: list[str]) -> None:
    c = ctx.c
    ctx.on(c["create_project"].click, create, ["project_name", "trigger", "purpose"],
           open_outputs + ["proj_status"], status="proj_status")
    ctx.on(c["project_refresh"].click, refresh_list, ["project"], ["project"], status=None)
    ctx.on(c["trigger"].input, save_settings, ["project", "trigger", "purpose"], [], show_progress="hidden",
           latest="settings")
    ctx.on(c["purpose"].input, save_settings, ["project", "trigger", "purpose"], [], show_progress="hidden",
           latest="settings")
    report_outs = ["check_report", "check_gallery", "proj_status"]
    ctx.on(c["import_button"].click, import_folder, ["project", "import_path", "import_recursive"] + pp_keys,
           data_outputs + report_outs, status="proj_status")
    ctx.on(c["upload_button"].click, import_uploads, ["project", "upload"] + pp_keys,
           data_outputs + report_outs + ["upload"], status="proj_status")
    ctx.on(c["check_button"].click, check, ["project"], report_outs, status="proj_status")
