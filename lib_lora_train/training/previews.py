"""Previews during training: sample_prompts every n epochs / steps, with the network applied as it is then."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

from ..config import TrainConfig
from ..events import SAMPLE, WARNING, Event


class Previews:
    """sample_prompts every n epochs / steps, made with the network applied as it is at that moment."""

    def __init__(self, cfg: TrainConfig, model, network, emit, *, renderer=None, write_lora=None):
        self.cfg, self.model, self.network, self.emit = cfg, model, network, emit
        self.renderer, self.write_lora = renderer, write_lora
        self.specs = None
        if cfg.sample_prompts:
            from ..sampling.pipeline import sampler_key
            from ..sampling.prompts import read_prompt_file
            sampler_key(cfg.sample_sampler)          # an unknown sampler fails now, not after an epoch
            self.specs = read_prompt_file(cfg.sample_prompts)

    def due_step(self, step: int) -> bool:
        n = self.cfg.sample_every_n_steps
        return bool(self.specs) and not self.cfg.sample_every_n_epochs and bool(n) and step % n == 0

    def due_epoch(self, epoch: int, is_last: bool) -> bool:
        n = self.cfg.sample_every_n_epochs
        return bool(self.specs) and bool(n) and (epoch % n == 0 or is_last)

    def make(self, epoch: int, step: int) -> None:
        if not self.specs:
            return
        from ..sampling.grid import save_png_with_text
        from ..sampling.pipeline import generate
        folder = os.path.join(self.cfg.output_dir, "sample")
        images = self._host_images(folder, epoch, step) if self.renderer is not None else None
        if images is None:
            images = generate(self.model, self.specs, clip_skip=self.cfg.clip_skip,
                              device=self.model.unet.device, default_sampler=self.cfg.sample_sampler,
                              eval_modules=[self.network])
        stamp = time.strftime("%Y%m%d%H%M%S")
        tag = f"e{epoch:06d}" if self.cfg.sample_every_n_epochs or step == 0 else f"{step:06d}"
        paths = []
        for i, (img, spec) in enumerate(zip(images, self.specs)):
            seed = img.info.get("seed", spec.seed)
            path = os.path.join(folder, f"{self.cfg.output_name}_{tag}_{i:02d}_{stamp}_{seed}.png")
            save_png_with_text(img, path, {"parameters": img.info.get("parameters", spec.prompt)})
            paths.append(path)
        self.emit(Event(SAMPLE, {"paths": paths, "epoch": epoch, "step": step}))

    def _host_images(self, folder: str, epoch: int, step: int):
        """The host's renderer on the network saved as it is now; None (and a warning) when it fails: a preview
        never fails a run. The file is temporary; the host's LoRA loader finds it by its name."""
        path = os.path.join(folder, f".preview-{self.cfg.output_name}.safetensors")
        try:
            os.makedirs(folder, exist_ok=True)
            self.write_lora(path, epoch, step)
            specs = [dataclasses.replace(s, sampler=s.sampler or self.cfg.sample_sampler) for s in self.specs]
            images = list(self.renderer(path, specs, float(getattr(self.cfg, "sample_weight", 1.0))))
            if len(images) != len(specs):
                raise RuntimeError(f"{len(images)} images for {len(specs)} prompts")
            return images
        except Exception as exc:  # noqa: BLE001 - any failure: the built-in sampler instead
            self.emit(Event(WARNING, {"message": f"previews: the host's pipeline failed ({type(exc).__name__}: "
                                                 f"{exc}); made with the built-in sampler instead"}))
            return None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
