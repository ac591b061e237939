"""The reForge host (Panchovix/stable-diffusion-webui-reForge): the A1111 host with reForge's `ldm_patched`
differences. Never imports reForge; its memory manager (`ldm_patched.modules.model_management`) is found among
the modules reForge has already imported.

reForge keeps A1111's LatentDiffusion / DiffusionEngine shell (`sd_model.model.diffusion_model`,
`first_stage_model`, the hijacked `cond_stage_model` / `conditioner` with their `.wrapped` levels), but the
modules inside are its ComfyUI-style patchers' (`sd_model.forge_objects`). What differs, and what this class does:
- LoRAs are not merged by A1111's Lora code at each forward: reForge's Lora extension adds weight patches to
  cloned patchers, and the memory manager merges them into the weights when it loads the model for a generation
  (originals in the patcher's backup), leaving them merged until the model is unloaded. Before a run the memory
  manager is asked to unload everything, which puts the original weights back; the next generation patches
  again what its prompt asks for.
- Unloaded models sit on the manager's offload device: the three parts go to the compute device for the run and
  back afterwards (A1111's --medvram path does the same for its own reasons).
- The checkpoint file is not read: the run trains on the loaded tensors, shared (not copied), as on A1111.
- `shared.state`, `call_queue.queue_lock`, the X/Y/Z script and the Lora list (`networks.list_available_networks`)
  are A1111's, unchanged.
"""
import contextlib
import sys
from typing import Any, Optional

from .detect import REFORGE_MEMORY
from .webui import WebUIHost, _same_file, log
from .webui_model import first_device, model_parts


class ReForgeHost(WebUIHost):
    name = "reforge"

    def __init__(self, webui, *, ext_dir: Optional[str] = None, memory: Any = None):
        super().__init__(webui, ext_dir=ext_dir)
        self._memory = memory

    @property
    def memory(self) -> Any:
        """ldm_patched.modules.model_management, as reForge imported it (None outside reForge)."""
        return self._memory if self._memory is not None else sys.modules.get(REFORGE_MEMORY)

    def _uses_loaded_model(self, cfg) -> bool:
        """The loaded model unless the config names another file (A1111's rule; reForge's model is an A1111
        model with ComfyUI modules inside, so it is trained in memory, not read from the file)."""
        wanted = getattr(cfg, "pretrained_model_name_or_path", "") or ""
        info = self._checkpoint_info()
        if not wanted:
            return True
        return info is not None and bool(getattr(info, "filename", None)) and _same_file(wanted, info.filename)

    def _clear_networks(self, sd_model) -> int:
        """A1111's clean-up (harmless here), then the memory manager unloads every model: each patcher's
        unpatch puts back the weights it had merged LoRAs into."""
        count = super()._clear_networks(sd_model)
        memory = self.memory
        if memory is None or not hasattr(memory, "unload_all_models"):
            return count
        patched = _patched_weight_count(memory)
        memory.unload_all_models()
        with contextlib.suppress(Exception):
            memory.soft_empty_cache()
        return count + patched

    def _to_device_for_medvram(self, sd_model) -> list:
        """All three parts on the compute device for the run, back where the memory manager left them after."""
        if getattr(sd_model, "lowvram", False):
            return super()._to_device_for_medvram(sd_model)
        device = self.webui.devices.device
        moved = []
        try:
            for part in model_parts(sd_model):
                was = first_device(part)
                if was is not None and str(was) != str(device):
                    moved.append((part, was))
                    part.to(device)
        except BaseException:
            for part, was in moved:
                part.to(was)
            raise
        if moved:
            log(f"reForge: moved {len(moved)} model parts to {device} for the run")
        return moved


def _patched_weight_count(memory: Any) -> int:
    """How many weights the loaded patchers hold backups of (merged LoRA weights unloading will restore)."""
    total = 0
    for loaded in list(getattr(memory, "current_loaded_models", []) or []):
        patcher = getattr(loaded, "model", None)
        total += len(getattr(patcher, "backup", {}) or {})
    return total
