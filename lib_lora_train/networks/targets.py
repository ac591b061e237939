"""Find the layers a network adapts and give them their sd-scripts names."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .presets import PRESETS

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
TE_ROOT = "text_model."


@dataclass
class Target:
    name: str                # sd-scripts lora name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str                # module path inside its root model (as the installed library names it)
    module: torch.nn.Module  # the Linear / Conv2d itself
    part: str                # "unet" | "text_encoder"
    kxk: bool                # a conv with a kernel larger than 1×1
    on_input: bool = False   # IA3: scale the input channels instead of the output channels
    options: dict = field(default_factory=dict)


def normalise_path(path: str, part: str) -> str:
    """Text-encoder paths always start with "text_model." (transformers >= 5.6 dropped that level)."""
    if part == "text_encoder" and not path.startswith(TE_ROOT):
        return TE_ROOT + path
    return path


def lora_name(path: str, part: str) -> str:
    prefix = UNET_PREFIX if part == "unet" else TE_PREFIX
    return (prefix + "." + normalise_path(path, part)).replace(".", "_")


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def _is_kxk(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _match(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def find_targets(root: torch.nn.Module, part: str, preset: str | dict) -> list[Target]:
    """Every layer of `root` (a UNet or a text encoder) that `preset` adapts, in named_modules order.

    k×k convs are listed (kxk=True) only when the preset enables conv layers; a layer reached twice (by class
    and by name) is listed once.
    """
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    key = "unet" if part == "unet" else "te"
    classes = set(spec.get(f"{key}_classes", ()))
    names = list(spec.get(f"{key}_names", ()))
    conv = bool(spec.get("conv", False))
    on_input = list(spec.get("on_input", ()))

    found: dict[str, Target] = {}

    def add(path: str, module: torch.nn.Module) -> None:
        if not _adaptable(module) or path in found:
            return
        kxk = _is_kxk(module)
        if kxk and not conv:
            return
        norm = normalise_path(path, part)
        found[path] = Target(name=lora_name(path, part), path=path, module=module, part=part, kxk=kxk,
                             on_input=_match(norm, on_input))

    for path, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_path, child in module.named_modules():
                add(f"{path}.{child_path}" if path and child_path else (path or child_path), child)
        elif names and path and _match(normalise_path(path, part), names):
            add(path, module)

    targets = list(found.values())
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise ConfigError(f"two layers map to the same LoRA name {t.name}")
        seen.add(t.name)
    return targets


def module_index(root: torch.nn.Module, part: str) -> dict[str, torch.nn.Module]:
    """lora name -> Linear / Conv2d module, for every such layer of root (used to read files back)."""
    return {lora_name(path, part): m for path, m in root.named_modules() if path and _adaptable(m)}
