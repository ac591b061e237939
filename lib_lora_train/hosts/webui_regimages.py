"""Regularisation images drawn by the WebUI's own txt2img (prep/regimages.py asks for them): the loaded checkpoint,
the WebUI's samplers and settings, no LoRA, nothing saved to the WebUI's output folders.

The cache key's model part is the loaded checkpoint's sha256 (the WebUI's own hash, from its hash cache) plus the
WebUI settings that change the pixels (clip skip, the VAE, the noise source). Outside a training run the WebUI's
queue lock is taken for the duration, so generation requests and runs wait; inside a run it is already held.
An image the WebUI's Interrupt cut short is never kept: the request stops there, and the next completes the set.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..errors import Interrupted, ModelError
from .webui_previews import STATE_KEYS, _check_same_checkpoint, _module, txt2img, webui_sampler

# WebUI settings that change what txt2img draws for a prompt and seed (and so belong to the cache key)
PIXEL_OPTIONS = ("CLIP_stop_at_last_layers", "sd_vae", "randn_source", "eta_noise_seed_delta")


def loaded_checkpoint_id(webui: Any) -> str:
    """'sha256:<hex>' of the checkpoint the WebUI has loaded (+ its pixel-changing settings)."""
    sd_model = getattr(webui.shared, "sd_model", None)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    if sd_model is None or info is None:
        raise ModelError("the WebUI has no checkpoint loaded; select one in the checkpoint dropdown first")
    sha = getattr(info, "sha256", None)
    if not sha and callable(getattr(info, "calculate_shorthash", None)):
        info.calculate_shorthash()           # the WebUI hashes the file once and keeps it in its cache.json
        sha = getattr(info, "sha256", None)
    if not sha:
        raise ModelError(f"the WebUI has no sha256 of {getattr(info, 'filename', 'the loaded checkpoint')}")
    data = getattr(getattr(webui.shared, "opts", None), "data", None) or {}
    extra = ";".join(f"{k}={data[k]}" for k in PIXEL_OPTIONS if k in data)
    return f"sha256:{sha}" + (f";{extra}" if extra else "")


def _draw(webui: Any, processing: Any, spec: Any) -> Any:
    shared = webui.shared
    sampler, scheduler = webui_sampler(spec.sampler, processing)
    width, height = spec.size()
    kw = dict(sd_model=shared.sd_model, prompt=spec.prompt, negative_prompt=spec.negative_prompt or "",
              steps=int(spec.steps), cfg_scale=float(spec.scale), seed=int(spec.seed), width=width, height=height,
              sampler_name=sampler, batch_size=1, n_iter=1, do_not_save_grid=True, do_not_save_samples=True)
    if scheduler:
        kw["scheduler"] = scheduler
    processed = txt2img(processing, kw)
    state = shared.state
    if getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False):
        raise Interrupted("regularisation images: interrupted in the WebUI; run it again to complete the set")
    if not processed.images:
        raise ModelError("the WebUI made no image")
    image = processed.images[0]
    infotexts = getattr(processed, "infotexts", None) or [getattr(processed, "info", "")]
    image.info["parameters"] = infotexts[0]
    return image


@contextlib.contextmanager
def webui_reg_source(webui: Any, *, take_lock: bool = True) -> Iterator[tuple]:
    """(model_id, "webui", render) for prep/regimages.generate_reg_images."""
    processing = _module(webui, "processing")
    if processing is None:
        raise ModelError("the WebUI's processing module is not available")
    lock = webui.call_queue.queue_lock if take_lock else None
    if lock is not None:
        lock.acquire()
    state = webui.shared.state
    saved = {k: getattr(state, k, None) for k in STATE_KEYS}
    try:
        model_id = loaded_checkpoint_id(webui)
        if take_lock:
            state.interrupted = state.skipped = False
            if hasattr(state, "stopping_generation"):
                state.stopping_generation = False

        def render(spec: Any) -> Any:
            _check_same_checkpoint(_module(webui, "sd_models"), webui.shared.sd_model)
            return _draw(webui, processing, spec)
        yield model_id, "webui", render
    finally:
        for k, v in saved.items():
            setattr(state, k, v)
        if lock is not None:
            lock.release()
