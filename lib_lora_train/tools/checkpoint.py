"""Checkpoint access for the tools: lazy tensor reading, and sd-scripts LoRA names -> ldm weight keys.

The tools work on the single-file (ldm) state dict directly instead of building diffusers modules: a merged
checkpoint keeps the input's exact keys, layout and extra tensors, and nothing is held twice in memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import ModelError
from ..models.ckpt import read_checkpoint
from ..models.convert import TE_PREFIX, UNET_PREFIX, require_complete, split_ldm, unet_ldm_to_diffusers


class CheckpointSource:
    """Tensors of a checkpoint: a .safetensors file is read one tensor at a time; a .ckpt / dict is in memory."""

    def __init__(self, source: str | os.PathLike | Mapping[str, torch.Tensor]):
        self.path: str | None = None
        self._dict: Mapping[str, torch.Tensor] | None = None
        self._handle = None
        self.metadata: dict[str, str] = {}
        if isinstance(source, Mapping):
            self._dict = source
        else:
            self.path = os.fspath(source)
            if not os.path.isfile(self.path):
                raise ModelError(f"checkpoint not found: {self.path}")
            if self.path.lower().endswith(".safetensors"):
                from safetensors import safe_open
                try:
                    self._handle = safe_open(self.path, framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own types for damaged headers
                    raise ModelError(f"cannot read {self.path}: {e}") from e
                self.metadata = dict(self._handle.metadata() or {})
            else:
                self._dict = read_checkpoint(self.path)
        self.keys: list[str] = list(self._handle.keys() if self._handle is not None else self._dict.keys())
        self._key_set = set(self.keys)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else "model"

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def get(self, key: str) -> torch.Tensor:
        if self._handle is not None:
            return self._handle.get_tensor(key)
        return self._dict[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        return tuple(self._dict[key].shape)

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every key as an empty meta tensor of the right shape (for architecture inference)."""
        return {k: torch.empty(self.shape(k), device="meta") for k in self.keys}

    def close(self) -> None:
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class LayerKeys:
    weight: str            # ldm key of the layer's weight
    bias: str | None       # ldm key of its bias, if the checkpoint has one
    chunk: tuple[int, int] | None = None   # (i, n): the layer is row block i of n of a fused weight (q / k / v)


def rows(t: torch.Tensor, chunk: tuple[int, int] | None) -> torch.Tensor:
    """The layer's part of a checkpoint tensor (a view): all of it, or one row block of a fused q/k/v weight."""
    if chunk is None:
        return t
    i, n = chunk
    size = t.shape[0] // n
    return t[i * size:(i + 1) * size]


def family_name_index(keys, family: str, ndim) -> dict[str, LayerKeys]:
    """sd-scripts LoRA name -> checkpoint keys for a checkpoint of any family (ndim(key): a tensor's rank)."""
    from .families import family_layers

    if family == "sd1":
        return name_index(keys)
    layers, aliases = family_layers(keys, family, ndim)
    index = {layer.name: LayerKeys(layer.weight, layer.bias, layer.chunk) for layer in layers}
    for alias, layer in aliases.items():
        index.setdefault(alias, LayerKeys(layer.weight, layer.bias, layer.chunk))
    return index


def name_index(keys) -> dict[str, LayerKeys]:
    """sd-scripts LoRA name (diffusers-path spelling, and the ldm-path spelling as well) -> the ldm keys.

    Uses the checkpoint converter on the key names only: the names are passed through as values.
    """
    key_set = set(keys)
    parts = require_complete(split_ldm({k: k for k in keys}))
    index: dict[str, LayerKeys] = {}

    def add(name: str, weight_key: str) -> None:
        bias = weight_key[: -len("weight")] + "bias"
        index.setdefault(name, LayerKeys(weight_key, bias if bias in key_set else None))

    for diff_key, ldm_key in unet_ldm_to_diffusers(parts.unet).items():
        if diff_key.endswith(".weight"):
            add("lora_unet_" + diff_key[: -len(".weight")].replace(".", "_"), ldm_key)
            add("lora_unet_" + ldm_key[len(UNET_PREFIX): -len(".weight")].replace(".", "_"), ldm_key)
    for te_key, ldm_key in parts.text_encoder.items():
        if te_key.endswith(".weight"):
            add("lora_te_" + te_key[: -len(".weight")].replace(".", "_"), ldm_key)
    return index


@dataclass(frozen=True)
class TargetRef:
    name: str           # sd-scripts lora name
    weight_key: str     # ldm key
    part: str           # unet | text_encoder
    kxk: bool           # a conv with a kernel larger than 1×1
    chunk: tuple[int, int] | None = None   # see LayerKeys


def family_targets(src: CheckpointSource, family: str, preset: str) -> list[TargetRef]:
    """The layers a networks.lora preset adapts in an SD 2.x / SDXL checkpoint (text encoders first), chosen by
    sd-scripts' class rule expressed on the checkpoint's own block layout (families.preset_kinds); SD 1.x:
    sd1_targets."""
    from .families import family_layers, preset_kinds

    if family == "sd1":
        return sd1_targets(src, preset)
    layers, _ = family_layers(src.keys, family, lambda k: len(src.shape(k)))
    kinds = preset_kinds(preset)
    out = []
    for layer in sorted((l for l in layers if l.kind in kinds), key=lambda l: l.part != "text_encoder"):
        shape = src.shape(layer.weight)
        out.append(TargetRef(layer.name, layer.weight, layer.part, len(shape) == 4 and tuple(shape[2:]) != (1, 1),
                             layer.chunk))
    return out


def sd1_targets(src: CheckpointSource, preset: str) -> list[TargetRef]:
    """The layers a networks.lora preset ("lierla" / "c3lier") adapts in this SD1 checkpoint, in sd-scripts'
    order (text encoder first). The modules are built on the meta device, so targets match training exactly."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.infer import detect_family, sd1_text_config, sd1_unet_config
    from ..networks.targets import find_targets

    meta = src.meta_state_dict()
    detect_family(meta)
    parts = require_complete(split_ldm(meta))
    unet_cfg = sd1_unet_config(unet_ldm_to_diffusers(parts.unet))
    te_cfg = sd1_text_config(parts.text_encoder)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_cfg)
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    index = name_index(src.keys)
    out = []
    for part, root in (("text_encoder", te), ("unet", unet)):
        for t in find_targets(root, part, preset):
            keys = index.get(t.name)
            if keys is None:
                raise ModelError(f"{src.name}: no weight found for {t.name}")
            out.append(TargetRef(t.name, keys.weight, part, t.kxk))
    return out


def is_te_key(key: str) -> bool:
    return key.startswith(TE_PREFIX)
