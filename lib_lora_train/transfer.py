"""Host -> device copies that do not make the host wait (shared by the training step, the noise draws and the
text encoders, so it lives below them all).

A plain `tensor.to("cuda")` from ordinary (pageable) memory makes the host wait until the device has finished
everything queued before it, every step. From page-locked ("pinned") memory the copy is queued on the current
stream like any kernel (ordered before everything that reads the result) and the host goes on. The pinned
block is held by PyTorch's host allocator until the copy has run. On the CPU (and MPS) this is a plain `.to`.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None, *,
              pin: bool = True) -> torch.Tensor:
    """`t` on `device` as `dtype` (None: its own). Values are the same either way: a float cast rounds the same
    on every device, so it is done on the host, before the copy (fewer bytes to move)."""
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if pin and device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)           # the same tensor when it is already there
