"""Shared helpers of the tools tests (no tests here): a tiny SD1 checkpoint, random networks, model outputs."""
from __future__ import annotations

import functools

import torch

from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict
from lib_lora_train.networks import create_network, network_config_from_args
from lib_lora_train.networks.delta import module_delta, split_by_module


@functools.lru_cache(maxsize=2)
def _tiny(seed: int):
    return tiny_sd1_state_dict(seed=seed)


def tiny_sd(seed: int = 5) -> dict[str, torch.Tensor]:
    """A fresh dict of the tiny SD1 checkpoint (the tensors are shared: never modify them in place)."""
    return dict(_tiny(seed))


@functools.lru_cache(maxsize=2)
def base_model(seed: int = 5):
    return load_sd_model(tiny_sd(seed))


def random_network(model, module: str, dim: int, alpha: float, args: list[str], seed: int = 0, scale: float = 0.1,
                   **kw):
    net = create_network(network_config_from_args(module, dim, alpha, args, **kw), model.unet, model.text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 7, 32, generator=g)
    ids = torch.randint(0, 49408, (2, 9), generator=g)
    return x, t, ctx, ids


def outputs(model, inp=None):
    x, t, ctx, ids = inp or inputs()
    with torch.no_grad():
        return model.unet(x, t, encoder_hidden_states=ctx).sample, model.text_encoder(ids)[0]


def layer_weights(model) -> dict[str, torch.Tensor]:
    """sd-scripts lora name -> the diffusers layer's weight, for every Linear / Conv2d of the UNet and TE."""
    from lib_lora_train.networks.targets import module_index
    out = {n: m.weight for n, m in module_index(model.unet, "unet").items()}
    out.update({n: m.weight for n, m in module_index(model.text_encoder, "text_encoder").items()})
    return out


def plain_updates(tensors, model, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW per layer from file tensors with the engine's plain reader (networks.delta), shaped like the layer."""
    weights = layer_weights(model)
    return {n: module_delta(w, weights[n], multiplier=multiplier) for n, w in split_by_module(tensors).items()}


def assert_close(a, b, rel=1e-5, what=""):
    a, b = a.double(), b.double()
    scale = max(float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"
