"""Regularisation images (prior preservation), in the Train section: a class prompt, how many, the prior loss
weight, a "Generate regularisation images" button with progress, and "use them in the run". The images are drawn
by the host's model (inside the WebUI: its own txt2img on the loaded checkpoint) into the project's cache
(prep/regimages.py); a run started with "use them" asks for the same images (reg_images_* keys), so it finds
them there instead of drawing them again. The fields are saved with the project's form (form_store)."""
from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, Iterator

from .. import background
from ..errors import ConfigError, LoraTrainError
from . import form_store
from .common import active_job, get_project
from .context import UIContext

REG_KEYS = ["reg_prompt", "reg_count", "reg_weight", "reg_use"]
REG_DEFAULTS = {"reg_prompt": "", "reg_count": 0, "reg_weight": 1.0, "reg_use": False}


def _settings(project_root: str) -> dict[str, Any]:
    saved = form_store.load_form(project_root)
    return {k: saved.get(k, REG_DEFAULTS[k]) for k in REG_KEYS}


def _resolution(ctx: UIContext, project_root: str) -> int:
    """The size the project's run trains at: the form's resolution, else the host's default."""
    saved = form_store.load_form(project_root)
    value = saved.get("resolution") or str(ctx.host.base_config().get("resolution") or "")
    try:
        return int(str(value).split(",")[0])
    except ValueError:
        return int(ctx.host.native_resolution())


def _count(count: Any, project: Any, side: int) -> int:
    """0: one epoch's training samples of the project (what a run asks for when no count is given)."""
    n = int(float(count or 0))
    if n < 0:
        raise ConfigError("Number of images: 0 (one epoch's training samples) or more")
    if n:
        return n
    from ..prep.regimages import training_sample_count
    return training_sample_count(SimpleNamespace(train_data_dir=project.train_dir, resolution_wh=(side, side),
                                                 caption_extension=".txt"))


def run_keys(project_root: str) -> dict[str, Any]:
    """The run-config keys of the project's saved settings ({} unless "use them in the run" is on)."""
    s = _settings(project_root)
    if not s["reg_use"] or not str(s["reg_prompt"]).strip():
        return {}
    keys: dict[str, Any] = {"reg_images_prompt": str(s["reg_prompt"]).strip(),
                            "prior_loss_weight": float(s["reg_weight"])}
    if int(float(s["reg_count"] or 0)) > 0:
        keys["reg_images_count"] = int(float(s["reg_count"]))
    return keys


def generate(ctx: UIContext, project_name: str | None, prompt: str, count: Any, weight: Any, use: bool,
             stop: threading.Event | None = None) -> Iterator[str]:
    """Yields status lines while the images are drawn in a background thread (the last: the result)."""
    from ..prep.regimages import RegRequest, generate_for_project
    try:
        project = get_project(ctx, project_name)
        form_store.save_form(project.root, {"reg_prompt": prompt or "", "reg_count": count, "reg_weight": weight,
                                            "reg_use": bool(use)})
        if active_job(ctx, project.name) is not None:
            raise ConfigError("this project has a run training or queued; generate when it is over")
        side = _resolution(ctx, project.root)
        req = RegRequest(prompt=prompt, count=_count(count, project, side), width=side, height=side)
    except LoraTrainError as exc:
        yield f"error: {exc}"
        return
    done: dict[str, Any] = {"n": 0}
    stop = stop or threading.Event()     # set when Python exits (background.py), if not by the caller

    def progress(n: int, total: int) -> None:
        done["n"] = n

    def work() -> None:
        try:
            done["result"] = generate_for_project(ctx.host, project, req, progress=progress, stop=stop)
        except BaseException as exc:  # noqa: BLE001 - shown in the status line
            done["error"] = exc
    thread = background.start(work, name="lora-train-reg-images", stop=stop)
    while thread.is_alive():
        yield f"drawing {req.count} images of '{req.prompt}' at {side}x{side}: {done['n']}/{req.count}"
        thread.join(0.5)
    if "error" in done:
        exc = done["error"]
        yield f"error: {exc}" if isinstance(exc, LoraTrainError) else f"error: {type(exc).__name__}: {exc}"
        return
    r = done["result"]
    where = "the WebUI's txt2img" if r["backend"] == "webui" else "the built-in sampler"
    yield (f"{r['count']} images ready in {r['folder']} ({r['reused']} from the cache, {r['generated']} drawn "
           f"by {where})" + ("; the next run uses them" if use else "; tick 'Use them in the run' to train with them"))


# ---------------------------------------------------------------- layout
def build(ctx: UIContext) -> None:
    import gradio as gr
    add = ctx.add
    with gr.Accordion("Regularisation images (prior preservation)", open=False,
                      elem_id="lora_train_reg_images"):
        gr.Markdown("Class images drawn by the base model itself keep what it already knows: the run also trains "
                    "on them (captioned with the class prompt), weighted by the prior loss weight.")
        with gr.Row():
            add("reg_prompt", gr.Textbox(label="Class prompt", placeholder="e.g. a photo of a woman, 1girl",
                                         elem_id="lora_train_reg_prompt", scale=3))
            add("reg_count", gr.Number(label="Number of images (0: one epoch's training images)", value=0,
                                       precision=0, minimum=0, elem_id="lora_train_reg_count"))
            add("reg_weight", gr.Number(label="Prior loss weight", value=1.0, minimum=0,
                                        elem_id="lora_train_reg_weight"))
        with gr.Row():
            add("reg_use", gr.Checkbox(label="Use them in the run", value=False, elem_id="lora_train_reg_use"))
            add("reg_generate", gr.Button("Generate regularisation images", elem_id="lora_train_reg_generate"))
        add("reg_status", gr.Textbox(label="Regularisation images", interactive=False,
                                     elem_id="lora_train_reg_status"))


def wire(ctx: UIContext) -> None:
    c = ctx.c

    def click(project_name: Any, prompt: Any, count: Any, weight: Any, use: Any) -> Iterator[str]:
        yield from generate(ctx, project_name, prompt, count, weight, use)
    c["reg_generate"].click(fn=click, inputs=[c[k] for k in ["project"] + REG_KEYS], outputs=[c["reg_status"]])
