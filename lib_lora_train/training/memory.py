"""Memory options of a run: fp8 base weights, gradient checkpointing, PyTorch SDPA attention.

fp8_base (sd-scripts' meaning): the frozen base weights are *stored* in float8_e4m3fn (1 byte a weight instead
of 2) and upcast to the compute dtype one layer at a time inside that layer's forward, so only one layer's
upcast copy exists at a time. The LoRA (and its gradients) stay in the compute / float32 dtype. Here the weights
of every Linear and Conv2d are stored in fp8 (they are >99% of the parameters); norms, embeddings and biases keep
the compute dtype, which avoids the fp8 embedding and norm breakage that sd-scripts works around.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


def fp8_supported() -> bool:
    return FP8_DTYPE is not None


def _fp8_linear_forward(module, compute_dtype):
    def forward(x, *args, **kwargs):
        w = module.weight.to(compute_dtype)
        b = module.bias.to(compute_dtype) if module.bias is not None else None
        return F.linear(x.to(compute_dtype), w, b)
    return forward


def _fp8_conv_forward(module, compute_dtype):
    def forward(x, *args, **kwargs):
        w = module.weight.to(compute_dtype)
        b = module.bias.to(compute_dtype) if module.bias is not None else None
        return module._conv_forward(x.to(compute_dtype), w, b)
    return forward


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the weights of `model`'s Linear and Conv2d layers in float8_e4m3fn, upcast per layer in forward.

    In place and one-way (the rounding loses precision): only for models this run loaded itself. Must run before
    the network is applied, so the adapters wrap the upcasting forward. Returns the number of layers converted.
    """
    if not fp8_supported():
        raise ConfigError(f"fp8_base needs PyTorch with float8 support (torch.float8_e4m3fn); this is "
                          f"PyTorch {torch.__version__}")
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            make = _fp8_linear_forward
        elif isinstance(module, torch.nn.Conv2d):
            make = _fp8_conv_forward
        else:
            continue
        if module.bias is not None:
            module.bias.data = module.bias.data.to(compute_dtype)
        module.weight.requires_grad_(False)
        module.weight.data = module.weight.data.to(FP8_DTYPE)
        module.forward = make(module, compute_dtype)
        n += 1
    for p in model.parameters():     # everything else: the compute dtype
        if p.dtype != FP8_DTYPE and p.is_floating_point():
            p.data = p.data.to(compute_dtype)
    return n


def fp8_targets(cfg, model, *, host_model: bool) -> list[torch.nn.Module]:
    """The modules fp8_base / fp8_base_unet put in fp8 (sd-scripts: the UNet, plus the text encoders for
    fp8_base). A host's model (the WebUI's loaded one) is never converted in place."""
    if not (cfg.fp8_base or cfg.fp8_base_unet):
        return []
    if host_model:
        raise ConfigError("fp8_base / fp8_base_unet cannot be used when training on the model the host already has "
                          "loaded (the WebUI's checkpoint): its weights would be rounded to fp8 in place and could "
                          "not be given back unchanged. Use the WebUI's own fp8 setting, or train from a checkpoint "
                          "file (the standalone page or the CLI)")
    targets = [model.unet]
    if cfg.fp8_base and not cfg.fp8_base_unet:
        targets += list(_text_encoders(model))
    return targets


def _text_encoders(model) -> list:
    encoders = getattr(model, "text_encoders", None)
    return list(encoders) if encoders is not None else [model.text_encoder]


def enable_checkpointing(unet, text_encoders) -> "callable":
    """Gradient checkpointing on the UNet and on every trained text encoder (both of SDXL's); returns the undo."""
    unet.enable_gradient_checkpointing()
    unet_mode = unet.training
    unet.train()   # diffusers checkpoints only in training mode; SD's UNet has no dropout to switch on
    te_modes = []
    for te in text_encoders:
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()
        te_modes.append((te, te.training))
        te.train()

    def undo() -> None:
        unet.disable_gradient_checkpointing()
        unet.train(unet_mode)
        for te, mode in te_modes:
            te.gradient_checkpointing_disable()
            te.disable_input_require_grads()
            te.train(mode)
    return undo


def use_sdpa(unet) -> "callable":
    """Every attention layer of the UNet on PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0,
    its default when PyTorch has SDPA); a host's own processors (the WebUI's) are put back afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    before = dict(unet.attn_processors)
    if all(isinstance(p, AttnProcessor2_0) for p in before.values()):
        return lambda: None
    unet.set_attn_processor(AttnProcessor2_0())
    return lambda: unet.set_attn_processor(before)
