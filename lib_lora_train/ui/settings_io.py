"""Parameters section: "Import settings" (a kohya_ss .json, lora-scripts train.ps1 / train.sh or sd-scripts
.toml fills the form; the report says what happened to every field) and "Export for sd-scripts" (the form as
sd-scripts' --config_file TOML plus its command)."""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from . import form_store
from .common import cache_dir, get_project
from .context import Result, UIContext
from .presets import FORM_KEYS, config_to_form, extra_from_config, form_to_config

# set by the project and the host in the tab, never by an imported file
HOST_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "dataset_config",
             "logging_dir", "latents_cache_dir", "resume", "network_weights", "sample_prompts", "v2", "sdxl",
             "device", "output_name")


def model_family(ctx: UIContext) -> str:
    """The family of the model a run would use (Host.model_family(); SD 1.x for hosts that cannot tell)."""
    fn = getattr(ctx.host, "model_family", None)
    try:
        fam = fn() if callable(fn) else "sd1"
    except Exception:   # noqa: BLE001 - a host that cannot tell yet (no model loaded) means the SD 1.x default
        fam = "sd1"
    return fam if fam in ("sd1", "sd2", "sdxl") else "sd1"


def user_presets_dir(ctx: UIContext) -> str:
    """The host's folder of user presets (NAME.toml), beside its projects folder; runs and the tab find them."""
    from ..presets import register_dir
    folder = os.path.join(os.path.dirname(os.path.abspath(ctx.host.paths.projects)), "presets")
    register_dir(folder)
    return folder


def _upload_path(file: Any) -> str | None:
    if file is None:
        return None
    if isinstance(file, (list, tuple)):
        file = file[0] if file else None
    if isinstance(file, dict):
        file = file.get("path") or file.get("name")
    return getattr(file, "name", file)


def import_upload(ctx: UIContext, project_name: str | None, file: Any, *args: Any) -> Result:
    from ..interop import import_settings
    path = _upload_path(file)
    if not path:
        return {"import_report": "Choose a settings file first."}
    result = import_settings(path, name=os.path.basename(str(path)))
    rep = result.report
    if not result.config:
        return {"import_report": rep.text()}
    values = dict(zip(FORM_KEYS, args))
    cfg = result.config
    form = config_to_form(cfg, values)
    form["presets"] = ""
    form["extra_options"] = extra_from_config(cfg, skip=HOST_KEYS)
    text = result.extra_files.get("sample_prompts.txt")
    src = cfg.get("sample_prompts")
    if text is None and src and os.path.isfile(str(src)):
        with open(str(src), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    if text is not None:
        form["sample_prompts"] = text.strip()
    left = [k for k in HOST_KEYS if k in cfg and k not in ("sample_prompts", "output_name")]
    notes = [f"In the tab, {', '.join(left)} come from the project and the loaded model."] if left else []
    if project_name:
        form_store.save_form(get_project(ctx, project_name).root, form)
    out: Result = {k: form[k] for k in FORM_KEYS if k in form}
    out["import_report"] = rep.text() + ("\n" + "\n".join(notes) if notes else "")
    return out


def export_sd_scripts(ctx: UIContext, project_name: str | None, *args: Any) -> Result:
    """The form, resolved as a run of this project would be, as sd-scripts' TOML (a file to download)."""
    from ..interop.export import export_run
    from ..interop.tomlfmt import header, table
    if not project_name:
        return {"export_text": "Open a project first: the export names its image folder."}
    project = get_project(ctx, project_name)
    values = dict(zip(FORM_KEYS, args))
    cfg, repeats = form_to_config(values)
    try:
        tc = ctx.jobs.resolve_config(project.name, cfg)
    except ConfigError as exc:
        return {"export_text": f"error: {exc}"}
    folder = cache_dir(project, "export")
    run_toml = os.path.join(folder, f"{tc.output_name}.run.toml")
    with open(run_toml, "w", encoding="utf-8") as fh:
        fh.write(header(["the run as this engine resolves it"]) + table(tc.to_dict()))
    exp = export_run(run_toml, model_family(ctx))
    out_path = os.path.join(folder, f"{tc.output_name}.sd-scripts.toml")
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.write(exp.toml())
    lines = [exp.command(os.path.basename(out_path)),
             f"The image folder is renamed to {repeats}_<name> when a run starts here; name it so for sd-scripts."]
    lines += [f"not in sd-scripts: {k} = {why}" for k, why in exp.left_out.items()]
    return {"export_file": out_path, "export_text": "\n".join(lines)}
