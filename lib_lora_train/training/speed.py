"""The speed options of a run (mostly for CUDA): the attention kernel, channels-last convolutions and
torch.compile. Each is off by default or leaves the numbers as they are (see README "Speed options (GPU)"), and
each returns its undo, so a host's model (the WebUI's) is given back as it came.

- sdpa / xformers / mem_eff_attn (sd-scripts' flags): PyTorch's scaled-dot-product attention is the default here
  (model_setup.py puts every attention layer on it); xformers = true swaps in xformers' kernel, refused with a
  clear message when the package is missing; mem_eff_attn keeps SDPA, which already picks a memory-efficient
  kernel on CUDA (sd-scripts' mem_eff_attn is its own slower, memory-saving attention).
- channels_last: the 4-D weights of the UNet's and VAE's convolutions (and the UNet's input) in channels-last
  memory format, which NVIDIA's tensor-core convolutions prefer. Only the layout changes, never a value.
- torch_compile / dynamo_backend: the UNet's forward compiled with torch.compile, after the network is attached
  (so the adapters are part of the compiled graph). The backend is checked before anything is compiled.
"""
from __future__ import annotations

import importlib.util
import shutil
from typing import Callable

import torch

from ..errors import ConfigError
from ..events import LOG, Event


def select_attention(unet, cfg, emit=None) -> Callable[[], None]:
    """The attention kernel the flags ask for; returns the undo (the processors as they were)."""
    if cfg.xformers:
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("xformers = true, but the xformers package is not installed in this Python; remove "
                              "the flag (PyTorch's SDPA attention is the default here)")
        from diffusers.models.attention_processor import XFormersAttnProcessor
        before = dict(unet.attn_processors)
        unet.set_attn_processor(XFormersAttnProcessor())
        _say(emit, "attention: xformers' memory-efficient kernel")
        return lambda: unet.set_attn_processor(before)
    if cfg.mem_eff_attn:
        _say(emit, "mem_eff_attn: attention stays on PyTorch's SDPA, which uses its memory-efficient kernel on CUDA")
    return lambda: None


def use_channels_last(modules) -> Callable[[], None]:
    """Every 4-D parameter of `modules` (convolution weights) in channels-last layout; the undo puts back the
    ones this changed. The values are untouched; only their order in memory moves."""
    changed = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)
                changed.append(p)

    def undo() -> None:
        for p in changed:
            p.data = p.data.contiguous()
    return undo


def as_channels_last(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if on and x.dim() == 4 else x


def check_compile_backend(backend: str, device: torch.device) -> None:
    """A clear error now rather than a compiler failure at the first step."""
    if not hasattr(torch, "compile"):
        raise ConfigError(f"torch_compile needs PyTorch 2.0 or newer (this is {torch.__version__})")
    import torch._dynamo as dynamo
    known = set(dynamo.list_backends(exclude_tags=()))
    if backend not in known:
        raise ConfigError(f"dynamo_backend '{backend}' is not available in this PyTorch ({torch.__version__}); "
                          f"available: {', '.join(sorted(known))}")
    if backend == "inductor":
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ConfigError("torch_compile with dynamo_backend = \"inductor\" on CUDA needs the triton package, "
                              "which is not installed; install the triton that matches this PyTorch, or use "
                              "dynamo_backend = \"cudagraphs\" / \"aot_eager\", or turn torch_compile off")
        if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
            raise ConfigError("torch_compile with dynamo_backend = \"inductor\" on the CPU needs a C++ compiler "
                              "(g++, clang++ or MSVC's cl) on the PATH; install one, use dynamo_backend = "
                              "\"aot_eager\", or turn torch_compile off")


def compile_unet(unet, cfg, device: torch.device, emit=None):
    """The callable the step runs the UNet through: `unet` itself, or its torch.compile'd wrapper (which shares
    the parameters; the first steps take longer while it compiles)."""
    if not cfg.torch_compile:
        return unet
    check_compile_backend(cfg.dynamo_backend, device)
    _say(emit, f"torch.compile: the UNet with backend {cfg.dynamo_backend} (the first step compiles it)")
    return torch.compile(unet, backend=cfg.dynamo_backend)


def apply_speed_options(cfg, model, device: torch.device, emit=None):
    """All of the above for one run, after the network is attached: (the UNet callable, the undo)."""
    undos = [select_attention(model.unet, cfg, emit)]
    if cfg.channels_last:
        undos.append(use_channels_last([model.unet, getattr(model, "vae", None)]))
    forward = compile_unet(model.unet, cfg, device, emit)
    if forward is not model.unet:      # drop the compiled graphs (they refer to this run's adapters) at the end
        import torch._dynamo as dynamo
        undos.append(dynamo.reset)

    def undo() -> None:
        for u in reversed(undos):
            u()
    return forward, undo


def _say(emit, message: str) -> None:
    if emit is not None:
        emit(Event(LOG, {"message": message}))
