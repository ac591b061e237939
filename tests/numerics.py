"""Float tolerances derived from the arithmetic, not tuned to one machine's kernels.

A float32 forward pass differs from the exact one by rounding whose size depends on the CPU's kernels (SIMD
width, blocking, summation order, thread count). Tests therefore compare float32 results with a float64
reference of the same weights and allow a bound derived from float32's unit roundoff u and the model itself:

Backward error analysis: a float32 pass is the exact pass of a model whose weights (and the activations feeding
them) are perturbed relatively by about sqrt(n)·u, n = the longest sum of products in the model (the
probabilistic bound of Higham & Mary 2019; the worst case n·u never happens with round-to-nearest). How much
the output moves under such a perturbation depends on the model's conditioning, so it is measured: the float64
model is perturbed by random relative amounts of that size (fixed seeds, so the same on every machine) and the
largest change of the output, doubled, is the bound.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch

U32 = torch.finfo(torch.float32).eps / 2          # unit roundoff of float32


def longest_reduction(modules: Sequence[torch.nn.Module]) -> int:
    """The longest dot product in the models: a Linear's in_features, a Conv's in_channels/groups × kernel."""
    n = 1
    for root in modules:
        for m in root.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2:
                n = max(n, math.prod(w.shape[1:]))
    return n


def as_float64(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return [copy.deepcopy(m).to(torch.float64) for m in modules]


def _perturbed(modules, rel: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in modules:
        m = copy.deepcopy(m)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + rel * (2 * torch.rand(p.shape, generator=g, dtype=torch.float64) - 1))
        out.append(m)
    return out


def float32_reference(run: Callable[..., Sequence[torch.Tensor]], modules64: Sequence[torch.nn.Module], *,
                      reduction: int | None = None, seeds: int = 3):
    """(float64 outputs of run(*modules64), a bound per output on how far a float32 pass may land from them).

    `run` takes the modules and must cast its inputs to their dtype. `reduction` defaults to the longest dot
    product in the modules.
    """
    ref = [r.double() for r in run(*modules64)]
    n = reduction or longest_reduction(modules64)
    rel = math.sqrt(n) * U32
    change = [0.0] * len(ref)
    for seed in range(seeds):
        for i, (a, r) in enumerate(zip(run(*_perturbed(modules64, rel, seed)), ref)):
            change[i] = max(change[i], float((a.double() - r).abs().max()))
    # + rounding of the output itself (a few ulps of its largest value)
    bounds = [2 * c + 4 * U32 * float(r.abs().max()) for c, r in zip(change, ref)]
    return ref, bounds


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: float, what: str = ""):
    err = float((got.double() - ref.double()).abs().max())
    assert err <= bound, f"{what}: max error {err:.3g} vs float32 bound {bound:.3g}"


def merged_reference(run, unet, text_encoder, tensors, multiplier: float = 1.0):
    """float32_reference of the float64 base models with a network file's tensors merged exactly (float64)."""
    from lib_lora_train.networks import apply_deltas

    unet64, te64 = as_float64([unet, text_encoder])
    t64 = {k: v.double() for k, v in tensors.items()}
    apply_deltas(unet64, t64, "unet", multiplier=multiplier)
    apply_deltas(te64, t64, "text_encoder", multiplier=multiplier)
    return float32_reference(run, [unet64, te64])
