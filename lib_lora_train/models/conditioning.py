"""What the UNet is conditioned on besides the noisy latent, for every family (docs/FAMILIES.md).

SD 1.x / 2.x: the text encoder's hidden states only. SDXL adds its "micro-conditioning": the bigG pooled text
embedding and six size numbers per sample, in sd-scripts' order original (h, w), crop (top, left), target (h, w),
which diffusers' UNet embeds (`addition_embed_type == "text_time"`). The loop, validation and the sampler all
call `unet_inputs`, so none of them needs to know which family it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ModelError


@dataclass(frozen=True)
class SizeInfo:
    """SDXL's size conditioning of one sample (all in pixels)."""
    original_hw: tuple[int, int]       # the image before resizing
    crop_top_left: tuple[int, int]     # (top, left), sd-scripts' rule (dataset/sizes.py)
    target_hw: tuple[int, int]         # the bucket

    def as_row(self) -> list[int]:
        return [*self.original_hw, *self.crop_top_left, *self.target_hw]

    @staticmethod
    def uncropped(height: int, width: int) -> "SizeInfo":
        """What generation asks for: an uncropped image of the requested size (the WebUI's and sd-scripts')."""
        return SizeInfo((int(height), int(width)), (0, 0), (int(height), int(width)))


def uses_size_conditioning(unet) -> bool:
    """True for SDXL-style UNets (pooled text + time ids)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def time_ids(sizes: Sequence[SizeInfo], *, dtype=torch.float32, device=None) -> torch.Tensor:
    """[B, 6] rows original_h, original_w, crop_top, crop_left, target_h, target_w."""
    return torch.tensor([s.as_row() for s in sizes], dtype=dtype, device=device)


def unet_inputs(model, text, sizes: Sequence[SizeInfo] | None, dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments for `model.unet(noisy, timesteps, **kwargs)`.

    `text` is a TextConditioning (hidden [B, L, C], pooled [B, P] or None). `sizes` is one SizeInfo per row of
    `text.hidden`; only SDXL needs it. `dtype`: the UNet's compute dtype (default: its parameters' dtype).
    """
    unet = model.unet
    dtype = dtype or unet.dtype
    hidden = text.hidden
    kwargs = {"encoder_hidden_states": hidden.to(dtype)}
    if not uses_size_conditioning(unet):
        return kwargs
    pooled = getattr(text, "pooled", None)
    if pooled is None:
        raise ModelError("this UNet (SDXL) needs the pooled text embedding of the second text encoder; "
                         "the text conditioning has none")
    if sizes is None or len(sizes) != hidden.shape[0]:
        raise ModelError(f"SDXL needs one size conditioning per sample: {hidden.shape[0]} prompts, "
                         f"{0 if sizes is None else len(sizes)} sizes")
    kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(hidden.device, dtype),
                                   "time_ids": time_ids(sizes, dtype=dtype, device=hidden.device)}
    return kwargs


def effective_clip_skip(model, clip_skip: int | None) -> tuple[int | None, str | None]:
    """(clip_skip to encode with, warning or None). sd-scripts applies clip_skip to SD 1.x and SD 2.x; SDXL always
    uses the penultimate layers of both encoders and ignores the option (with a warning), and so do we."""
    if clip_skip is not None and getattr(model.info, "family", "sd1") == "sdxl":
        return None, (f"clip_skip = {clip_skip} is ignored for SDXL: both text encoders always use their "
                      f"penultimate layer (as sd-scripts does)")
    return clip_skip, None


@dataclass(frozen=True)
class FamilyTraits:
    vae_fp32: bool = False     # the VAE overflows to NaN in fp16: keep it in float32 (sd-scripts' no_half_vae)


_TRAITS = {"sdxl": FamilyTraits(vae_fp32=True)}


def family_traits(model) -> FamilyTraits:
    return _TRAITS.get(getattr(model.info, "family", "sd1"), FamilyTraits())


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of its first floating parameter not stored in fp8 (fp8_base keeps
    Linear / Conv weights in float8 and everything else in the compute dtype)."""
    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
    for p in module.parameters():
        if p.is_floating_point() and p.dtype not in fp8:
            return p.dtype
    return torch.float32


def vae_scale_factor(model) -> int:
    """Pixels per latent cell (8 for every real SD model; tiny test models may have fewer VAE levels)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)
