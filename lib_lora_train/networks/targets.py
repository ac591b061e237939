"""Find the layers a network adapts and give them their sd-scripts names."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .names import TE_PREFIX, UNET_PREFIX, unet_naming_paths
from .presets import PRESETS

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
    encoder: int | None = None   # SDXL: 1 (CLIP-L, lora_te1) or 2 (bigG, lora_te2); None for one encoder


def normalise_path(path: str, part: str) -> str:
    """Text-encoder paths always start with "text_model." (transformers >= 5.6 dropped that level)."""
    if part == "text_encoder" and not path.startswith(TE_ROOT):
        return TE_ROOT + path
    return path


def lora_name(path: str, part: str, prefix: str | None = None) -> str:
    """sd-scripts name of the layer at `path` (for an SDXL U-Net: its sgm path, see names.sdxl_unet_paths)."""
    prefix = prefix or (UNET_PREFIX if part == "unet" else TE_PREFIX)
    return (prefix + "." + normalise_path(path, part)).replace(".", "_")


def _naming(root: torch.nn.Module, part: str, family: str):
    """path -> the path the layer is named and name-matched by (None: not nameable in this family)."""
    renamed = unet_naming_paths(root, family) if part == "unet" else None
    if renamed is None:
        return lambda path: normalise_path(path, part)
    return renamed.get


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


def _is_kxk(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _match(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def find_targets(root: torch.nn.Module, part: str, preset: str | dict, *, family: str = "sd1",
                 prefix: str | None = None, encoder: int | None = None) -> list[Target]:
    """Every layer of `root` (a UNet or a text encoder) that `preset` adapts, in named_modules order.

    k×k convs are listed (kxk=True) only when the preset enables conv layers; a layer reached twice (by class
    and by name) is listed once. family "sdxl": U-Net layers are named, and name patterns matched, by their sgm
    path (as sd-scripts and LyCORIS see sd-scripts' own SDXL U-Net); prefix: lora_te1 / lora_te2 for SDXL.
    """
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    key = "unet" if part == "unet" else "te"
    classes = set(spec.get(f"{key}_classes", ()))
    names = list(spec.get(f"{key}_names", ()))
    conv = bool(spec.get("conv", False))
    on_input = list(spec.get("on_input", ()))

    named_as = _naming(root, part, family)
    found: dict[str, Target] = {}

    def add(path: str, module: torch.nn.Module) -> None:
        if not _adaptable(module) or path in found:
            return
        kxk = _is_kxk(module)
        if kxk and not conv:
            return
        norm = named_as(path)
        if norm is None:
            raise ConfigError(f"the {part} layer {path} has no sd-scripts name in the {family} layout")
        found[path] = Target(name=lora_name(norm, part, prefix), path=path, module=module, part=part, kxk=kxk,
                             on_input=_match(norm, on_input), encoder=encoder)

    for path, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_path, child in module.named_modules():
                add(f"{path}.{child_path}" if path and child_path else (path or child_path), child)
        elif names and path and _adaptable(module) and (norm := named_as(path)) is not None \
                and _match(norm, names):
            add(path, module)

    targets = list(found.values())
    seen: set[str] = set()
    for t in targets:
        if t.name in seen:
            raise ConfigError(f"two layers map to the same LoRA name {t.name}")
        seen.add(t.name)
    return targets


def module_index(root: torch.nn.Module, part: str, *, family: str = "sd1",
                 prefix: str | None = None) -> dict[str, torch.nn.Module]:
    """lora name -> Linear / Conv2d module, for every such layer of root (used to read files back)."""
    named_as = _naming(root, part, family)
    out = {}
    for path, m in root.named_modules():
        if path and _adaptable(m) and (norm := named_as(path)) is not None:
            out[lora_name(norm, part, prefix)] = m
    return out


def text_encoder_list(text_encoder) -> list[torch.nn.Module]:
    """[te] or [te1, te2] (SDXL) from one encoder, a list / tuple of them, or None."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


def model_index(unet: torch.nn.Module | None, text_encoder, family: str = "sd1") -> dict[str, torch.nn.Module]:
    """lora name -> layer for a whole model (U-Net and its one or two text encoders), in the family's names."""
    from .names import te_prefixes

    out: dict[str, torch.nn.Module] = {}
    encoders = text_encoder_list(text_encoder)
    if encoders:
        for prefix, te in zip(te_prefixes(family, len(encoders)), encoders):
            out.update(module_index(te, "text_encoder", family=family, prefix=prefix))
    if unet is not None:
        out.update(module_index(unet, "unet", family=family))
    return out
