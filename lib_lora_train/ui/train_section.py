"""Section 5, Train: start (JobManager.submit), stop, and the job's progress, loss chart, log, latest sample
and output files. The page polls `poll` (a hidden button the tab's JS clicks every 1.5 s while the tab is
visible); it redraws only when the job's `version` moved, so a reload or a second browser tab reattaches to a
running job and polling an idle page costs one dictionary lookup."""
from __future__ import annotations

import html
import os
from typing import Any

from ..errors import ConfigError, LoraTrainError
from ..fsutil import atomic_write_bytes
from . import form_store
from .chart import chart_html, loss_chart_svg
from .common import active_job, get_project
from .context import Result, UIContext
from .params_section import ESTIMATE_KEYS, values_of
from .presets import FORM_KEYS, form_to_config

VIEW_KEYS = ["train_status", "progress", "loss_chart", "train_log", "sample_image", "train_outputs", "train_seen"]
SAMPLE_PROMPTS_FILE = "sample_prompts.txt"
POLL_SECONDS = 1.5


def job_for(ctx: UIContext, project_name: str | None):
    """What the page shows: the project's running or queued job, else its latest job of this session."""
    if not project_name:
        return None
    jobs = ctx.jobs.list(project_name)
    for job in jobs:
        if job.active:
            return job
    return jobs[0] if jobs else None


def _clock(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_task_id(ctx: UIContext, job) -> str:
    """The host's progress-task id of a job ("" where the host has none): inside the WebUI the tab's JS hands
    it to the WebUI's requestProgress(), which draws the WebUI's own bar for the run."""
    fn = getattr(ctx.host, "progress_task_id", None)
    return str(fn(job.id) or "") if job is not None and callable(fn) else ""


def progress_html(job, tr=lambda s: s, task_id: str = "") -> str:
    if job is None:
        return f'<div class="lora-train-progress-text">{html.escape(tr("No run in this session yet."))}</div>'
    total = job.total_steps or 0
    frac = min(1.0, job.step / total) if total else 0.0
    parts = [f"{tr(job.status)}", f"{tr('step')} {job.step}/{total or '?'}",
             f"{tr('epoch')} {job.epoch}/{job.epochs or '?'}"]
    if job.loss is not None:
        parts.append(f"{tr('loss')} {job.avg_loss if job.avg_loss is not None else job.loss:.4f}")
    if job.it_per_s:
        parts.append(f"{job.it_per_s:.2f} it/s")
    eta = ""
    if job.active and job.eta_s is not None:
        # hidden while the WebUI's own bar is shown: that bar carries the same (our) ETA, once
        eta = f'<span class="lora-train-eta"> · ETA {_clock(job.eta_s)}</span>'
    elif job.started and job.finished:
        parts.append(f"{tr('took')} {_clock(job.finished - job.started)}")
    text = html.escape(" · ".join(parts)) + eta
    return (f'<div class="lora-train-progress" data-status="{html.escape(job.status)}" data-step="{job.step}" '
            f'data-total="{total}" data-task-id="{html.escape(task_id)}">'
            f'<div class="lora-train-progress-bar" style="width:{frac * 100:.1f}%"></div>'
            f'</div><div class="lora-train-progress-text">{text}</div>')


def job_view(ctx: UIContext, job) -> Result:
    if job is None:
        return {"train_status": "", "progress": progress_html(None, ctx.tr),
                "loss_chart": chart_html(loss_chart_svg([], tr=ctx.tr)), "train_log": "", "sample_image": None,
                "train_outputs": "", "train_seen": "none"}
    spe = (job.total_steps / job.epochs) if job.total_steps and job.epochs else None
    svg = loss_chart_svg(job.losses, job.epoch_losses, steps_per_epoch=spe, validation=job.validation_losses,
                         total_steps=job.total_steps, tr=ctx.tr)
    sample = None
    for s in reversed(job.samples):
        paths = [p for p in s.get("paths") or [] if os.path.isfile(p)]
        if paths:
            sample = paths[-1]
            break
    status = f"{job.status}: {job.output_name} ({job.id})"
    if job.error:
        status += f" - {job.error}"
    outputs = "\n".join(f"{o['name']}  {o['path']}" for o in job.outputs)
    return {"train_status": status, "progress": progress_html(job, ctx.tr, progress_task_id(ctx, job)),
            "loss_chart": chart_html(svg), "train_log": "\n".join(job.log), "sample_image": sample,
            "train_outputs": outputs, "train_seen": f"{job.id}:{job.version}"}


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
