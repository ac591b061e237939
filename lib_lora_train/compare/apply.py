"""A LoRA file merged into a model at a weight, and taken out again exactly.

This is what `<lora:NAME:W>` does in the WebUI's built-in Lora extension (it patches the weights, keeping a
backup), so a grid cell here shows what the user will get there. Works for every format networks/delta.py reads
(LoRA, LoCon, LoHa, LoKr, (IA)3, DyLoRA files), with or without a run config.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import ConfigError, ModelError
from ..networks.delta import module_delta, split_by_module
from ..networks.targets import model_index

FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
SDXL_MARKS = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
              "lora_unet_output_blocks_", "lora_unet_label_emb_")


def lora_looks_sdxl(layers) -> bool:
    """SDXL files name two text encoders (lora_te1_ / lora_te2_) and the U-Net by its sgm paths."""
    return any(name.startswith(SDXL_MARKS) for name in layers)


def _fits(tensors: Mapping[str, torch.Tensor], module: torch.nn.Module) -> bool:
    """Whether the layer's ΔW has the module's weight shape (SD 1.x and 2.x LoRAs share names, not shapes)."""
    try:
        return module_delta(tensors, module.weight.detach()).shape == module.weight.shape
    except (RuntimeError, ValueError, KeyError, ConfigError):
        return False


class MergedLora:
    """Holds one file's layers for a model; `set_weight(w)` makes the model's weights `original + w * ΔW`.

    The originals of the touched layers are kept (in their own dtype) and put back by `restore()`.
    """

    def __init__(self, model, tensors: Mapping[str, torch.Tensor], *, name: str = "LoRA"):
        self.model = model
        family = getattr(getattr(model, "info", None), "family", "sd1")
        encoders = list(getattr(model, "text_encoders", None) or [model.text_encoder])
        index = model_index(model.unet, encoders, family)
        self.layers: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
        modules = split_by_module(tensors)
        if modules and lora_looks_sdxl(modules) != (family == "sdxl"):
            theirs = "an SDXL" if family != "sdxl" else "an SD 1.x / 2.x"
            raise ModelError(f"{name} is {theirs} LoRA but the base model is {FAMILY_LABELS.get(family, family)}; "
                             f"a LoRA only fits the model family it was trained on")
        unknown = []
        for layer, w in modules.items():
            module = index.get(layer)
            if module is None or not _fits(w, module):
                unknown.append(layer)
                continue
            self.layers.append((module, w))
        if unknown:
            raise ModelError(f"{name}: {len(unknown)} layers do not match this base model (e.g. {unknown[:2]}); "
                             f"was it trained on another model family?")
        self.originals = [m.weight.detach().clone() for m, _ in self.layers]
        self.weight = 0.0

    @torch.no_grad()
    def set_weight(self, weight: float) -> None:
        for (module, w), orig in zip(self.layers, self.originals):
            if weight == 0:
                module.weight.copy_(orig)
                continue
            delta = module_delta(w, orig, multiplier=float(weight)).to(orig.device)
            module.weight.copy_((orig.to(delta.dtype) + delta).to(orig.dtype))
        self.weight = float(weight)

    @torch.no_grad()
    def restore(self) -> None:
        for (module, _), orig in zip(self.layers, self.originals):
            module.weight.copy_(orig)
        self.weight = 0.0

    def __enter__(self) -> "MergedLora":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
