"""The Forge 2.x host (lllyasviel/stable-diffusion-webui-forge): the A1111 host with Forge's differences. Never
imports Forge; `scripts/lora_train.py` hands in the same `WebUI` bundle as on A1111 and this adapter finds Forge's
memory manager (`backend.memory_management`) among the modules Forge has already imported.

What differs from A1111 (hosts/webui.py), and what this class does about it:
- The model loads lazily: selecting a checkpoint only records it; `sd_models.forge_model_reload()` loads it. A run
  calls that entry point first (under the queue lock), so it trains on the checkpoint the user selected.
- The model is a `ForgeDiffusionEngine` holding patchers, not one torch module: the engine's SDModel is built
  from `forge_objects` on Forge's own tensors (shared, not copied; hosts/forge_model.py). fp8 / nf4 / fp4 / gguf storage is refused with what to change.
- LoRAs are weight patches merged by the patchers' LoraLoader when a model is loaded to the device: the memory
  manager is asked to unload everything and the original weights are put back before the run; the next
  generation patches again what its prompt asks for. Nothing of the run stays in Forge's model.
- The memory manager keeps models on their offload device between generations: the three parts go to the
  compute device for the run and back to where they were afterwards, and the manager's cache is emptied.
- Progress and Interrupt: `shared.state` and `call_queue.queue_lock` are as on A1111 (unchanged code path).
- Previews: Forge's txt2img path reloads and patches the model in the middle of a run; the engine's own sampler
  draws the previews instead (see `preview_renderer`).
"""
import contextlib
import sys
from typing import Any, Optional

from . import forge_model
from .detect import FORGE_MEMORY
from .webui import WebUIHost, _same_file, log


class _InferenceMove:
    """A Forge module moved back after the run inside inference mode (Forge's tensors are inference tensors,
    whose data cannot be replaced outside it)."""

    def __init__(self, module: Any):
        self.module = module

    def to(self, device: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.module.to(device)


class ForgeHost(WebUIHost):
    name = "forge"

    def __init__(self, webui, *, ext_dir: Optional[str] = None, memory: Any = None):
        super().__init__(webui, ext_dir=ext_dir)
        self._memory = memory

    @property
    def memory(self) -> Any:
        """backend.memory_management, as Forge imported it (None outside Forge)."""
        return self._memory if self._memory is not None else sys.modules.get(FORGE_MEMORY)

    # ------------------------------------------------------------------ the model Forge has (or will have)
    def _reload(self) -> Any:
        reload = getattr(self.webui.sd_models, "forge_model_reload", None)
        if reload is None:
            return self._loaded_model()
        model, reloaded = reload()
        if reloaded:
            log(f"Forge loaded {getattr(getattr(model, 'sd_checkpoint_info', None), 'title', 'the checkpoint')}")
        return model

    def _kind(self) -> tuple:
        model = self._loaded_model()
        if model is not None and hasattr(model, "forge_objects"):
            family, prediction = forge_model.forge_family(model)
            if family != "other":
                return family, prediction
        return super()._kind()

    def _checkpoint_info(self):
        """The checkpoint Forge has loaded, else the one selected for its next load."""
        info = super()._checkpoint_info()
        if info is not None:
            return info
        params = getattr(getattr(self.webui.sd_models, "model_data", None), "forge_loading_parameters", None) or {}
        return params.get("checkpoint_info")

    def _uses_loaded_model(self, cfg) -> bool:
        self._reload()              # under the queue lock: Forge's own entry point loads the selected checkpoint
        wanted = getattr(cfg, "pretrained_model_name_or_path", "") or ""
        info = self._checkpoint_info()
        if not wanted:
            return True
        return info is not None and bool(getattr(info, "filename", None)) and _same_file(wanted, info.filename)

    def _check_model(self, sd_model) -> None:
        forge_model.refuse_unsupported(sd_model)

    def _clear_networks(self, sd_model) -> int:
        if not hasattr(sd_model, "forge_objects"):
            return 0
        restored = forge_model.clear_lora_patches(sd_model, self.memory)
        with contextlib.suppress(Exception):
            self.memory.soft_empty_cache()
        return restored

    def _to_device_for_medvram(self, sd_model) -> list:
        """Forge's manager leaves unloaded models on their offload device: all three parts go to the compute
        device for the run. Returns [(part, device it was on)], moved back by the session afterwards."""
        import torch

        device = self.webui.devices.device
        moved = []
        try:
            with torch.inference_mode():
                for module in forge_model.parts(sd_model).values():
                    was = next(iter(module.parameters())).device
                    if was != torch.device(device):
                        moved.append((_InferenceMove(module), was))
                        module.to(device)
        except BaseException:
            for part, was in moved:
                part.to(was)
            raise
        if moved:
            log(f"Forge: moved {len(moved)} model parts to {device} for the run")
        return moved

    @contextlib.contextmanager
    def training_session(self, cfg):
        """The A1111 session (queue lock, shared.state, restore) with Forge's cache emptied once the parts are
        back where the memory manager keeps them."""
        try:
            with super().training_session(cfg) as model:
                yield model
        finally:
            with contextlib.suppress(Exception):
                self.memory.soft_empty_cache()

    def _sd_model(self, sd_model):
        return forge_model.engine_model(sd_model, log)

    @property
    def preview_renderer(self):
        return None
