"""Text conditioning of a batch: encoded by the text encoder(s) each step, or read from the text-encoder cache.

cache_text_encoder_outputs (sd-scripts): every caption is encoded once before training and the outputs are
reused, which saves the text encoders' compute (and, for SDXL, most of a step's text work). It is only right when
a caption always encodes the same, so it is refused where sd-scripts refuses it (caption shuffling, token warmup,
tag or caption dropout) and also with wildcards (a random line per step), and it needs network_train_unet_only
(a trained text encoder changes its outputs). Entries are keyed by the text encoders' identity, clip_skip,
max_token_length and the caption text, so a changed model or caption is encoded again, never reused.
cache_text_encoder_outputs_to_disk also keeps them as files in the cache folder (`<key>_te.safetensors`).
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes
from ..transfer import to_device

FORMAT = "lib_lora_train.te_outputs.v1"


def uncacheable_reasons(subsets: Iterable) -> list[str]:
    """Why caption processing is not a fixed function of the caption (empty: caching is right)."""
    reasons = []
    for sub in subsets:
        name = getattr(sub, "image_dir", None) or "a subset"
        checks = [(sub.shuffle_caption, "shuffle_caption"), (sub.token_warmup_step, "token_warmup_step"),
                  (sub.caption_tag_dropout_rate, "caption_tag_dropout_rate"),
                  (sub.caption_dropout_rate, "caption_dropout_rate"),
                  (sub.caption_dropout_every_n_epochs, "caption_dropout_every_n_epochs"),
                  (sub.enable_wildcard, "enable_wildcard")]
        reasons += [f"{os.path.basename(str(name))}: {opt}" for on, opt in checks if on]
    return reasons


def check_cacheable(data) -> None:
    subsets = [s for ds in data.datasets for s in ds.subsets]
    reasons = uncacheable_reasons(subsets)
    if reasons:
        raise ConfigError("cache_text_encoder_outputs: a caption must encode the same every step, but these options "
                          "change it from step to step: " + ", ".join(reasons)
                          + " (sd-scripts refuses the same; turn them off or turn caching off)")


def encoders_identity(model) -> str:
    """A cheap fingerprint of the text encoders' weights (every 8th tensor, first 256 values)."""
    h = hashlib.sha256(f"{model.info.name}|{model.info.family}".encode())
    encoders = getattr(model, "text_encoders", None) or [model.text_encoder]
    for te in encoders:
        for i, (name, p) in enumerate(te.state_dict().items()):
            if i % 8 == 0 and p.is_floating_point():
                h.update(name.encode())
                h.update(p.detach().flatten()[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


class TextSource:
    """`encode(captions) -> TextConditioning` for the loop: the cache when on, else the text encoders."""

    def __init__(self, model, *, clip_skip, max_token_length, device, cache: bool = False,
                 cache_dir: str | None = None, autocast=None) -> None:
        from ..models import encode_text
        self._encode_text = encode_text
        self.model, self.clip_skip, self.max_token_length, self.device = model, clip_skip, max_token_length, device
        self.cache_on = bool(cache or cache_dir)
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._ident = encoders_identity(model) if self.cache_on else ""
        self.encoded = self.disk_hits = 0
        self._autocast = autocast     # the loop's autocast, so a cached output equals the uncached one

    def _key(self, caption: str) -> str:
        ident = (FORMAT, self._ident, self.clip_skip, self.max_token_length, caption)
        return hashlib.sha256(repr(ident).encode("utf-8")).hexdigest()

    def _fresh(self, captions: list[str]):
        return self._encode_text(self.model, captions, clip_skip=self.clip_skip,
                                 max_token_length=self.max_token_length, device=self.device)

    def prepare(self, captions: Iterable[str], batch_size: int = 8) -> None:
        """Encode (or read from disk) every caption not cached yet."""
        todo = []
        for cap in dict.fromkeys(captions):
            key = self._key(cap)
            if key in self._memory:
                continue
            if self._load(key):
                self.disk_hits += 1
                continue
            todo.append((key, cap))
        import contextlib
        with torch.no_grad(), (self._autocast() if self._autocast else contextlib.nullcontext()):
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                out = self._fresh([c for _, c in chunk])
                for j, (key, _) in enumerate(chunk):
                    hidden = out.hidden[j].detach().to("cpu").clone()
                    pooled = out.pooled[j].detach().to("cpu").clone() if out.pooled is not None else None
                    self._memory[key] = (hidden, pooled)
                    self._save(key, hidden, pooled)
                    self.encoded += 1

    def encode(self, captions: list[str]):
        if not self.cache_on:
            return self._fresh(captions)
        from ..models import TextConditioning
        rows = []
        for cap in captions:
            key = self._key(cap)
            if key not in self._memory:
                self.prepare([cap])
            rows.append(self._memory[key])
        hidden = to_device(torch.stack([h for h, _ in rows]), self.device)   # no host wait on CUDA
        pooled = None if rows[0][1] is None else to_device(torch.stack([p for _, p in rows]), self.device)
        return TextConditioning(hidden=hidden, pooled=pooled)

    # ------------------------------------------------------------ disk
    def _path(self, key: str) -> str | None:
        return os.path.join(self.cache_dir, f"{key}_te.safetensors") if self.cache_dir else None

    def _load(self, key: str) -> bool:
        path = self._path(key)
        if path is None or not os.path.isfile(path):
            return False
        try:
            with open(path, "rb") as fh:
                t = st_load(fh.read())
        except Exception:  # damaged: encode again
            return False
        if "hidden" not in t:
            return False
        self._memory[key] = (t["hidden"], t.get("pooled"))
        return True

    def _save(self, key: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        path = self._path(key)
        if path is None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)   # type: ignore[arg-type]
        tensors = {"hidden": hidden.contiguous()}
        if pooled is not None:
            tensors["pooled"] = pooled.contiguous()
        atomic_write_bytes(path, st_save(tensors, metadata={"format": FORMAT}), sync=False)


def text_source(cfg, data, model, device, *, clip_skip, max_steps: int, autocast, emit) -> TextSource:
    """The loop's TextSource; with cache_text_encoder_outputs(_to_disk) every caption is encoded now."""
    import random

    from ..dataset import process_caption
    from ..events import LOG, Event
    cache = cfg.cache_text_encoder_outputs or cfg.cache_text_encoder_outputs_to_disk
    if cache:
        check_cacheable(data)
    cache_dir = (cfg.latents_cache_dir or os.path.join(cfg.output_dir, ".te_outputs")) \
        if cfg.cache_text_encoder_outputs_to_disk else None
    text = TextSource(model, clip_skip=clip_skip, max_token_length=cfg.max_token_length, device=device,
                      cache=cache, cache_dir=cache_dir, autocast=autocast)
    if cache:   # captions are fixed (check_cacheable), so processing them once gives every step's text
        text.prepare(process_caption(it.caption, it.subset, epoch=1, step=0, max_steps=max_steps,
                                     rng=random.Random(0)) for it in data.items)
        emit(Event(LOG, {"message": f"text-encoder outputs cached: {text.encoded} encoded, "
                                    f"{text.disk_hits} read from disk"}))
    return text
