"""The WebUI host: training on the checkpoint the AUTOMATIC1111 WebUI has loaded (SD 1.x, SD 2.x or SDXL; family
and v-prediction as the WebUI decided them, webui_model.py), progress in the WebUI's own bar (webui_progress.py).

This module never imports the WebUI. `scripts/lora_train.py` (the only file the WebUI loads) hands the WebUI's
modules in as a `WebUI` bundle, so the engine stays importable without the WebUI and tests pass small stand-ins.

What a run does to the WebUI (all undone on exit, also after an error or an interrupt):
- holds `call_queue.queue_lock` for the whole run: generation requests wait and never see a half-trained model
  (a FIFOLock, not re-entrant: it is taken once, here, and nothing inside the run takes it again);
- clears the networks the built-in Lora extension left applied and puts the backed-up original weights back, so
  no LoRA is baked into the weights the run trains on;
- builds the engine's SDModel from the live model's tensors (shared, not copied, where dtype and device match);
- under --medvram(-sdxl) moves the U-Net, VAE and text encoder(s) to the device for the run and back afterwards;
  --lowvram is refused;
- drives `shared.state` (job count = steps, text, live preview) and stops at the WebUI's Interrupt.
"""
import contextlib
import os
import threading
from typing import Any, Iterator, Optional

from ..errors import ConfigError, ModelError
from .base import HostPaths, checkpoint_kind, family_label, native_resolution_of
from .webui_base import (OPT_OUTPUT_DIR, OPT_PROJECTS_DIR, TAB_ID, TAB_TITLE, WebUI,  # noqa: F401
                         _same_file, log, lora_networks_module)
from .webui_model import engine_model, first_device, live_family, live_state_dict, model_parts, shared_count
from .webui_progress import _Session, _stop_asked, step_text, task_id

__all__ = ["WebUI", "WebUIHost", "host_and_jobs", "live_state_dict", "shared_count", "step_text", "task_id",
           "_stop_asked"]

class WebUIHost:
    name = "webui"

    def __init__(self, webui: WebUI, *, ext_dir: Optional[str] = None):
        self.webui = webui
        self.ext_dir = ext_dir
        self._session: Optional[_Session] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ folders and defaults
    def _opt(self, key: str) -> str:
        opts = getattr(self.webui.shared, "opts", None)
        data = getattr(opts, "data", None) or {}
        return str(data.get(key) or "").strip()

    def _data_path(self) -> str:
        return os.path.abspath(getattr(self.webui.paths, "data_path", None) or os.getcwd())

    def _resolve(self, value: str) -> str:
        value = os.path.expanduser(value)
        return os.path.abspath(value if os.path.isabs(value) else os.path.join(self._data_path(), value))

    def lora_dir(self) -> str:
        """The built-in Lora extension's folder (--lora-dir, default models/Lora)."""
        given = getattr(self.webui.shared.cmd_opts, "lora_dir", None)
        if given:
            return self._resolve(given)
        models = getattr(self.webui.paths, "models_path", None) or os.path.join(self._data_path(), "models")
        return os.path.abspath(os.path.join(models, "Lora"))

    @property
    def paths(self) -> HostPaths:
        projects = self._opt(OPT_PROJECTS_DIR)
        projects = self._resolve(projects) if projects else os.path.join(self._data_path(), "lora_train", "projects")
        out = self._opt(OPT_OUTPUT_DIR)
        loras = self._resolve(out) if out else self.lora_dir()
        models = []
        ckpt_dirs = [getattr(self.webui.sd_models, "model_path", None),
                     getattr(self.webui.shared.cmd_opts, "ckpt_dir", None)]
        info = self._checkpoint_info()
        if info is not None and getattr(info, "filename", None):
            ckpt_dirs.append(os.path.dirname(info.filename))
        for d in [*ckpt_dirs, self.lora_dir()]:
            if d and os.path.abspath(d) not in models:
                models.append(os.path.abspath(d))
        for d in (projects, loras):
            os.makedirs(d, exist_ok=True)
        return HostPaths(projects=projects, loras=loras, models=models)

    def _loaded_model(self):
        """The WebUI's model if one is loaded, without triggering a load (None otherwise)."""
        sd_models = self.webui.sd_models
        data = getattr(sd_models, "model_data", None)
        if data is not None and hasattr(data, "sd_model"):
            return data.sd_model
        return getattr(self.webui.shared, "sd_model", None)

    def _checkpoint_info(self):
        model = self._loaded_model()
        return getattr(model, "sd_checkpoint_info", None) if model is not None else None

    def base_config(self) -> dict:
        dev = self.webui.devices
        device = getattr(dev, "device", None)
        dtype = getattr(dev, "dtype_unet", None) or getattr(dev, "dtype", None)
        dev_type = getattr(device, "type", str(device or "cpu"))
        name = "cpu" if device is None else (dev_type if getattr(device, "index", None) is None else str(device))
        # The WebUI's own precision: half models train with fp16 autocast; on the CPU (always float32 there) none.
        precision = "no" if dev_type == "cpu" else {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(
            str(dtype), "no")
        info = self._checkpoint_info()
        # resolution: the loaded family's own (1024 SDXL, 768 SD 2.x v, 512), the default of every run
        return {"pretrained_model_name_or_path": getattr(info, "filename", "") or "", "device": name,
                "mixed_precision": precision, "resolution": str(self.native_resolution())}

    def checkpoint_label(self) -> str:
        info = self._checkpoint_info()
        if info is None:
            return "the WebUI's checkpoint (none loaded yet)"
        name = getattr(info, 'title', None) or os.path.basename(info.filename)
        return f"the loaded checkpoint: {name} ({family_label(*self._kind())})"

    def _kind(self) -> tuple:
        """(family, prediction_type) of the loaded model, or of the selected checkpoint's file before the WebUI
        has loaded one (the tab is built first); SD 1.x when neither is known."""
        model = self._loaded_model()
        if model is not None and not _placeholder(model):
            return live_family(model)
        select = getattr(self.webui.sd_models, "select_checkpoint", None)
        with contextlib.suppress(Exception):
            kind = checkpoint_kind(getattr(select(), "filename", None)) if select else None
            if kind:
                return kind
        return "sd1", "epsilon"

    def model_family(self) -> str:
        return self._kind()[0]

    def native_resolution(self) -> int:
        return native_resolution_of(*self._kind())

    # ------------------------------------------------------------------ one training run
    @contextlib.contextmanager
    def training_session(self, cfg) -> Iterator[Any]:
        shared = self.webui.shared
        if getattr(shared.cmd_opts, "lowvram", False):
            raise ConfigError("the WebUI runs with --lowvram, which moves every block to the GPU and back during "
                              "a forward pass; training through that is not possible. Restart the WebUI without "
                              "--lowvram (--medvram works) to train.")
        lock = self.webui.call_queue.queue_lock
        lock.acquire()      # generations wait until the run is over (and a run waits for a generation)
        session = _Session()
        session.cfg = cfg
        with self._lock:
            self._session = session
        state = shared.state
        try:
            state.begin(job="lora-train")
            if not self._uses_loaded_model(cfg):
                yield None          # the config names another checkpoint file: the engine loads that one
                return
            sd_model = shared.sd_model
            if sd_model is None:
                raise ModelError("the WebUI has no checkpoint loaded; select one in the checkpoint dropdown first")
            self._check_model(sd_model)
            cleared = self._clear_networks(sd_model)
            if cleared:
                log(f"restored the original weights of {cleared} layers the Lora extension had changed")
            moved = self._to_device_for_medvram(sd_model)
            try:
                yield self._sd_model(sd_model)
            finally:
                for part, device in moved:
                    part.to(device)
                if moved:
                    log("moved the model parts back where --medvram keeps them")
        finally:
            session.close()
            if session.task and self.webui.progress is not None:
                with contextlib.suppress(Exception):
                    self.webui.progress.finish_task(session.task)
            with contextlib.suppress(Exception):
                state.end()
            # What the WebUI's own wrap_gradio_call resets after a job: the next job starts clean.
            state.interrupted = state.skipped = state.stopping_generation = False
            state.job_count, state.job = 0, ""
            with self._lock:
                if self._session is session:
                    self._session = None
            lock.release()

    def _uses_loaded_model(self, cfg) -> bool:
        wanted = getattr(cfg, "pretrained_model_name_or_path", "") or ""
        if hasattr(self._loaded_model(), "forge_objects"):
            # Forge keeps its models in patchers (fp8/nf4 storage, no ldm modules): the engine reads the file.
            log("Forge: training on the checkpoint file, not on the model in memory")
            return False
        info = self._checkpoint_info()
        if not wanted:
            return True
        return info is not None and bool(getattr(info, "filename", None)) and _same_file(wanted, info.filename)

    def _check_model(self, sd_model) -> None:
        if getattr(sd_model, "is_sd3", False):
            raise ModelError("the loaded checkpoint is SD 3; LoRA training supports SD 1.x, SD 2.x and SDXL. Load "
                             "one of those in the WebUI, or name one with pretrained_model_name_or_path.")
        if getattr(sd_model, "is_ssd", False):
            raise ModelError("the loaded checkpoint is SSD-1B (a reduced SDXL); LoRA training supports the full "
                             "SDXL, SD 2.x and SD 1.x architectures")
        if getattr(self.webui.devices, "fp8", False):
            raise ConfigError("the WebUI stores weights in FP8 (Settings > Optimizations > FP8 weight); LoRA "
                              "training needs the full weights. Turn FP8 off to train.")
        if getattr(sd_model, "lowvram", False) and not getattr(self.webui.shared.cmd_opts, "medvram", False) \
                and not getattr(self.webui.shared.cmd_opts, "medvram_sdxl", False):
            raise ConfigError("the WebUI's model is in low-VRAM mode; restart without --lowvram to train")

    def _networks(self):
        return self.webui.networks() if self.webui.networks is not None else lora_networks_module()

    def _clear_networks(self, sd_model) -> int:
        """Unload the Lora extension's networks and write the backed-up original weights back (the extension
        merges LoRAs into the weights in place and restores them only at its next forward)."""
        import torch

        nets = self._networks()
        if nets is None:
            return 0
        try:
            nets.load_networks([])
        except Exception:  # noqa: BLE001 - an older/newer extension: at least empty the list
            loaded = getattr(nets, "loaded_networks", None)
            if isinstance(loaded, list):
                loaded.clear()
        restore = getattr(nets, "network_restore_weights_from_backup", None)
        reset = getattr(nets, "network_reset_cached_weight", None)
        count = 0
        with torch.no_grad():
            for module in sd_model.modules():
                weights = getattr(module, "network_weights_backup", None)
                bias = getattr(module, "network_bias_backup", None)
                if weights is None and bias is None:
                    continue
                if restore is not None:
                    restore(module)
                else:
                    _restore_backup(module, weights, bias)
                if reset is not None:
                    reset(module)          # backups dropped: the weights are the originals again
                else:
                    module.network_current_names = ()
                    module.network_weights_backup = module.network_bias_backup = None
                count += 1
        return count

    def _to_device_for_medvram(self, sd_model) -> list:
        """--medvram keeps the UNet, VAE and text encoder on the CPU and moves one at a time during a forward;
        a training step needs all three. Returns [(part, device it was on)] to move back afterwards."""
        if not getattr(sd_model, "lowvram", False):
            return []
        device = self.webui.devices.device
        moved = []
        try:
            for part in model_parts(sd_model):
                was = first_device(part)
                if was is not None and was != device:
                    moved.append((part, was))
                    part.to(device)
        except BaseException:      # e.g. out of memory on the second part: put back what moved
            for part, was in moved:
                part.to(was)
            raise
        if moved:
            log(f"--medvram: moved {len(moved)} model parts to {device} for the run")
        return moved

    def _sd_model(self, sd_model):
        return engine_model(sd_model, log)

    @property
    def live_model(self):
        """The loaded model for the Tools section's live merge (None when none is loaded or on Forge, whose
        model is not one torch module)."""
        sd_model = self._loaded_model()
        if sd_model is None or hasattr(sd_model, "forge_objects") or not hasattr(sd_model, "named_parameters"):
            return None
        from .webui_support import WebUILiveModel

        return WebUILiveModel(self, sd_model)

    def compare_grid(self, request, *, stop=None, progress=None):
        """The Compare view's grid, made by the WebUI's own X/Y/Z plot script with our axes."""
        from .webui_xyz import run_compare_grid

        return run_compare_grid(self.webui, request, stop=stop, progress=progress)

    @property
    def preview_renderer(self):
        """Training previews made by the WebUI's own txt2img pipeline (the jobs pass it to the engine), with the
        run's preview clip skip (sample_clip_skip, else its clip_skip, else 1) instead of the WebUI's setting."""
        from .webui_previews import make_preview_renderer
        cfg = getattr(self._session, "cfg", None)
        clip_skip = None if cfg is None else (getattr(cfg, "sample_clip_skip", None) or cfg.clip_skip or 1)
        return make_preview_renderer(self.webui, self._clear_networks, clip_skip=clip_skip)

    def reg_image_source(self, take_lock: bool = True):
        """Regularisation images drawn by the WebUI's own txt2img on the loaded checkpoint (webui_regimages.py):
        a context yielding (model_id, "webui", render); take_lock=False inside a run, which holds the lock."""
        from .webui_regimages import webui_reg_source

        return webui_reg_source(self.webui, take_lock=take_lock)

    def sampler_names(self) -> list:
        from .webui_xyz_runtime import sampler_names

        return sampler_names(self.webui)

    def tool_progress(self, label: str, stop: threading.Event):
        from .webui_support import tool_progress

        return tool_progress(self, label, stop)

    def checkpoints_written(self, paths: list) -> None:
        """A merged checkpoint was written: list it in the WebUI's checkpoint dropdown."""
        list_models = getattr(self.webui.sd_models, "list_models", None)
        if callable(list_models):
            list_models()

    # ------------------------------------------------------------------ progress, outputs, taggers
    def progress_sink(self, job, stop: threading.Event):
        session = self._session
        if session is None:
            return None
        return session.attach(self.webui, job, stop)

    def progress_task_id(self, job_id: str) -> str:
        """The id the tab's JS hands to the WebUI's requestProgress() to draw the WebUI's bar for this job."""
        return task_id(job_id)

    def outputs_written(self, paths: list) -> None:
        nets = self._networks()
        if nets is not None:
            nets.list_available_networks()
            log(f"Lora list refreshed: {', '.join(os.path.basename(p) for p in paths)}")
        with contextlib.suppress(Exception):     # Additional Networks, when installed, lists them too
            from .webui_xyz_runtime import addnet_refresh
            addnet_refresh(self.webui, sorted({os.path.dirname(p) for p in paths}))

    def taggers(self):
        if self.webui.deepbooru is None and getattr(self.webui.shared, "interrogator", None) is None:
            return None
        from .webui_support import WebUITaggers

        return WebUITaggers(self.webui)


def _placeholder(model) -> bool:
    """Forge's FakeInitialModel before its lazy load: no weights, no family yet."""
    return type(model).__name__ == "FakeInitialModel"


def _restore_backup(module, weights, bias) -> None:
    if weights is not None:
        if isinstance(weights, tuple):      # MultiheadAttention: (in_proj_weight, out_proj.weight)
            module.in_proj_weight.copy_(weights[0])
            module.out_proj.weight.copy_(weights[1])
        else:
            module.weight.copy_(weights)
    if bias is not None:
        target = module.out_proj if hasattr(module, "out_proj") else module
        target.bias.copy_(bias)


# ----------------------------------------------------------------------------- one manager per process

_SINGLE: dict = {}


def host_and_jobs(webui: WebUI, *, ext_dir: Optional[str] = None, host_class=None):
    """The process's one host and JobManager. The script calls this on every (re)load; "Reload UI" re-executes
    the script but not this module, so running and finished jobs survive it. `host_class`: the adapter of the
    running WebUI (hosts/detect.py: WebUIHost, ForgeHost or ReForgeHost)."""
    from ..jobs import JobManager

    host = _SINGLE.get("host")
    if host is None:
        host = (host_class or WebUIHost)(webui, ext_dir=ext_dir)
        _SINGLE["host"], _SINGLE["jobs"] = host, JobManager(host)
    else:
        host.webui, host.ext_dir = webui, ext_dir or host.ext_dir
    return host, _SINGLE["jobs"]
