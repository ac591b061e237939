"""DyLoRA: a LoRA trained in nested rank chunks so that any prefix of its ranks is itself a usable LoRA.

Semantics (sd-scripts networks.dylora, with the chunk picked once per step for the whole network):
- ranks are split in chunks of `unit`; before each step the network picks a chunk start b (a multiple of unit);
- in training, ranks [0, b) take part in the forward pass without gradient, ranks [b, b+unit) are trained and
  ranks from b+unit on are left out; the output is scaled by alpha/dim * sqrt(dim / (b+unit));
- in eval mode all ranks are used with scale alpha/dim, which is exactly the saved file read as a plain LoRA
  (b = dim-unit in training gives the same forward pass).
Each chunk is its own Parameter: parameters outside the trained chunk get no gradient at all (grad None), so
optimizers skip them (no momentum or weight decay drift), as sd-scripts' per-rank requires_grad switching does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class DyLoRAModule(torch.nn.Module):
    def __init__(self, name: str, org_module: torch.nn.Module, dim: int, alpha: float | None, unit: int,
                 multiplier: float = 1.0):
        super().__init__()
        if dim % unit:
            raise ValueError(f"{name}: rank {dim} is not a multiple of unit {unit}")
        self.lora_name = name
        self.lora_dim = dim
        self.unit = unit
        self.multiplier = multiplier
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        alpha = float(dim) if not alpha else float(alpha)
        self.scale = alpha / dim
        self.register_buffer("alpha", torch.tensor(alpha))
        if self.is_conv:
            self.conv_args = dict(stride=org_module.stride, padding=org_module.padding,
                                  dilation=org_module.dilation)
            down = torch.empty(dim, org_module.in_channels, *org_module.kernel_size)
            up = torch.zeros(org_module.out_channels, dim, 1, 1)
        else:
            down = torch.empty(dim, org_module.in_features)
            up = torch.zeros(org_module.out_features, dim)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))   # same law as per-rank init: fan_in is unchanged
        chunks = dim // unit
        self.down_chunks = torch.nn.ParameterList([torch.nn.Parameter(c.clone()) for c in down.split(unit, 0)])
        self.up_chunks = torch.nn.ParameterList([torch.nn.Parameter(c.clone()) for c in up.split(unit, 1)])
        assert len(self.down_chunks) == chunks
        self.chunk_start = dim - unit       # set by the network before each step
        self.frozen = False                 # set by the network when its part has learning rate 0
        self.org_forward = org_module.forward

    # -- chunk selection ---------------------------------------------------------------------------------------
    def set_chunk(self, start: int) -> None:
        if start % self.unit or not 0 <= start < self.lora_dim:
            raise ValueError(f"chunk start {start} is not a multiple of {self.unit} below {self.lora_dim}")
        self.chunk_start = start
        trained = start // self.unit
        for i, (d, u) in enumerate(zip(self.down_chunks, self.up_chunks)):
            on = i == trained and not self.frozen
            d.requires_grad_(on)
            u.requires_grad_(on)

    # -- weights -----------------------------------------------------------------------------------------------
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(list(self.down_chunks), 0), torch.cat(list(self.up_chunks), 1)

    def load_weights(self, down: torch.Tensor, up: torch.Tensor) -> None:
        with torch.no_grad():
            for p, c in zip(self.down_chunks, down.reshape(self.full_weights()[0].shape).split(self.unit, 0)):
                p.copy_(c)
            for p, c in zip(self.up_chunks, up.reshape(self.full_weights()[1].shape).split(self.unit, 1)):
                p.copy_(c)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        down, up = self.full_weights()
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": self.alpha}

    def _active(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if not self.training:
            down, up = self.full_weights()
            return down, up, self.scale
        n = self.chunk_start // self.unit + 1
        down = torch.cat([c if i == n - 1 else c.detach() for i, c in enumerate(self.down_chunks[:n])], 0)
        up = torch.cat([c if i == n - 1 else c.detach() for i, c in enumerate(self.up_chunks[:n])], 1)
        used = self.chunk_start + self.unit
        return down, up, self.scale * math.sqrt(self.lora_dim / used)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0:
            return out
        down, up, scale = self._active()
        down, up = down.to(x.dtype), up.to(x.dtype)
        if self.is_conv:
            h = F.conv2d(F.conv2d(x, down, **self.conv_args), up)
        else:
            h = F.linear(F.linear(x, down), up)
        return out + h * (self.multiplier * scale)
