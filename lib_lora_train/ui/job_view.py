"""What the page shows of a training job (status line, progress bar, loss chart, log, latest sample, outputs): used
by the Train section's polling and by History's Resume, which hands over to a new job."""
from __future__ import annotations

import html
import os
from typing import Any

from .chart import chart_html, loss_chart_svg
from .context import Result, UIContext

VIEW_KEYS = ["train_status", "progress", "loss_chart", "train_log", "sample_image", "train_outputs", "train_seen"]


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
