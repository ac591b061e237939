"""A tiny SD1-shaped checkpoint with random weights, in the ldm layout, for tests and demos.

The modules are instantiated on the meta device only to learn the parameter names, shapes and layer types;
every tensor is then drawn here from one seeded generator in sorted key order, so the same seed gives the same
weights in both supported library stacks. Nothing is zero-initialised (diffusers zeroes output convs and
proj_out), so the UNet output depends on the prompt from the start.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..errors import ModelError
from .ckpt import save_checkpoint
from .convert import TE_PREFIX, diffusers_to_ldm


@dataclass(frozen=True)
class TinySizes:
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    unet_attention: tuple[bool, ...] | None = None   # default as SD1: every level but the deepest
    unet_layers: int = 2
    transformer_depth: int = 1
    use_linear_projection: bool = False
    in_channels: int = 4
    text_hidden: int = 32              # also the UNet's cross-attention width, as in SD1
    text_layers: int = 2
    text_intermediate: int = 64
    vocab_size: int = 49408
    max_positions: int = 77
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    vae_layers: int = 1
    latent_channels: int = 4
    norm_groups: int = 32

    def attention_levels(self) -> tuple[bool, ...]:
        if self.unet_attention is not None:
            return tuple(bool(a) for a in self.unet_attention)
        n = len(self.unet_channels)
        return (True,) if n == 1 else (True,) * (n - 1) + (False,)


def tiny_sizes(**sizes) -> TinySizes:
    names = {f.name for f in fields(TinySizes)}
    unknown = sorted(set(sizes) - names)
    if unknown:
        raise ModelError(f"unknown tiny model size(s) {unknown}; known: {sorted(names)}")
    s = replace(TinySizes(), **{k: (tuple(v) if isinstance(v, list) else v) for k, v in sizes.items()})
    attn = s.attention_levels()
    if len(attn) != len(s.unet_channels):
        raise ModelError(f"unet_attention has {len(attn)} entries for {len(s.unet_channels)} UNet levels")
    for what, chans in (("unet_channels", s.unet_channels), ("vae_channels", s.vae_channels)):
        if any(c % s.norm_groups for c in chans):
            raise ModelError(f"{what} {chans} must be multiples of norm_groups={s.norm_groups}")
    return s


def tiny_module_configs(s: TinySizes) -> tuple[dict, dict, dict]:
    """diffusers UNet / VAE kwargs and CLIPTextConfig kwargs for the tiny sizes (heads do not change shapes)."""
    attn = s.attention_levels()
    unet = dict(sample_size=64, in_channels=s.in_channels, out_channels=s.latent_channels,
                block_out_channels=tuple(s.unet_channels), layers_per_block=s.unet_layers,
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                cross_attention_dim=s.text_hidden, transformer_layers_per_block=s.transformer_depth,
                attention_head_dim=1, use_linear_projection=s.use_linear_projection, norm_num_groups=s.norm_groups)
    n = len(s.vae_channels)
    vae = dict(in_channels=3, out_channels=3, block_out_channels=tuple(s.vae_channels), layers_per_block=s.vae_layers,
               down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
               latent_channels=s.latent_channels, norm_num_groups=s.norm_groups, sample_size=64)
    text = dict(vocab_size=s.vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=1, max_position_embeddings=s.max_positions,
                hidden_act="quick_gelu")
    return unet, vae, text


def _param_kinds(module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{state-dict key: (layer kind, shape)} of a module built on the meta device."""
    kinds = {}
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                kind = "norm"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "position" if "position" in mod_name else "embedding"
            else:
                kind = "dense"
            kinds[f"{mod_name}.{p_name}" if mod_name else p_name] = (f"{kind}.{p_name}", tuple(p.shape))
    return kinds


def _draw(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "norm.weight":
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if kind == "norm.bias":
        return 0.05 * torch.randn(shape, generator=gen)
    if kind.startswith("embedding."):
        return 0.02 * torch.randn(shape, generator=gen)
    if kind.startswith("position."):
        return 0.01 * torch.randn(shape, generator=gen)
    # dense weights and biases: PyTorch's default uniform(+-1/sqrt(fan_in)); biases share their weight's fan_in
    return torch.rand(shape, generator=gen) * 2.0 - 1.0


def _module_tensors(module, seed: int, salt: int, rename=lambda k: k) -> dict[str, torch.Tensor]:
    kinds = {rename(k): v for k, v in _param_kinds(module).items()}
    gen = torch.Generator().manual_seed(seed * 1000 + salt)
    out = {}
    for key in sorted(kinds):
        kind, shape = kinds[key]
        t = _draw(kind, shape, gen)
        if kind.startswith("dense."):
            weight_key = key[: -len("bias")] + "weight" if key.endswith(".bias") else key
            w_shape = kinds[weight_key][1] if weight_key in kinds else shape
            fan_in = math.prod(w_shape[1:]) if len(w_shape) > 1 else w_shape[0]
            t = t / math.sqrt(fan_in)
        out[key] = t.contiguous()
    return out


def tiny_sd1_state_dict(seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """An SD1-shaped ldm state dict (float32, random weights). Sizes: see TinySizes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    s = tiny_sizes(**sizes)
    unet_cfg, vae_cfg, text_cfg = tiny_module_configs(s)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    to_text_model = (lambda k: k if k.startswith("text_model.") else "text_model." + k)
    unet_sd = _module_tensors(unet, seed, 1)
    vae_sd = _module_tensors(vae, seed, 2)
    te_sd = _module_tensors(te, seed, 3, rename=to_text_model)
    sd = diffusers_to_ldm(unet_sd, vae_sd, te_sd)
    # Real SD1 files carry the (int64) position ids; keep that so loaders are tested against it.
    sd[TE_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(s.max_positions).unsqueeze(0)
    return sd


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, *, overwrite: bool = False, **sizes):
    """Write tiny_sd1_state_dict(seed, **sizes) as a .safetensors file; returns the path."""
    meta = {"lib_lora_train.tiny": "1", "lib_lora_train.tiny_seed": str(seed),
            "lib_lora_train.tiny_sizes": repr(asdict(tiny_sizes(**sizes)))}
    return save_checkpoint(path, tiny_sd1_state_dict(seed, **sizes), meta, overwrite=overwrite)
