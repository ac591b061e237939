"""Optimizers by their sd-scripts names (`optimizer_type`), with sd-scripts' argument handling.

`make_optimizer` returns the optimizer and the text sd-scripts stores as `ss_optimizer`: the class path
(`module.Class`) followed by the final keyword arguments in parentheses, e.g.
`torch.optim.adamw.AdamW(weight_decay=0.1)`. Defaults that sd-scripts inserts (momentum for SGDNesterov,
relative_step for Adafactor) appear there too, as they do in sd-scripts.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Spec:
    name: str          # canonical sd-scripts spelling
    module: str        # module to import
    attr: str          # class name inside it
    family: str        # "plain", "bnb", "dadapt", "prodigy", "adafactor", "sgd_nesterov"


_SPECS = [
    _Spec("AdamW", "torch.optim", "AdamW", "plain"),
    _Spec("Lion", "lion_pytorch", "Lion", "plain"),
    _Spec("SGDNesterov", "torch.optim", "SGD", "sgd_nesterov"),
    _Spec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bnb"),
    _Spec("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bnb"),
    _Spec("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", "bnb_sgd_nesterov"),
    _Spec("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bnb"),
    _Spec("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bnb"),
    _Spec("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bnb"),
    _Spec("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bnb"),
    _Spec("Prodigy", "prodigyopt", "Prodigy", "prodigy"),
    # sd-scripts maps the historic name "DAdaptation" to the preprint variant of D-Adapt Adam.
    _Spec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadapt"),
    _Spec("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadapt"),
    _Spec("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadapt"),
    _Spec("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadapt"),
    _Spec("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadapt"),
    _Spec("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadapt"),
    _Spec("DAdaptLion", "dadaptation", "DAdaptLion", "dadapt"),
    _Spec("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadapt"),
    _Spec("Adafactor", "transformers.optimization", "Adafactor", "adafactor"),
]
_BY_LOWER = {s.name.lower(): s for s in _SPECS}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(s.name for s in _SPECS)


def parse_optimizer_args(optimizer_args: list[str] | tuple[str, ...] | dict | None) -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=0.9,0.99"]` -> `{"weight_decay": 0.01, "betas": (0.9, 0.99)}`.

    Values are Python literals, as in sd-scripts; a dict is taken as already parsed.
    """
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, dict):
        return dict(optimizer_args)
    if isinstance(optimizer_args, str):
        optimizer_args = optimizer_args.split()
    kwargs: dict[str, Any] = {}
    for item in optimizer_args:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not key.isidentifier():
            raise ConfigError(f"optimizer_args: expected 'key=value', got '{item}'")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"optimizer_args: the value of '{key}' must be a Python literal (number, True/False, "
                              f"tuple like 0.9,0.99, or a quoted string), got '{text}'") from None
    return kwargs


def describe_optimizer(cls: type, kwargs: dict[str, Any]) -> str:
    """The ss_optimizer text: `module.Class` plus `(k=v,k=v)` when arguments were given."""
    name = f"{cls.__module__}.{cls.__name__}"
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}({args})" if args else name


def make_optimizer(optimizer_type: str, param_groups: list[dict], learning_rate: float,
                   optimizer_args: list[str] | dict | None = None,
                   kernel: str = "auto") -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer named `optimizer_type` (case-insensitive; "" means AdamW) over `param_groups`.

    `param_groups` are dicts with "params" and optionally "lr" (and any extra keys such as "name"); they are
    copied, never modified. `kernel` (optimizer_kernel): which of torch.optim's implementations runs the update
    (see kernel_args). Returns (optimizer, ss_optimizer description).
    """
    spec = _lookup(optimizer_type)
    kwargs = parse_optimizer_args(optimizer_args)
    groups = [{**g, "params": list(g["params"])} for g in param_groups]
    if not any(g["params"] for g in groups):
        raise ConfigError("nothing to train: the optimizer got no parameters")
    lr: float | None = learning_rate
    fixed: dict[str, Any] = {}  # arguments passed but not listed in the description (as sd-scripts)

    if spec.family in ("sgd_nesterov", "bnb_sgd_nesterov"):
        if "momentum" not in kwargs:
            log.info("SGDNesterov needs momentum; using momentum=0.9")
            kwargs["momentum"] = 0.9
        fixed["nesterov"] = True
    elif spec.family in ("dadapt", "prodigy"):
        lr = _check_adaptive_lrs(spec.name, groups, learning_rate)
    elif spec.family == "adafactor":
        lr = _adafactor_setup(groups, learning_rate, kwargs)

    cls = _import_class(spec)
    fixed.update(kernel_args(cls, groups, kernel, kwargs))   # not in ss_optimizer: the same update, faster
    _check_kwargs(spec, cls, {**kwargs, **fixed})
    try:
        optimizer = cls(groups, lr=lr, **fixed, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {spec.name} rejected its arguments {kwargs}: {e}") from e
    if spec.family == "adafactor" and kwargs.get("relative_step"):
        # make_scheduler reads this to build the "adafactor" proxy schedule, as sd-scripts does.
        optimizer.lib_lora_initial_lr = learning_rate  # type: ignore[attr-defined]
    return optimizer, describe_optimizer(cls, kwargs)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_args(cls: type, groups: list[dict], kernel: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `fused` / `foreach` arguments of a torch.optim class (AdamW, SGD) for optimizer_kernel.

    auto: fused (one kernel for all parameters) when every parameter is a float32 / float16 / bfloat16 CUDA tensor;
    otherwise PyTorch's own default (foreach on CUDA, the per-parameter loop on the CPU, so CPU numbers never
    change). fused / foreach / for_loop: that implementation, or a clear error where the class has none. The
    user's own optimizer_args fused= / foreach= always win. Other optimizers' classes are left alone (auto) or
    refused (an explicit choice). All three compute the same update; they differ in rounding order only.
    """
    if "fused" in kwargs or "foreach" in kwargs:
        return {}
    try:
        accepted = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        accepted = {}
    is_torch = cls.__module__.startswith("torch.optim")
    has_fused, has_foreach = is_torch and "fused" in accepted, is_torch and "foreach" in accepted
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if kernel == "auto":
        if has_fused and on_cuda and all(p.dtype in _FUSED_DTYPES for p in params):
            return {"fused": True}
        return {}
    name = f"{cls.__module__}.{cls.__name__}"
    if kernel == "fused":
        if not has_fused:
            raise ConfigError(f"optimizer_kernel = \"fused\": {name} has no fused implementation (torch.optim's "
                              f"AdamW and SGD have one); use optimizer_kernel = \"auto\"")
        return {"fused": True}
    if not has_foreach:
        raise ConfigError(f"optimizer_kernel = \"{kernel}\": {name} does not offer a choice of implementation "
                          f"(torch.optim's AdamW and SGD do); use optimizer_kernel = \"auto\"")
    return {"foreach": kernel == "foreach"}


def adafactor_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for a transformers Adafactor that computes its own learning rate (relative_step=True)."""
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _lookup(optimizer_type: str) -> _Spec:
    key = (optimizer_type or "AdamW").strip().lower()
    if key in _BY_LOWER:
        return _BY_LOWER[key]
    close = difflib.get_close_matches(key, list(_BY_LOWER), n=1, cutoff=0.5)
    hint = f"; did you mean '{_BY_LOWER[close[0]].name}'?" if close else ""
    raise ConfigError(f"optimizer_type: unknown optimizer '{optimizer_type}'{hint} "
                      f"(known: {', '.join(OPTIMIZER_NAMES)})")


def _import_class(spec: _Spec) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        if spec.family.startswith("bnb"):
            raise ConfigError(f"optimizer_type {spec.name} needs the bitsandbytes package, which is not installed. "
                              f"This extension never installs bitsandbytes (it is CUDA-specific and often breaks "
                              f"installs); use AdamW or Lion instead.") from e
        top = spec.module.split(".")[0]
        raise ConfigError(f"optimizer_type {spec.name} needs the '{top}' package, which cannot be imported: {e}") from e
    cls = getattr(module, spec.attr, None)
    if cls is None:
        raise ConfigError(f"optimizer_type {spec.name}: the installed {spec.module} has no {spec.attr} "
                          f"(too old a version?)")
    return cls


def _check_kwargs(spec: _Spec, cls: type, kwargs: dict[str, Any]) -> None:
    """Name the unknown keys before the constructor fails with a bare TypeError."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n in params if n not in ("self", "params", "lr")]
    for key in kwargs:
        if key == "lr":
            raise ConfigError("optimizer_args: do not set lr here; use learning_rate / unet_lr / text_encoder_lr")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"optimizer_args: {spec.name} has no argument '{key}'{hint} "
                              f"(accepted: {', '.join(accepted)})")


def _check_adaptive_lrs(name: str, groups: list[dict], learning_rate: float) -> float:
    """D-Adaptation and Prodigy estimate one step size for all groups: their lrs are multipliers that must agree.

    sd-scripts only warns ("only the first one will take effect"), and D-Adaptation then fails mid-run; here the
    mismatch is refused up front. Groups at lr 0 (frozen) are allowed, as D-Adaptation allows them.
    """
    lrs = {float(g.get("lr", learning_rate)) for g in groups}
    nonzero = sorted(lr for lr in lrs if lr != 0.0)
    if len(nonzero) > 1:
        raise ConfigError(f"{name} adapts one learning rate for the whole network, but the parameter groups have "
                          f"different learning rates {nonzero} (from unet_lr / text_encoder_lr / block lr weights). "
                          f"Set them all equal (usually 1.0) or leave unet_lr and text_encoder_lr unset.")
    effective = nonzero[0] if nonzero else learning_rate
    if effective <= 0.1:
        log.warning("%s: learning rate %g is very low; these optimizers expect about 1.0", name, effective)
    return learning_rate


def _adafactor_setup(groups: list[dict], learning_rate: float, kwargs: dict[str, Any]) -> float | None:
    """sd-scripts' Adafactor rules: relative_step defaults to True and then owns the learning rate."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        log.info("Adafactor: warmup_init=True needs relative_step; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            log.warning("Adafactor: clip_threshold=1.0 is the recommended value")
        return learning_rate
    if learning_rate != 0.0:
        log.warning("Adafactor with relative_step=True computes its own learning rate; learning_rate=%g is only "
                    "reported as the initial lr (set optimizer_args relative_step=False to use it)", learning_rate)
    popped = [g.pop("lr", None) for g in groups]  # a list, not any(): every group must lose its lr
    if any(lr is not None for lr in popped):
        log.warning("Adafactor with relative_step=True ignores unet_lr / text_encoder_lr")
    return None
