"""What the Compare grid needs around the X/Y/Z plot script in the WebUI: the modules, the queue lock, the
progress state, Additional Networks' model list, the WebUI's sampler names, the processing object.
(Split from webui_xyz.py, which holds the axes, the argument builder and run_compare_grid; what both use is in
webui_xyz_lookup.py.)"""
from __future__ import annotations

import inspect
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import ConfigError, ModelError
from .webui_base import lora_networks_module
from .webui_xyz_lookup import (ADDNET_FILE, ADDNET_MODEL, ADDNET_WEIGHT, EPOCH_AXIS, PROMPT_SR, WEIGHT_AXIS,
                               find_script_module)

JOB_NAME = "lora_train_compare"
TRAINING_JOBS = ("lora-train", "task(lora-train")


@dataclass
class XYZModules:
    """The WebUI modules the grid needs. `of(obj)` takes them from any bundle with these attributes (the host's
    WebUI dataclass) and the WebUI's already-imported core modules for the ones it lacks."""
    shared: Any
    scripts: Any
    processing: Any
    call_queue: Any = None
    networks: Optional[Callable[[], Any]] = None

    @classmethod
    def of(cls, obj: Any) -> "XYZModules":
        if isinstance(obj, cls):
            return obj

        def mod(name: str) -> Any:
            return getattr(obj, name, None) or sys.modules.get(f"modules.{name}")
        found = cls(shared=mod("shared"), scripts=mod("scripts"), processing=mod("processing"),
                    call_queue=mod("call_queue"), networks=getattr(obj, "networks", None))
        missing = [n for n in ("shared", "scripts", "processing") if getattr(found, n) is None]
        if missing:
            raise ModelError(f"the WebUI modules {', '.join(missing)} are not available")
        return found

    def lora_networks(self) -> Any:
        return self.networks() if self.networks is not None else lora_networks_module()


class _Busy:
    """The WebUI's queue lock for the grid (generations wait), refused while our training holds the model."""

    def __init__(self, m: XYZModules, wait_s: float):
        self.m, self.wait_s, self.lock = m, wait_s, getattr(m.call_queue, "queue_lock", None)

    def __enter__(self) -> "_Busy":
        job = str(getattr(self.m.shared.state, "job", "") or "")
        if job.startswith(TRAINING_JOBS):
            raise ConfigError("a LoRA training run is using the WebUI's model; make the grid when it has finished")
        if self.lock is not None:
            deadline = time.monotonic() + self.wait_s
            while not self.lock.acquire(False):       # FIFOLock.acquire has no timeout: poll
                if time.monotonic() > deadline:
                    raise ConfigError(f"the WebUI stayed busy for {self.wait_s:.0f} s (a generation or a training "
                                      f"run holds the model); try again when it is done")
                time.sleep(0.25)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock is not None:
            self.lock.release()


class _StateGuard:
    """shared.state for the grid: its own job, Interrupt from `stop`, progress out; the fields a training job's
    bar shows are put back afterwards."""
    KEEP = ("job", "job_no", "job_count", "textinfo")

    def __init__(self, state: Any, stop: Optional[threading.Event], progress: Optional[Callable[[int, int], None]]):
        self.state, self.stop, self.progress = state, stop, progress
        self.interrupted = False
        self._done = threading.Event()

    def __enter__(self) -> "_StateGuard":
        self.saved = {k: getattr(self.state, k, None) for k in self.KEEP}
        if hasattr(self.state, "begin"):
            self.state.begin(job=JOB_NAME)
        self._watch = threading.Thread(target=self._watcher, name="lora-train-compare", daemon=True)
        self._watch.start()
        return self

    def _watcher(self) -> None:
        while not self._done.wait(0.2):
            st = self.state
            if self.stop is not None and self.stop.is_set() and not getattr(st, "interrupted", False):
                st.interrupt()
            if self.progress is not None:
                self.progress(int(getattr(st, "job_no", 0) or 0), int(getattr(st, "job_count", 0) or 0))

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._watch.join(timeout=2)
        st = self.state
        self.interrupted = bool(getattr(st, "interrupted", False) or getattr(st, "stopping_generation", False)
                                or (self.stop is not None and self.stop.is_set()))
        if hasattr(st, "end"):
            st.end()
        for k, v in self.saved.items():
            setattr(st, k, v)
        st.interrupted = st.skipped = st.stopping_generation = False   # the next generation starts clean


def pick_method(labels: Sequence[str], wanted: str = "auto") -> str:
    """Which axes make the grid: ours, Additional Networks' (when the extension is there), or Prompt S/R."""
    have = {
        "lora_train": EPOCH_AXIS in labels and WEIGHT_AXIS in labels,
        "addnet": ADDNET_MODEL in labels and ADDNET_WEIGHT in labels,
        "prompt_sr": PROMPT_SR in labels,
    }
    if wanted != "auto":
        if not have.get(wanted):
            raise ConfigError(f"the X/Y/Z plot script has no axes for {wanted!r}")
        return wanted
    for name in ("lora_train", "addnet", "prompt_sr"):
        if have[name]:
            return name
    raise ModelError("the X/Y/Z plot script has neither our LoRA axes, Additional Networks' nor Prompt S/R")


def check_visible(m: XYZModules, files: Sequence[Any]) -> None:
    """Each epoch file must be what the built-in Lora extension loads for its stem (freshly written files are
    picked up by a rescan; a stem two folders share resolves to one file only)."""
    nets = m.lora_networks()
    if nets is None:
        return
    def entry(stem: str) -> Any:
        return nets.available_networks.get(stem)
    if any(entry(f.name) is None for f in files) and hasattr(nets, "list_available_networks"):
        nets.list_available_networks()
    for f in files:
        e = entry(f.name)
        if e is None:
            lora_dir = getattr(getattr(m.shared, "cmd_opts", None), "lora_dir", "?")
            raise ConfigError(f"the WebUI's Lora extension does not find {f.name}: {f.path} is not inside its Lora "
                              f"folder ({lora_dir}); set the output folder of Train LoRA inside it")
        other = getattr(e, "filename", None)
        if other and os.path.realpath(other) != os.path.realpath(f.path):
            raise ConfigError(f"two LoRA files are called {f.name}: {f.path} and {other}; the WebUI loads only one "
                              f"of them by that name. Rename or move the other one.")


def addnet_model_util(m: XYZModules) -> Any:
    mod = find_script_module(m.scripts, ADDNET_FILE)
    util = getattr(mod, "model_util", None)
    return util if util is not None and hasattr(util, "update_models") else None


def addnet_refresh(m: Any, folders: Sequence[str]) -> bool:
    """Make files in `folders` visible to Additional Networks: add the folders to its extra LoRA paths (in
    memory; the user's saved settings are not written) and refresh its model list. False without AddNet."""
    m = XYZModules.of(m)
    util = addnet_model_util(m)
    if util is None:
        return False
    data = m.shared.opts.data
    key = "additional_networks_extra_lora_path"
    current = str(data.get(key) or "")
    add = [f for f in dict.fromkeys(os.path.abspath(f) for f in folders) if f not in current]
    if add:
        data[key] = ", ".join([current.strip()] * bool(current.strip())
                              + [f'"{f}"' if "," in f else f for f in add])
    util.update_models()
    return True


def _addnet_names(m: XYZModules, files: Sequence[Any]) -> list[str]:
    addnet_refresh(m, [os.path.dirname(f.path) for f in files])
    util = addnet_model_util(m)
    names = []
    for f in files:
        name = util.find_closest_lora_model_name(os.path.normpath(f.path)) if util is not None else None
        if not name:
            raise ConfigError(f"Additional Networks does not list {f.path} after a refresh")
        names.append(name)
    return names


def _split_sampler(m: XYZModules, name: str) -> tuple[str, Optional[str]]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", "Karras") with the WebUI's own rules; an unknown name is an error."""
    samplers = getattr(m.processing, "sd_samplers", None)
    split = getattr(samplers, "get_sampler_and_scheduler", None)
    if split is None:
        return name, None
    try:
        sampler, scheduler = split(name, None, convert_automatic=False)
    except TypeError:
        sampler, scheduler = split(name, None)
    known = getattr(samplers, "samplers_map", {}) or {}
    if not name.lower().startswith(str(sampler).lower()) and name.lower() not in known:
        names = [getattr(s, "name", str(s)) for s in getattr(samplers, "samplers", [])]
        raise ConfigError(f"sampler_name: unknown sampler {name!r}; the WebUI has {', '.join(names)}")
    return sampler, scheduler


def _processing(m: XYZModules, request: Any, prompt: str, width: int, height: int) -> Any:
    opts = m.shared.opts
    cls = m.processing.StableDiffusionProcessingTxt2Img
    sampler, scheduler = _split_sampler(m, request.sampler_name or "DPM++ 2M Karras")
    kw = dict(sd_model=getattr(m.shared, "sd_model", None),
              outpath_samples=getattr(opts, "outdir_samples", "") or getattr(opts, "outdir_txt2img_samples", ""),
              outpath_grids=getattr(opts, "outdir_grids", "") or getattr(opts, "outdir_txt2img_grids", ""),
              prompt=prompt, negative_prompt=request.negative_prompt or "", seed=int(request.seed),
              sampler_name=sampler, steps=int(request.steps), cfg_scale=float(request.cfg_scale), width=width,
              height=height, batch_size=1, n_iter=1)
    try:
        if scheduler and "scheduler" in inspect.signature(cls).parameters:
            kw["scheduler"] = scheduler
    except (TypeError, ValueError):
        pass
    return cls(**kw)


def sampler_names(webui_modules: Any) -> list[str]:
    """The WebUI's sampler names for the Compare view's dropdown (hidden ones left out); the host's
    `sampler_names()` returns this."""
    m = XYZModules.of(webui_modules)
    samplers = getattr(m.processing, "sd_samplers", None)
    hidden = set(getattr(m.shared.opts, "hide_samplers", None) or [])
    return [s.name for s in getattr(samplers, "samplers", None) or [] if s.name not in hidden]
