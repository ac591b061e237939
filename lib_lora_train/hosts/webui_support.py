"""The WebUI glue's smaller parts: taggers on the WebUI's DeepBooru / BLIP, --api-auth for the HTTP API, the
settings section, and what the tab shows when a dependency is missing. Like `webui.py`, never imports the WebUI:
the objects come in through the `WebUI` bundle or as arguments.
"""
import contextlib
import os
import sys
from typing import Any, Optional

from ..errors import ConfigError
from .webui_base import OPT_OUTPUT_DIR, OPT_PROJECTS_DIR, TAB_TITLE, WebUI, log
from .webui_progress import _stop_asked

# shared.state fields a tagger call must not change under a running job's progress display
STATE_FIELDS = ("job", "job_no", "job_count", "textinfo", "time_start", "sampling_step", "sampling_steps",
                "interrupted", "skipped", "stopping_generation", "job_timestamp")


class WebUITaggers:
    """lib_lora_train.prep.taggers.HostTaggers on the WebUI's DeepBooru and BLIP. Each call takes the WebUI's
    queue lock (the models go to the GPU), so call it from a plain handler, never from inside a function wrapped
    with wrap_gradio_gpu_call (the lock is not re-entrant)."""

    def __init__(self, webui: WebUI):
        self.webui = webui

    @contextlib.contextmanager
    def _turn(self):
        state = self.webui.shared.state
        saved = {k: getattr(state, k, None) for k in STATE_FIELDS}
        with self.webui.call_queue.queue_lock:
            try:
                yield
            finally:
                for k, v in saved.items():
                    with contextlib.suppress(Exception):
                        setattr(state, k, v)

    def deepbooru_tags(self, image) -> list:
        import numpy as np
        import torch

        if self.webui.deepbooru is None:
            raise ConfigError("the WebUI's DeepBooru is not available")
        db, dev = self.webui.deepbooru.model, self.webui.devices
        with self._turn():
            db.start()
            try:
                rgb = image.convert("RGB")
                if self.webui.images is not None:
                    pic = self.webui.images.resize_image(2, rgb, 512, 512)   # 2 = resize and fill, as the WebUI
                else:
                    pic = rgb.resize((512, 512))
                arr = np.expand_dims(np.asarray(pic, dtype=np.float32), 0) / 255
                autocast = getattr(dev, "autocast", None)
                with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
                    x = torch.from_numpy(arr).to(dev.device, getattr(dev, "dtype", torch.float32))
                    y = db.model(x)[0].detach().float().cpu().numpy()
            finally:
                db.stop()
        return [(str(t), float(p)) for t, p in zip(db.model.tags, y) if not str(t).startswith("rating:")]

    def blip_caption(self, image) -> str:
        interrogator = getattr(self.webui.shared, "interrogator", None)
        if interrogator is None:
            raise ConfigError("the WebUI's BLIP interrogator is not available")
        with self._turn():
            if self.webui.lowvram is not None:
                self.webui.lowvram.send_everything_to_cpu()
            interrogator.load()
            try:
                return str(interrogator.generate_caption(image.convert("RGB")))
            finally:
                interrogator.unload()


def api_auth_dependencies(api_auth: Optional[str]) -> list:
    """FastAPI dependencies that honour the WebUI's --api-auth "user:pass,user2:pass2" (HTTP basic), like the
    WebUI's own Api class; [] when it is not set. Routes added straight to the app get no auth otherwise."""
    if not api_auth:
        return []
    import secrets

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    credentials = {}
    for entry in str(api_auth).split(","):
        user, sep, password = entry.strip().partition(":")
        if sep and user:
            credentials[user] = password

    def check_api_auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        if expected is not None and secrets.compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})
    return [check_api_auth]


def register_settings(shared) -> None:
    """The "Train LoRA" section of the WebUI's settings (category Training)."""
    section = ("lora_train", TAB_TITLE)        # add_option takes (id, title); the category goes apart

    def option(default, label, info):
        item = shared.OptionInfo(default, label, section=section, category_id="training")
        return item.info(info) if hasattr(item, "info") else item
    shared.opts.add_option(OPT_OUTPUT_DIR, option(
        "", "Folder for trained LoRAs", "empty: the Lora folder (--lora-dir, models/Lora); each project gets a "
        "sub-folder. A folder outside the Lora folder is not listed in the Lora tab"))
    shared.opts.add_option(OPT_PROJECTS_DIR, option(
        "", "Folder for training projects (images, captions)", "empty: lora_train/projects in the WebUI's data "
        "folder; relative paths are inside the data folder"))


STATUS_FILE = ".install_status.json"     # written by install.py in the extension's folder


def install_failures(ext_dir: Optional[str]) -> list:
    """What install.py reported it could not install (none when it never ran: --skip-install)."""
    import json

    try:
        with open(os.path.join(ext_dir or "", STATUS_FILE), encoding="utf-8") as fh:
            status = json.load(fh)
    except (OSError, ValueError):
        return []
    return [f"install.py could not install {f.get('name')}: {f.get('error')}" for f in status.get("failed") or []]


def dependency_problem(ext_dir: Optional[str], python: str):
    """(message, fix command) when the extension cannot work in this Python, else (None, None)."""
    from . import webui_deps

    report = webui_deps.check()
    failures = install_failures(ext_dir)
    if not report.ok:
        message = "\n".join([webui_deps.describe(report, python), *failures])
        return message, webui_deps.fix_command(report, python)
    try:   # installed but not importable (e.g. a diffusers too new for the WebUI's transformers)
        import diffusers
        import lycoris  # noqa: F401
        diffusers.UNet2DConditionModel  # noqa: B018 - diffusers imports its modules lazily
    except Exception as exc:  # noqa: BLE001
        pins = f"diffusers=={webui_deps.REQUIRED[0].pin} lycoris-lora=={webui_deps.REQUIRED[1].pin}"
        return (f"diffusers / lycoris-lora do not import in the WebUI's Python: {type(exc).__name__}: {exc}. "
                f"Verified with this WebUI: {pins}."), f"{python} -m pip install --no-deps {pins}"
    for line in failures + [webui_deps.describe(report, python)] * bool(report.problems):
        log(line)            # optional packages only: the tab works without them
    return None, None


def dependency_tab(message: str, command: Optional[str]):
    """The tab shown when the extension cannot work: what is missing and the command that fixes it."""
    import html

    import gradio as gr

    body = "<br>".join(html.escape(line) for line in message.splitlines())
    with gr.Blocks(analytics_enabled=False) as block:
        gr.HTML(f"<h2>{TAB_TITLE} cannot start</h2><p>{body}</p>"
                + (f"<p>Stop the WebUI, run this and start the WebUI again:</p><pre>{html.escape(command)}</pre>"
                   if command else ""), elem_id="lora_train_dependency_problem")
    return block


class WebUILiveModel:
    """The WebUI's loaded model as a hosts.live_merge.LiveModel, for the Tools section's "Load into the live
    model": the lock is the WebUI's queue lock (generations wait while weights change), and before a write the
    built-in Lora extension's in-place merges are undone so our merge starts from (and restores to) the
    checkpoint's own weights; after a write the WebUI's cached prompt conds are dropped (they were encoded with
    the old text-encoder weights)."""

    def __init__(self, host: Any, sd_model: Any):
        from .live_merge import ModuleLiveModel

        self._host, self._sd_model = host, sd_model
        self._view = ModuleLiveModel(sd_model, host.webui.call_queue.queue_lock)
        self.lock = self._view.lock

    def state_dict_view(self) -> Any:
        return self._view.state_dict_view()

    def label(self) -> str:
        info = getattr(self._sd_model, "sd_checkpoint_info", None)
        return getattr(info, "title", None) or getattr(info, "name", None) or "the loaded checkpoint"

    def before_write(self) -> None:
        self._host._clear_networks(self._sd_model)

    def after_write(self, keys: Any) -> None:
        clear_cond_cache()

    def busy(self) -> Any:
        return "a training run uses the model" if self._host._session is not None else None


# The processing classes' class-level caches of the last prompt's text-encoder output ([key, conds]). The key is
# the prompt and settings (plus <lora:...> tokens), not the weights, and with "Persistent cond cache" (the
# default) they outlive a generation.
COND_CACHES = {"StableDiffusionProcessing": ("cached_c", "cached_uc"),
               "StableDiffusionProcessingTxt2Img": ("cached_hr_c", "cached_hr_uc")}


def clear_cond_cache(processing: Any = None) -> int:
    """Forget the WebUI's cached prompt conditionings, so the next generation encodes its prompts with the text
    encoder's current weights (a live merge or restore changes them in place; without this a repeated prompt
    would reuse conds of the old weights). `processing`: modules.processing (default: the imported one).
    Returns how many caches were reset."""
    processing = processing if processing is not None else sys.modules.get("modules.processing")
    count = 0
    for cls_name, attrs in COND_CACHES.items():
        cls = getattr(processing, cls_name, None)
        for attr in attrs if cls is not None else ():
            if isinstance(getattr(cls, attr, None), list):
                setattr(cls, attr, [None, None])
                count += 1
    return count


@contextlib.contextmanager
def tool_progress(host: Any, label: str, stop: Any):
    """The Tools section's long jobs (merge, extract, resize) the WebUI way: shared.state shows the job and its
    count, and the WebUI's Interrupt sets `stop`. While a training run owns shared.state nothing is touched
    (yields None)."""
    import threading
    import time

    from ..events import PROGRESS

    if host._session is not None:
        yield None
        return
    state = host.webui.shared.state
    state.begin(job=f"lora-train-tool: {label}")
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if _stop_asked(state):
                stop.set()
                return
            time.sleep(0.25)

    def sink(event: Any) -> None:
        if event.kind == PROGRESS:
            d = event.data
            state.job_count = max(int(d.get("total") or 0), 1)
            state.job_no = int(d.get("done") or 0)
            state.textinfo = f"{label}: {d.get('stage', '')} {d.get('done')}/{d.get('total')}"

    watcher = threading.Thread(target=watch, name="lora-train-tool-interrupt", daemon=True)
    watcher.start()
    try:
        yield sink
    finally:
        done.set()
        watcher.join(timeout=1)
        with contextlib.suppress(Exception):
            state.end()
        state.interrupted = state.stopping_generation = False
        state.job_count, state.job = 0, ""
