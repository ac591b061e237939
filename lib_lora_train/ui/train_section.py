"""Section 5, Train: start (JobManager.submit), stop, and the job's progress, loss chart, log, latest sample
and output files. The page polls `poll` (a hidden button the tab's JS clicks every 1.5 s while the tab is
visible); it redraws only when the job's `version` moved, so a reload or a second browser tab reattaches to a
running job and polling an idle page costs one dictionary lookup."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError, LoraTrainError
from ..fsutil import atomic_write_bytes
from . import form_store
from .chart import chart_html, loss_chart_svg
from .common import active_job, get_project
from .context import Result, UIContext
from .job_view import VIEW_KEYS, job_for, job_view, progress_html, progress_task_id  # noqa: F401
from .params_section import ESTIMATE_KEYS, values_of
from .presets import FORM_KEYS, form_to_config

SAMPLE_PROMPTS_FILE = "sample_prompts.txt"
POLL_SECONDS = 1.5


def poll(ctx: UIContext, project_name: str | None, seen: str | None) -> Result:
    job = job_for(ctx, project_name)
    key = f"{job.id}:{job.version}" if job is not None else "none"
    if key == seen:
        return {}
    out = job_view(ctx, job)
    if job is not None and not job.active:
        # the run ended: its record joins the history, and its speed makes the ETA a measured one
        from .history_section import table_view
        from .params_section import estimate, form_for_project
        out.update(table_view(ctx, project_name))
        try:
            out.update(estimate(ctx, project_name, form_for_project(ctx, get_project(ctx, project_name))))
        except LoraTrainError:
            pass
    return out


def _write_prompts(project, text: str) -> str | None:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return None
    path = os.path.join(project.root, SAMPLE_PROMPTS_FILE)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def start(ctx: UIContext, project_name: str, *args: Any) -> Result:
    project = get_project(ctx, project_name)
    values = values_of(args)
    form_store.save_form(project.root, values)
    if active_job(ctx, project.name) is not None:
        raise ConfigError("this project already has a run training or queued; stop it or wait for it")
    cfg, repeats = form_to_config(values)
    from .regimages_section import run_keys
    for key, value in run_keys(project.root).items():   # "Use them in the run": prior preservation's keys
        cfg.setdefault(key, value)
    prompts = _write_prompts(project, values.get("sample_prompts", ""))
    if prompts:
        cfg["sample_prompts"] = prompts
        cfg["sample_every_n_epochs"] = int(values.get("sample_every_n_epochs") or 1)
    folder = project.find_folder(project.name)
    if folder is None and len(project.folders()) == 1:
        folder = project.folders()[0]
    if folder is not None:
        from ..dataset.config import parse_folder_name
        parsed = parse_folder_name(os.path.basename(folder))
        if parsed and parsed[0] != repeats:
            project.set_repeats(folder, repeats)
    job = ctx.jobs.submit(project.name, cfg)
    out = job_view(ctx, job)
    out["train_status"] = f"{job.status}: {job.output_name} ({job.id})"
    return out


def stop(ctx: UIContext, project_name: str) -> Result:
    job = active_job(ctx, project_name)
    if job is None:
        return {"train_status": "nothing is training in this project"}
    ctx.jobs.stop(job.id)
    out = job_view(ctx, job)
    out["train_status"] = ("stopping at the next step (a resumable state and the last epoch's file are saved)"
                           if job.status == "running" else "removed from the queue")
    return out


# ---------------------------------------------------------------- layout


def build(ctx: UIContext) -> None:
    import gradio as gr
    add = ctx.add
    with gr.Row():
        add("train_button", gr.Button("Start training", variant="primary", elem_id="lora_train_train_button"))
        add("stop_button", gr.Button("Stop", variant="stop", elem_id="lora_train_stop_button"))
        add("poll_button", gr.Button("Refresh", elem_id="lora_train_poll", size="sm"))
    add("train_status", gr.Textbox(label="Current run", interactive=False, elem_id="lora_train_train_status"))
    add("progress", gr.HTML(progress_html(None), elem_id="lora_train_progress"))
    with gr.Row():
        with gr.Column(scale=3):
            add("loss_chart", gr.HTML(chart_html(loss_chart_svg([])), elem_id="lora_train_loss_chart"))
        with gr.Column(scale=2):
            add("sample_image", gr.Image(label="Latest sample", type="filepath", interactive=False, height=256,
                                         elem_id="lora_train_sample"))
    add("train_log", gr.Textbox(label="Log", lines=8, max_lines=20, interactive=False, elem_id="lora_train_log"))
    add("train_outputs", gr.Textbox(label="Output files", lines=2, interactive=False,
                                    elem_id="lora_train_outputs"))
    add("train_seen", gr.State("none"))


def wire(ctx: UIContext, history_keys: list[str]) -> None:
    c = ctx.c
    ctx.on(c["train_button"].click, start, ["project"] + list(FORM_KEYS), VIEW_KEYS, status="train_status")
    ctx.on(c["stop_button"].click, stop, ["project"], VIEW_KEYS, status="train_status")
    ctx.on(c["poll_button"].click, poll, ["project", "train_seen"], VIEW_KEYS + history_keys + ESTIMATE_KEYS,
           queue=False,
           show_progress="hidden")
