"""What the WebUI host's modules share (webui.py: the host; webui_support, webui_previews: what it uses): the bundle
of the WebUI's modules, the tab's names and settings, the log line, and finding the built-in Lora extension.
Never imports the WebUI."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

TAB_TITLE = "Train LoRA"
TAB_ID = "lora_train"
OPT_OUTPUT_DIR = "lora_train_output_dir"        # settings (registered by webui_support.register_settings)
OPT_PROJECTS_DIR = "lora_train_projects_dir"


def log(message: str) -> None:
    print(f"[lora-train] {message}", flush=True)


@dataclass
class WebUI:
    """The WebUI's modules this host uses (the real ones from scripts/lora_train.py, stand-ins in tests)."""
    shared: Any                      # modules.shared: sd_model, cmd_opts, opts, state, interrogator
    devices: Any                     # modules.devices: device, dtype, dtype_unet, fp8, autocast, torch_gc
    call_queue: Any                  # modules.call_queue: queue_lock
    paths: Any                       # modules.paths: data_path, models_path
    sd_models: Any = None            # modules.sd_models: model_path
    progress: Any = None             # modules.progress: start_task, finish_task
    lowvram: Any = None              # modules.lowvram: send_everything_to_cpu
    deepbooru: Any = None            # modules.deepbooru: model
    images: Any = None               # modules.images: resize_image
    # The built-in Lora extension's `networks` module (loaded by its script, found in sys.modules when needed).
    networks: Optional[Callable[[], Any]] = None


def lora_networks_module() -> Any:
    """The already-imported `networks` module of extensions-builtin/Lora, or None (e.g. Forge, or disabled)."""
    mod = sys.modules.get("networks")
    if mod is not None and hasattr(mod, "loaded_networks") and hasattr(mod, "list_available_networks"):
        return mod
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
