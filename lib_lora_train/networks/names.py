"""sd-scripts LoRA names per model family: the part prefixes and, for SDXL, the U-Net's sgm (SAI) paths.

SD 1.x and SD 2.x files name U-Net layers by their diffusers path (sd-scripts' own SD1/2 U-Net uses diffusers
names) and the one text encoder `lora_te_`. SDXL files name U-Net layers by the sgm path of sd-scripts' SDXL
U-Net (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and the two encoders `lora_te1_` (CLIP-L)
and `lora_te2_` (OpenCLIP bigG). Our SDXL U-Net is a diffusers module, so each layer's diffusers path is mapped to
its sgm path here, with the checkpoint converter (models.convert) applied to the path names only.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
SDXL_TE_PREFIXES = ("lora_te1", "lora_te2")

def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")
    return family


def is_sdxl_unet(unet: torch.nn.Module | None) -> bool:
    """An SDXL U-Net carries the text_time added conditioning (pooled text + size/crop ids)."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def te_prefixes(family: str, count: int) -> list[str]:
    """lora_te for the single encoder of SD 1.x / 2.x; lora_te1 / lora_te2 for SDXL's two."""
    if family == "sdxl":
        if count != 2:
            raise ConfigError(f"an SDXL network needs both text encoders (CLIP-L and OpenCLIP bigG), got {count}")
        return list(SDXL_TE_PREFIXES)
    if count != 1:
        raise ConfigError(f"a {FAMILY_LABELS.get(family, family)} network has one text encoder, got {count}")
    return [TE_PREFIX]


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def sdxl_unet_paths(unet: torch.nn.Module) -> dict[str, str]:
    """diffusers path -> sgm path of every Linear / Conv2d of an SDXL U-Net (e.g. down_blocks.1.attentions.0.proj_in
    -> input_blocks.4.1.proj_in, down_blocks.0.downsamplers.0.conv -> input_blocks.3.0.op), from the checkpoint
    converter's module map (models.convert, the one place the two layouts are related)."""
    from ..models.convert import unet_module_names

    modules = unet_module_names(unet)
    return {p: modules[p] for p, m in unet.named_modules() if p and _adaptable(m) and p in modules}


def unet_naming_paths(unet: torch.nn.Module, family: str) -> dict[str, str] | None:
    """The path each U-Net layer is named (and preset name patterns matched) by: None = its own diffusers path."""
    return sdxl_unet_paths(unet) if family == "sdxl" else None
