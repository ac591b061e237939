"""Section 6, History: the project's runs from their run records; open a run's parameters in the form; notes
per run; resume an interrupted or crashed run from its saved state (through the job manager, as Train does);
delete a run (asks first, deletes only that run's files in the project's output folder)."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..record import list_runs
from ..resume import resume_config, resume_state
from . import form_store
from .common import active_job, get_project
from .compat import dataframe, update
from .context import Result, UIContext
from .history import HEADERS, delete_run, find_record, read_notes, run_files, run_rows, write_notes
from .params_section import estimate, form_for_project, values_of
from .presets import FORM_KEYS, config_to_form

RESUME_KEYS = ["history_resume", "history_resume_info"]
TABLE_KEYS = ["history_table", "history_names", "history_run"] + RESUME_KEYS


def _out_dir(ctx: UIContext, project_name: str) -> str:
    return ctx.host.paths.output_dir(project_name)


def table_view(ctx: UIContext, project_name: str | None, selected: str | None = None) -> Result:
    headers = [ctx.tr(h) for h in HEADERS]
    if not project_name:
        return {"history_table": dataframe([], headers), "history_names": [],
                "history_run": update(choices=[], value=None), **_resume_view(ctx, project_name, None)}
    records = list_runs(_out_dir(ctx, project_name))
    names = [str(r.get("output_name", "")) for r in records]
    if selected not in names:
        selected = names[0] if names else None
    chosen = next((r for r in records if r.get("output_name") == selected), None)
    return {"history_table": dataframe(run_rows(records), headers), "history_names": names,
            "history_run": update(choices=names, value=selected), **_resume_view(ctx, project_name, chosen)}


def _resume_view(ctx: UIContext, project_name: str | None, rec: dict[str, Any] | None) -> Result:
    """Resume is enabled only for a run with a saved state; otherwise the line under it says why not."""
    if not project_name or rec is None:
        return {"history_resume": update(interactive=False), "history_resume_info": ""}
    state, why = resume_state(_live(ctx, project_name, rec))
    info = f"Resume continues from {os.path.basename(state)}" if state else why
    return {"history_resume": update(interactive=bool(state)), "history_resume_info": info}


def _live(ctx: UIContext, project_name: str, rec: dict[str, Any]) -> dict[str, Any]:
    """A record whose run is a job of this process still queued / running reads as such (not resumable)."""
    for job in ctx.jobs.list(project_name):
        if job.active and job.output_name == rec.get("output_name"):
            return dict(rec, status=job.status)
    return rec


def view(ctx: UIContext, project_name: str | None, selected: str | None = None) -> Result:
    out = table_view(ctx, project_name, selected)
    value = out["history_run"].get("value") if isinstance(out["history_run"], dict) else None
    out["history_notes"] = read_notes(_out_dir(ctx, project_name), value) if project_name and value else ""
    out.update(_confirm_hidden())
    return out


def _confirm_hidden() -> Result:
    return {"history_confirm": update(visible=False), "history_cancel": update(visible=False),
            "history_pending": ""}


def select_row(ctx: UIContext, project_name: str, names: list[str], index: Any) -> Result:
    row = index[0] if isinstance(index, (list, tuple)) else index
    if not isinstance(row, int) or not names or not 0 <= row < len(names):
        return {}
    return pick(ctx, project_name, names[row])


def pick(ctx: UIContext, project_name: str, name: str | None) -> Result:
    out = {"history_run": update(value=name),
           "history_notes": read_notes(_out_dir(ctx, project_name), name) if project_name and name else ""}
    out.update(_confirm_hidden())
    rec = None
    if project_name and name:
        try:
            rec = find_record(_out_dir(ctx, project_name), name)
        except ConfigError:
            rec = None
    out.update(_resume_view(ctx, project_name, rec))
    return out


def resume(ctx: UIContext, project_name: str, name: str | None) -> Result:
    """Submit the chosen run again with resume = its state folder, its own settings and output name: it continues
    where it stopped (the Train section shows its progress). A run without a state is refused with the reason."""
    from .job_view import job_view
    if not name:
        raise ConfigError("choose a run in the table first")
    project = get_project(ctx, project_name)
    rec = find_record(_out_dir(ctx, project_name), name)
    state, why = resume_state(_live(ctx, project.name, rec))
    if not state:
        raise ConfigError(why)
    if active_job(ctx, project.name) is not None:
        raise ConfigError("this project already has a run training or queued; stop it or wait for it")
    job = ctx.jobs.submit(project.name, resume_config(rec, state))
    out = job_view(ctx, job)
    out["train_status"] = f"{job.status}: {job.output_name} ({job.id}), resuming from {os.path.basename(state)}"
    out["history_status"] = f"resuming {name} from {os.path.basename(state)}: see Train for its progress"
    out.update(_resume_view(ctx, project.name, rec))
    return out


def save_notes(ctx: UIContext, project_name: str, name: str | None, text: str) -> Result:
    if not project_name or not name:
        return {}
    write_notes(_out_dir(ctx, project_name), name, text or "")
    return {}


def load_params(ctx: UIContext, project_name: str, name: str | None, *args: Any) -> Result:
    """The run's parameters back into the form (and saved as the project's form)."""
    if not name:
        raise ConfigError("choose a run in the table first")
    project = get_project(ctx, project_name)
    rec = find_record(_out_dir(ctx, project_name), name)
    values = config_to_form(rec.get("config") or {}, values_of(args) if args else form_for_project(ctx, project))
    dirs = (rec.get("dataset") or {}).get("dataset_dirs") or {}
    reps = {int(d.get("n_repeats")) for d in dirs.values() if d.get("n_repeats")}
    if len(reps) == 1:
        values["repeats"] = reps.pop()
    prompts = (rec.get("config") or {}).get("sample_prompts")
    if prompts and os.path.isfile(prompts) and os.path.realpath(prompts).startswith(os.path.realpath(project.root)):
        with open(prompts, encoding="utf-8") as fh:
            values["sample_prompts"] = fh.read().strip()
    values["output_name"] = ""
    form_store.save_form(project.root, values)
    out: Result = {k: values[k] for k in FORM_KEYS}
    out.update(estimate(ctx, project_name, values))
    out["history_status"] = f"the parameters of {name} are in the form"
    return out


def ask_delete(ctx: UIContext, project_name: str, name: str | None) -> Result:
    if not name:
        raise ConfigError("choose a run in the table first")
    find_record(_out_dir(ctx, project_name), name)
    files = run_files(_out_dir(ctx, project_name), name)
    listing = "\n".join(os.path.basename(p) + ("/" if os.path.isdir(p) else "") for p in files)
    return {"history_status": f"delete run {name}? These {len(files)} files go:\n{listing}",
            "history_confirm": update(visible=True), "history_cancel": update(visible=True),
            "history_pending": name}


def confirm_delete(ctx: UIContext, project_name: str, name: str | None, pending: str | None) -> Result:
    if not pending or pending != name:
        out = _confirm_hidden()
        out["history_status"] = "nothing deleted: choose the run and press Delete run again"
        return out
    active = any(j.active and j.output_name == name for j in ctx.jobs.list(project_name))
    deleted = delete_run(_out_dir(ctx, project_name), name, active=active)
    out = view(ctx, project_name)
    out["history_status"] = f"deleted run {name} ({len(deleted)} files)"
    return out


def cancel_delete(ctx: UIContext) -> Result:
    out = _confirm_hidden()
    out["history_status"] = "nothing deleted"
    return out


# ---------------------------------------------------------------- layout


def build(ctx: UIContext) -> None:
    import gradio as gr
    add = ctx.add
    add("history_refresh", gr.Button("Refresh history", elem_id="lora_train_history_refresh", size="sm"))
    add("history_table", gr.Dataframe(headers=list(HEADERS), interactive=False, wrap=True,
                                      elem_id="lora_train_history_table", label="Runs"))
    with gr.Row():
        add("history_run", gr.Dropdown(label="Run", choices=[], elem_id="lora_train_history_run",
                                       info="Or click a row of the table"))
        add("history_notes", gr.Textbox(label="Notes", lines=2, elem_id="lora_train_history_notes",
                                        info="Saved as you type, beside the run's files"))
    with gr.Row():
        add("history_load", gr.Button("Load parameters into the form", elem_id="lora_train_history_load"))
        add("history_resume", gr.Button("Resume run", elem_id="lora_train_history_resume", interactive=False))
        add("history_delete", gr.Button("Delete run", variant="stop", elem_id="lora_train_history_delete"))
        add("history_confirm", gr.Button("Yes, delete these files", variant="stop", visible=False,
                                         elem_id="lora_train_history_confirm"))
        add("history_cancel", gr.Button("Cancel", visible=False, elem_id="lora_train_history_cancel"))
    add("history_resume_info", gr.Markdown("", elem_id="lora_train_history_resume_info"))
    add("history_status", gr.Textbox(label="History", interactive=False, lines=2,
                                     elem_id="lora_train_history_status"))
    add("history_names", gr.State([]))
    add("history_pending", gr.State(""))


VIEW_KEYS = TABLE_KEYS + ["history_notes", "history_confirm", "history_cancel", "history_pending"]


def wire(ctx: UIContext) -> None:
    c = ctx.c
    pick_outs = ["history_run", "history_notes", "history_confirm", "history_cancel", "history_pending"] + RESUME_KEYS
    ctx.on(c["history_refresh"].click, view, ["project", "history_run"], VIEW_KEYS)
    ctx.on(c["history_table"].select, select_row, ["project", "history_names"], pick_outs, select=True)
    ctx.on(c["history_run"].input, pick, ["project", "history_run"], pick_outs)
    ctx.on(c["history_notes"].input, save_notes, ["project", "history_run", "history_notes"], [],
           show_progress="hidden", latest="notes")
    ctx.on(c["history_load"].click, load_params, ["project", "history_run"] + list(FORM_KEYS),
           list(FORM_KEYS) + ["steps_text", "eta_text", "history_status"], status="history_status")
    ctx.on(c["history_delete"].click, ask_delete, ["project", "history_run"],
           ["history_status", "history_confirm", "history_cancel", "history_pending"], status="history_status")
    ctx.on(c["history_confirm"].click, confirm_delete, ["project", "history_run", "history_pending"],
           VIEW_KEYS + ["history_status"], status="history_status")
    ctx.on(c["history_cancel"].click, cancel_delete, [], pick_outs[2:5] + ["history_status"])
    from .job_view import VIEW_KEYS as TRAIN_KEYS
    ctx.on(c["history_resume"].click, resume, ["project", "history_run"],
           TRAIN_KEYS + ["history_status"] + RESUME_KEYS, status="history_status")
