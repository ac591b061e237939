"""Section 2, Preprocess: the options of lib_lora_train.prep.preprocess (used by every import) and "preprocess
again" from the project's source copies (ui/reprocess.py)."""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..prep.preprocess import PreprocessOptions
from .context import Result, UIContext
from .data_views import refresh_after_data_change

BACKGROUNDS = ("white", "black")
MODES = {"keep aspect ratio": "bucket", "center crop": "center", "focal crop": "focal"}
PP_KEYS = ["pp_background", "pp_mode", "pp_resolution", "pp_flip"]
PP_DEFAULTS = {"pp_background": "white", "pp_mode": "keep aspect ratio", "pp_resolution": 512, "pp_flip": False}


def preprocess_options(background: Any = "white", mode: Any = "keep aspect ratio", resolution: Any = 512,
                       flip: Any = False) -> PreprocessOptions:
    if mode not in MODES:
        raise ConfigError(f"preprocess mode must be one of {', '.join(MODES)}, got {mode!r}")
    try:
        res = int(float(resolution))
    except (TypeError, ValueError):
        raise ConfigError(f"target size must be a number like 512, got {resolution!r}") from None
    opts = PreprocessOptions(resolution=res, mode=MODES[mode], background=str(background), flip=bool(flip))
    opts.validate()
    return opts


def run_again(ctx: UIContext, project_name: str, *pp_values: Any) -> Result:
    from .common import active_job, get_project
    from .reprocess import reprocess_project, summary_text
    project = get_project(ctx, project_name)
    if active_job(ctx, project.name) is not None:
        raise ConfigError("a run of this project is training; preprocess after it ends (or stop it)")
    results = reprocess_project(project, preprocess_options(*pp_values))
    out = refresh_after_data_change(ctx, project.name)
    out["pp_status"] = summary_text(project, results)
    return out


def build(ctx: UIContext, resolution: int) -> None:
    import gradio as gr
    add = ctx.add
    gr.Markdown("These options apply to every import; preprocess again to apply new ones to the imported images.")
    with gr.Row():
        add("pp_background", gr.Radio(label="Background", choices=list(BACKGROUNDS), value="white",
                                      elem_id="lora_train_pp_background",
                                      info="Transparent parts become this colour"))
        add("pp_mode", gr.Radio(label="Fit", choices=list(MODES), value="keep aspect ratio",
                                elem_id="lora_train_pp_mode",
                                info="Keep the shape and only shrink, or crop a square from the centre or "
                                     "around the subject"))
    with gr.Row():
        add("pp_resolution", gr.Number(label="Target size", value=resolution, precision=0,
                                       elem_id="lora_train_pp_resolution",
                                       info="512, 768, 1024 or another multiple of 64"))
        add("pp_flip", gr.Checkbox(label="Add mirrored copies", value=False, elem_id="lora_train_pp_flip",
                                   info="Doubles the images; avoid it for asymmetric subjects"))
    add("pp_button", gr.Button("Preprocess again", elem_id="lora_train_preprocess_button"))
    add("pp_status", gr.Textbox(label="Preprocess result", interactive=False, lines=2,
                                elem_id="lora_train_pp_status"))


def wire(ctx: UIContext, data_outputs: list[str]) -> None:
    ctx.on(ctx.c["pp_button"].click, run_again, ["project"] + PP_KEYS, data_outputs + ["pp_status"],
           status="pp_status")
