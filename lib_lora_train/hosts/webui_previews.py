"""Training previews made by the WebUI's own txt2img pipeline: its samplers and schedulers, its prompt syntax, the
run's LoRA applied by the built-in Lora extension at the chosen weight, so a preview looks like what the user
will generate later.

It runs inside a training session, which already holds the WebUI's queue lock (a FIFOLock, not re-entrant):
nothing here takes it. The Lora extension merges the LoRA into the weights in place, and the engine trains on
modules that share those tensors, so afterwards the backed-up originals are written back (bit-identical) and
the WebUI's progress fields the training bar shows are put back.
"""
from __future__ import annotations

import contextlib
import os
import sys
from types import SimpleNamespace
from typing import Any, Callable, Sequence

from ..errors import ConfigError, ModelError
from .webui_base import lora_networks_module

# shared.state fields process_images changes; the training run's progress bar reads them.
STATE_KEYS = ("job", "job_no", "job_count", "sampling_step", "sampling_steps", "textinfo")


def _module(webui: Any, name: str) -> Any:
    """A WebUI module from the bundle (tests) or the WebUI's already-imported modules."""
    return getattr(webui, name, None) or sys.modules.get(f"modules.{name}")


def webui_sampler(name: str | None, processing: Any) -> tuple[str, str | None]:
    """An sd-scripts sampler name ("euler_a", "dpm++_2m_karras") or a WebUI one ("DPM++ 2M Karras") -> the
    WebUI's (sampler, scheduler), split by the WebUI's own rules."""
    from ..sampling.pipeline import sampler_display_name
    from .webui_xyz_runtime import _split_sampler

    try:
        label = sampler_display_name(name)
    except ConfigError:
        label = str(name)          # not an sd-scripts name: a WebUI sampler name, or the WebUI says it is unknown
    return _split_sampler(SimpleNamespace(processing=processing), label)


def _check_same_checkpoint(sd_models: Any, sd_model: Any) -> None:
    """process_images reloads the checkpoint selected in the settings when it differs from the loaded one; a
    selection changed during training must not swap the model under the run."""
    select = getattr(sd_models, "select_checkpoint", None)
    loaded = getattr(sd_model, "sd_model_checkpoint", None)
    if select is None or loaded is None:
        return
    wanted = getattr(select(), "filename", None)
    if wanted and os.path.realpath(wanted) != os.path.realpath(loaded):
        raise ModelError(f"another checkpoint ({os.path.basename(wanted)}) is selected in the WebUI")


def _forget(nets: Any, stem: str, path: str) -> None:
    """Drop the Lora extension's entries for the temporary preview file (it is deleted after the previews)."""
    with contextlib.suppress(Exception):
        getattr(nets, "networks_in_memory", {}).pop(stem, None)
        for table in ("available_networks", "available_network_aliases"):
            entries = getattr(nets, table, None) or {}
            for key in [k for k, e in entries.items() if getattr(e, "filename", None) == path]:
                entries.pop(key, None)


def make_preview_renderer(webui: Any, clear_networks: Callable[[Any], int], *,
                          clip_skip: int | None = None) -> Callable[[str, Sequence[Any], float], list]:
    """renderer(lora_path, specs, weight) -> one PIL image per PromptSpec, made by the WebUI's process_images
    with `<lora:STEM:weight>` added to each prompt. `clear_networks(sd_model)` puts the original weights back
    (the host's WebUIHost._clear_networks). `clip_skip`: the run's (sample_clip_skip or clip_skip), set for the
    previews only through the WebUI's override_settings; None leaves the WebUI's setting."""
    def networks() -> Any:
        if webui.networks is not None:
            return webui.networks()
        return lora_networks_module()

    def render(lora_path: str, specs: Sequence[Any], weight: float) -> list:
        processing = _module(webui, "processing")
        nets = networks()
        if processing is None or nets is None:
            raise ModelError("the WebUI's processing module or its built-in Lora extension is not available")
        shared = webui.shared
        sd_model = shared.sd_model
        _check_same_checkpoint(_module(webui, "sd_models"), sd_model)
        stem = os.path.splitext(os.path.basename(lora_path))[0]
        state = shared.state
        saved = {k: getattr(state, k, None) for k in STATE_KEYS}
        images = []
        try:
            for spec in specs:
                images.append(_one(processing, sd_model, spec, stem, weight, clip_skip))
                loaded = [getattr(n, "name", n) for n in getattr(nets, "loaded_networks", [])]
                if stem not in loaded:
                    raise ModelError(f"the WebUI's Lora extension did not load {lora_path} (is it inside the "
                                     f"Lora folder?)")
        finally:
            try:
                clear_networks(sd_model)      # the weights the run trains on, exactly as before
            finally:
                _forget(nets, stem, lora_path)
                for k, v in saved.items():
                    setattr(state, k, v)
        return images

    return render


def txt2img(processing: Any, kw: dict) -> Any:
    """One txt2img through the WebUI's own process_images (previews and regularisation images), closed after."""
    p = processing.StableDiffusionProcessingTxt2Img(**kw)
    try:
        return processing.process_images(p)
    finally:
        with contextlib.suppress(Exception):
            p.close()


def _one(processing: Any, sd_model: Any, spec: Any, stem: str, weight: float, clip_skip: int | None = None) -> Any:
    sampler, scheduler = webui_sampler(spec.sampler, processing)
    width, height = spec.size()
    kw = dict(sd_model=sd_model, prompt=f"{spec.prompt} <lora:{stem}:{weight:g}>",
              negative_prompt=spec.negative_prompt or "", steps=int(spec.steps), cfg_scale=float(spec.scale),
              seed=-1 if spec.seed is None else int(spec.seed), width=width, height=height,
              sampler_name=sampler, batch_size=1, n_iter=1, do_not_save_grid=True, do_not_save_samples=True,
              do_not_reload_embeddings=True)
    if scheduler:
        kw["scheduler"] = scheduler
    if clip_skip:
        kw.update(override_settings={"CLIP_stop_at_last_layers": int(clip_skip)},
                  override_settings_restore_afterwards=True)
    processed = txt2img(processing, kw)
    if not processed.images:
        raise ModelError("the WebUI made no image (interrupted?)")
    image = processed.images[0]
    infotexts = getattr(processed, "infotexts", None) or [getattr(processed, "info", "")]
    image.info["parameters"] = infotexts[0]
    seeds = getattr(processed, "all_seeds", None) or [getattr(processed, "seed", spec.seed)]
    image.info["seed"] = seeds[0]
    return image
