"""A LoRA file merged into a model at a weight, and taken out again exactly.

This is what `<lora:NAME:W>` does in the WebUI's built-in Lora extension (it patches the weights, keeping a
backup), so a grid cell here shows what the user will get there. Works for every format networks/delta.py reads
(LoRA, LoCon, LoHa, LoKr, (IA)3, DyLoRA files), with or without a run config.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import ModelError
from ..networks.delta import module_delta, split_by_module
from ..networks.targets import TE_PREFIX, UNET_PREFIX, module_index


class MergedLora:
    """Holds one file's layers for a model; `set_weight(w)` makes the model's weights `original + w * ΔW`.

    The originals of the touched layers are kept (in their own dtype) and put back by `restore()`.
    """

    def __init__(self, model, tensors: Mapping[str, torch.Tensor], *, name: str = "LoRA"):
        self.model = model
        index = {**module_index(model.unet, "unet"), **module_index(model.text_encoder, "text_encoder")}
        self.layers: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
        unknown = []
        for layer, w in split_by_module(tensors).items():
            if not layer.startswith((UNET_PREFIX + "_", TE_PREFIX + "_")):
                unknown.append(layer)
                continue
            module = index.get(layer)
            if module is None:
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
