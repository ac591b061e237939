"""One optimizer update: backward, (unscale), gradient clipping, step, zero — or the fused backward pass.

fused_backward_pass (sd-scripts, Adafactor only): each parameter is updated by the optimizer inside the backward
pass, as soon as its gradient is complete, and its gradient is freed at once, so the gradients of the whole
network never exist at the same time. As in sd-scripts, max_grad_norm then clips each parameter's gradient on
its own (there is no global norm before all gradients exist) and gradient accumulation is impossible.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError


class Updater:
    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None, scaler=None,
                 fused: bool = False, accumulation_steps: int = 1) -> None:
        self.optimizer, self.max_grad_norm, self.scaler, self.fused = optimizer, max_grad_norm, scaler, fused
        self.accumulation_steps = accumulation_steps
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._handles = []
        if fused:
            self._install_hooks()

    # ------------------------------------------------------------ fused
    def _install_hooks(self) -> None:
        if type(self.optimizer).__name__ != "Adafactor":
            raise ConfigError(f"fused_backward_pass works with optimizer_type = \"Adafactor\" only (as in "
                              f"sd-scripts), not {type(self.optimizer).__name__}")
        if self.accumulation_steps != 1:
            raise ConfigError("fused_backward_pass cannot be combined with gradient_accumulation_steps > 1: each "
                              "gradient is used and freed during the backward pass")
        if self.scaler is not None:
            raise ConfigError("fused_backward_pass cannot be used with fp16 loss scaling; use mixed_precision = "
                              "\"bf16\" (or full_bf16)")
        if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise ConfigError(f"fused_backward_pass needs PyTorch 2.1 or newer (this is {torch.__version__})")
        for p in self.params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_one))

    def _step_one(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        # Adafactor skips parameters without a gradient: at this moment only `param` has one (every other
        # gradient is either not computed yet or already used and freed), so this updates `param` alone.
        self.optimizer.step()
        param.grad = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------ per micro-batch / per step
    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.accumulation_steps
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self) -> None:
        """End of an optimizer step (after the last micro-batch's backward)."""
        if self.fused:
            return        # already done inside backward
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
