"""Section 4, Parameters: presets in plain words, every field with a one-line explanation, the live steps
formula and an ETA. Every change is saved to `<project>/ui_form.json` at once, so a reload shows it again."""
from __future__ import annotations

import os
from typing import Any

from ..errors import LoraTrainError
from ..record import list_runs
from . import form_store
from .common import get_project
from .context import Result, UIContext
from .presets import FIELDS, FORM_KEYS, apply_preset, default_values, form_preset, form_to_config, preset_names, \
    preset_words
from .settings_io import export_sd_scripts, import_upload, model_family, user_presets_dir

ESTIMATE_KEYS = ["steps_text", "eta_text"]


def values_of(args: tuple | list) -> dict[str, Any]:
    return dict(zip(FORM_KEYS, args))


def form_for_project(ctx: UIContext, project) -> dict[str, Any]:
    """The saved form of a project over the defaults of its purpose."""
    saved = form_store.load_form(project.root)
    values = default_values(ctx.host.base_config(), saved.get("purpose") or project.purpose, model_family(ctx))
    values.update({k: v for k, v in saved.items() if k in FORM_KEYS})
    return values


def native_resolution(ctx: UIContext) -> int:
    """The loaded model's training size (Host.native_resolution(); 512 for hosts that cannot tell)."""
    fn = getattr(ctx.host, "native_resolution", None)
    try:
        return int(fn()) if callable(fn) else 512
    except Exception:   # noqa: BLE001 - no model loaded yet: the SD 1.x size
        return 512


def _main_folder(project):
    folder = project.find_folder(project.name)
    if folder is None:
        folders = project.folders()
        folder = folders[0] if len(folders) == 1 else None
    return folder


def seconds_per_step(ctx: UIContext, project_name: str, resolution: int, batch: int) -> tuple[float, str] | None:
    """(seconds per step, where it was measured) scaled to this resolution and batch size: from a job of this
    session, else from the project's run records."""
    def scaled(sps: float, cfg: dict[str, Any]) -> float:
        try:
            res0 = int(str(cfg.get("resolution", resolution)).split(",")[0])
            b0 = int(cfg.get("train_batch_size", batch) or 1)
        except (TypeError, ValueError):
            return sps
        return sps * (resolution * resolution * batch) / max(1, res0 * res0 * b0)

    for job in ctx.jobs.list(project_name):
        if job.it_per_s:
            return scaled(1.0 / job.it_per_s, job.config), f"run {job.output_name}"
    for rec in list_runs(ctx.host.paths.output_dir(project_name)):
        secs, step = rec.get("seconds"), rec.get("step")
        if isinstance(secs, (int, float)) and isinstance(step, int) and step > 0:
            return scaled(secs / step, rec.get("config") or {}), f"run {rec.get('output_name')}"
    return None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def estimate(ctx: UIContext, project_name: str | None, values: dict[str, Any]) -> Result:
    """The steps formula of this form on this project's images, and the time it should take."""
    if not project_name:
        return {"steps_text": "Open a project to see how many steps this trains.", "eta_text": ""}
    try:
        project = get_project(ctx, project_name)
        cfg, repeats = form_to_config(values)
        cfg.pop("output_name", None)
        tc = ctx.jobs.resolve_config(project.name, cfg)
        from ..dataset import plan_steps_for_datasets
        from ..training.data_setup import datasets_for_config
        datasets, _ = datasets_for_config(tc)
        main = _main_folder(project)
        for ds in datasets:
            for sub in ds.subsets:
                if main and not sub.is_reg and os.path.realpath(sub.image_dir) == os.path.realpath(main):
                    sub.num_repeats = repeats   # what Start will rename the folder to
        plan = plan_steps_for_datasets(datasets, tc.seed_value,
                                       gradient_accumulation_steps=tc.gradient_accumulation_steps,
                                       max_train_epochs=tc.max_train_epochs, max_train_steps=tc.max_train_steps)
    except LoraTrainError as exc:
        return {"steps_text": f"error: {exc}", "eta_text": ""}
    speed = seconds_per_step(ctx, project.name, int(values.get("resolution") or 512),
                             int(values.get("train_batch_size") or 1))
    if speed is None:
        eta = "No speed measured yet: it shows after this project's first run has trained a few steps."
    else:
        sps, where = speed
        eta = f"about {_duration(plan.total_steps * sps)} ({sps:.2f} s/step, measured in {where})"
    return {"steps_text": f"{plan.total_steps} steps: {plan.formula}", "eta_text": eta}


def changed(ctx: UIContext, project_name: str | None, *args: Any) -> Result:
    """A field was edited: save the form, update the formula and the ETA."""
    values = values_of(args)
    if project_name:
        project = get_project(ctx, project_name)
        form_store.save_form(project.root, values)
    return estimate(ctx, project_name, values)


def preset(ctx: UIContext, project_name: str | None, name: str, *args: Any) -> Result:
    family = model_family(ctx)
    values = apply_preset(values_of(args), name, family)
    out: Result = {k: values[k] for k in list(form_preset(name, family)) + ["presets"]}
    if project_name:
        form_store.save_form(get_project(ctx, project_name).root, dict(values, preset=name))
    out.update(estimate(ctx, project_name, values))
    return out


def form_view(ctx: UIContext, project) -> Result:
    values = form_for_project(ctx, project)
    out: Result = {k: values[k] for k in FORM_KEYS}
    saved = form_store.load_form(project.root)
    from .compat import update
    # the choices follow the model loaded now (the WebUI may have switched between SD 1.x and SDXL)
    names = preset_names(model_family(ctx))
    out["preset"] = update(choices=names, value=saved["preset"] if saved.get("preset") in names else None)
    out.update(estimate(ctx, project.name, values))
    return out


# ---------------------------------------------------------------- layout


def _component(f, value):
    import gradio as gr
    eid = f"lora_train_{f.key}"
    if f.kind == "int":
        return gr.Number(label=f.label, info=f.info, value=value, precision=0, elem_id=eid)
    if f.kind == "float":
        return gr.Number(label=f.label, info=f.info, value=value, elem_id=eid)
    if f.kind == "checkbox":
        return gr.Checkbox(label=f.label, info=f.info, value=bool(value), elem_id=eid)
    if f.kind == "dropdown":
        return gr.Dropdown(label=f.label, info=f.info, choices=list(f.choices), value=value, elem_id=eid)
    if f.kind == "textarea":
        return gr.Textbox(label=f.label, info=f.info, value=value, lines=3, elem_id=eid)
    return gr.Textbox(label=f.label, info=f.info, value=value, elem_id=eid)


# rows of the form, in order (keys of FIELDS)
LAYOUT = (("network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha"),
          ("repeats", "max_train_epochs", "save_every_n_epochs", "train_batch_size"),
          ("unet_lr", "text_encoder_lr", "optimizer_type", "lr_scheduler", "lr_warmup_steps"),
          ("resolution", "enable_bucket", "clip_skip", "shuffle_caption", "keep_tokens"),
          ("sample_prompts", "sample_every_n_epochs", "seed", "output_name"),
          ("presets", "extra_options"))


def build(ctx: UIContext) -> None:
    import gradio as gr
    assert sorted(k for row in LAYOUT for k in row) == sorted(FORM_KEYS)
    by_key = {f.key: f for f in FIELDS}
    family = model_family(ctx)
    user_presets_dir(ctx)
    base = dict(ctx.host.base_config())
    base.setdefault("resolution", native_resolution(ctx))
    initial = default_values(base, None, family)
    add = ctx.add
    add("base_model", gr.Textbox(label="Base model", value=ctx.host.checkpoint_label(), interactive=False,
                                 elem_id="lora_train_base_model"))
    add("preset", gr.Radio(label="Preset", choices=preset_names(family), value=None, elem_id="lora_train_preset",
                           info="Fills in the fields below for what you train; change any of them afterwards"))
    add("presets_dir", gr.Textbox(label="Your presets folder", value=user_presets_dir(ctx), interactive=False,
                                  info="NAME.toml files of sd-scripts options here are listed after a restart",
                                  elem_id="lora_train_presets_dir"))
    for line in preset_words(family):
        gr.Markdown(line)
    with gr.Row():
        add("import_file", gr.File(label="Import settings", file_types=[".json", ".toml", ".ps1", ".sh"],
                                   elem_id="lora_train_import_file"))
        add("import_report", gr.Textbox(label="Import report", lines=6, max_lines=30, interactive=False,
                                        elem_id="lora_train_import_report"))
    for row in LAYOUT:
        with gr.Row():
            for key in row:
                add(key, _component(by_key[key], initial[key]))
    add("steps_text", gr.Textbox(label="Steps", interactive=False, elem_id="lora_train_steps"))
    add("eta_text", gr.Textbox(label="Estimated time", interactive=False, elem_id="lora_train_eta"))
    with gr.Row():
        add("export_button", gr.Button("Export for sd-scripts", elem_id="lora_train_export"))
        add("export_file", gr.File(label="sd-scripts config", interactive=False, elem_id="lora_train_export_file"))
    add("export_text", gr.Textbox(label="sd-scripts command", lines=3, interactive=False,
                                  elem_id="lora_train_export_text"))


def wire(ctx: UIContext) -> None:
    c = ctx.c
    inputs = ["project"] + list(FORM_KEYS)
    for key in FORM_KEYS:
        ctx.on(c[key].input, changed, inputs, ESTIMATE_KEYS, show_progress="hidden", latest="form")
    ctx.on(c["preset"].input, preset, ["project", "preset"] + list(FORM_KEYS), list(FORM_KEYS) + ESTIMATE_KEYS,
           latest="form")
    ctx.on(c["import_file"].upload, import_upload, ["project", "import_file"] + list(FORM_KEYS),
           list(FORM_KEYS) + ["import_report"])
    ctx.on(c["export_button"].click, export_sd_scripts, ["project"] + list(FORM_KEYS), ["export_file", "export_text"])

