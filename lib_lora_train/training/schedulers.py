"""Learning-rate schedules by their sd-scripts names (`lr_scheduler`).

The curves are the usual warmup + decay formulas sd-scripts gets from transformers/diffusers. They are written
here as small `LambdaLR` factors so that both Python environments (transformers 4.30 / 5.x, diffusers 0.31 /
0.42) produce the same floats. The factor functions are closures, so `state_dict()` holds only counters and
lrs (no pickled code): it round-trips through `torch.load(weights_only=True)` for resume.

Call `scheduler.step()` once per optimizer step. sd-scripts counts `num_training_steps` as
max_train_steps × num_processes because Accelerate steps the schedule once per process; the caller decides.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError
from .optim import adafactor_relative_step

log = logging.getLogger(__name__)

SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "adafactor")
# sd-scripts schedules this engine does not implement, with the reason given to the user.
_UNSUPPORTED = {
    "inverse_sqrt": "not supported; use cosine or linear",
    "cosine_with_min_lr": "not supported; use cosine",
    "warmup_stable_decay": "not supported; use linear or cosine with lr_warmup_steps",
    "piecewise_constant": "not supported; use constant or constant_with_warmup",
}
_POLY_LR_END = 1e-7  # the end lr of transformers' polynomial schedule, which sd-scripts uses as is

Factor = Callable[[int], float]


def resolve_warmup_steps(num_warmup_steps: int | float | None, num_training_steps: int) -> int:
    """sd-scripts' rule: a float below 1 is a ratio of the total (truncated), otherwise a step count."""
    if num_warmup_steps is None:
        return 0
    if isinstance(num_warmup_steps, bool) or not isinstance(num_warmup_steps, (int, float)):
        raise ConfigError(f"lr_warmup_steps: expected a number, got {num_warmup_steps!r}")
    if num_warmup_steps < 0 or not math.isfinite(num_warmup_steps):
        raise ConfigError(f"lr_warmup_steps must be >= 0, got {num_warmup_steps}")
    if isinstance(num_warmup_steps, float) and num_warmup_steps < 1:
        return int(num_warmup_steps * num_training_steps)
    if isinstance(num_warmup_steps, float) and not num_warmup_steps.is_integer():
        raise ConfigError(f"lr_warmup_steps: {num_warmup_steps} is neither a ratio below 1 nor a whole step count")
    return int(num_warmup_steps)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, num_training_steps: int,
                   num_warmup_steps: int | float = 0, num_cycles: int = 1,
                   power: float = 1.0) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `name` over `num_training_steps` optimizer steps (warmup included)."""
    name = (name or "constant").strip().lower()
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ConfigError(f"the lr schedule needs num_training_steps >= 1, got {num_training_steps!r}")
    warmup = resolve_warmup_steps(num_warmup_steps, num_training_steps)

    if name.startswith("adafactor") or adafactor_relative_step(optimizer):
        return _adafactor_schedule(name, optimizer, warmup)
    if name in _UNSUPPORTED:
        raise ConfigError(f"lr_scheduler '{name}' is {_UNSUPPORTED[name]}")
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"lr_scheduler: unknown schedule '{name}' (known: {', '.join(SCHEDULER_NAMES)})")
    if name == "constant" and warmup:
        # sd-scripts refuses this too ("constant does not require num_warmup_steps").
        raise ConfigError(f"lr_scheduler 'constant' has no warmup, but lr_warmup_steps gives {warmup} steps; "
                          f"use 'constant_with_warmup' or set lr_warmup_steps = 0")
    if warmup > num_training_steps:
        log.warning("lr_warmup_steps (%d) exceeds the %d training steps: the lr never finishes warming up",
                    warmup, num_training_steps)
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise ConfigError(f"lr_scheduler_num_cycles must be a whole number >= 1, got {num_cycles!r}")
    if not (isinstance(power, (int, float)) and power > 0):
        raise ConfigError(f"lr_scheduler_power must be > 0, got {power!r}")

    factor = _factor(name, optimizer, num_training_steps, warmup, num_cycles, float(power))
    return LambdaLR(optimizer, factor)


def _factor(name: str, optimizer: torch.optim.Optimizer, total: int, warmup: int, cycles: int,
            power: float) -> Factor:
    def ramp(step: int) -> float:
        return float(step) / float(max(1, warmup))

    def progress(step: int) -> float:
        return float(step - warmup) / float(max(1, total - warmup))

    if name == "constant":
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: ramp(step) if step < warmup else 1.0
    if name == "linear":
        return lambda step: ramp(step) if step < warmup else \
            max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        # half a cosine wave from 1 down to 0 (sd-scripts passes no cycle count, so transformers' 0.5 applies)
        return lambda step: ramp(step) if step < warmup else \
            max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress(step))))

    if name == "cosine_with_restarts":
        def restarts(step: int) -> float:
            if step < warmup:
                return ramp(step)
            p = progress(step)
            if p >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * p) % 1.0))))
        return restarts

    # polynomial: decays from the optimizer's default lr to 1e-7; the factor is relative to that default lr,
    # so every group gets the same factor (as in transformers, which sd-scripts uses).
    lr_init = optimizer.defaults.get("lr")
    if not isinstance(lr_init, (int, float)) or not lr_init > _POLY_LR_END:
        raise ConfigError(f"lr_scheduler 'polynomial' decays to {_POLY_LR_END}; the learning rate ({lr_init}) "
                          f"must be larger than that")

    def polynomial(step: int) -> float:
        if step < warmup:
            return ramp(step)
        if step > total:
            return _POLY_LR_END / lr_init
        remaining = 1.0 - (step - warmup) / max(1, total - warmup)
        return ((lr_init - _POLY_LR_END) * remaining ** power + _POLY_LR_END) / lr_init
    return polynomial


def _adafactor_schedule(name: str, optimizer: torch.optim.Optimizer,
                        warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Adafactor with relative_step computes its own lr; the schedule only reports it (for logs and metadata)."""
    if type(optimizer).__name__ != "Adafactor":
        raise ConfigError(f"lr_scheduler 'adafactor' only works with optimizer_type Adafactor, "
                          f"not {type(optimizer).__name__}")
    if not adafactor_relative_step(optimizer):
        raise ConfigError("lr_scheduler 'adafactor' needs Adafactor with relative_step=True; with "
                          "relative_step=False use another schedule (constant_with_warmup is recommended)")
    if not name.startswith("adafactor"):
        # "constant" is also the default, so the user may not have chosen it: say it, but quietly
        log.log(logging.INFO if name == "constant" else logging.WARNING,
                "Adafactor with relative_step=True sets its own learning rate: lr_scheduler '%s' is replaced by "
                "'adafactor' (set optimizer_args relative_step=False to use '%s')", name, name)
    if warmup:
        raise ConfigError("Adafactor with relative_step=True has its own warmup (optimizer_args warmup_init=True); "
                          "set lr_warmup_steps = 0, or relative_step=False to use a scheduled lr")
    initial_lr = getattr(optimizer, "lib_lora_initial_lr", None)
    if ":" in name:  # sd-scripts' internal spelling "adafactor:<lr>"
        try:
            initial_lr = float(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"lr_scheduler: cannot read the initial lr in '{name}'") from None
    from transformers.optimization import AdafactorSchedule
    return AdafactorSchedule(optimizer, float(initial_lr or 0.0))
