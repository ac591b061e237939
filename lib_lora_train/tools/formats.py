"""Read LoRA / LyCORIS files of any common trainer into one form: sd-scripts module names -> canonical tensors.

Key conventions understood (SD 1.x / 2.x names are canonicalised to sd-scripts' diffusers-path names; SDXL names
are kept in sd-scripts' sgm spelling; other models are read but their names are kept as they are):
  sd-scripts, ours, LyCORIS, ai-toolkit, OneTrainer "legacy":  lora_unet_<diffusers path>.lora_down.weight,
      lora_te_text_model_....alpha, LyCORIS hada_* / lokr_* / diff / ia3 weight / w_norm ...
  kohya names with ldm (CompVis) paths (ai-toolkit LoCon keymap, some converters): lora_unet_input_blocks_1_1_...
  OneTrainer "omi": unet.input_blocks.1.1.<...>.lora_down.weight, clip_l.text_model.<...>
  OneTrainer internal / diffusers dotted: lora_unet.down_blocks.0.<...>, lora_te.text_model.<...>
  PEFT / diffusers: unet.down_blocks.0.<...>.lora_A.weight / lora_B.weight, text_encoder.text_model.<...>,
      base_model.model.<...>; old diffusers attention processors: <...>.processor.to_q_lora.down.weight
  ComfyUI ldm names: diffusion_model.input_blocks.1.1.<...>.lora_A.weight
  DiT-style files (transformer.<...>): read for inspection; they fit no SD1 model.
Canonical per-module keys: lora_down.weight, lora_up.weight, lora_mid.weight, alpha, hada_*, lokr_*, diff, diff_b,
weight + on_input (IA3), w_norm / b_norm (norm layers), dora_scale, scalar.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import ModelError

# file suffix -> canonical key, longest first when matching
_SUFFIXES = {
    "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "lora_mid.weight": "lora_mid.weight",
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    "alpha": "alpha", "dora_scale": "dora_scale", "scalar": "scalar",
    **{k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                      "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b",
                      "w_norm", "b_norm", "on_input")},
}
_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
_PEFT_ADAPTER = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")        # lora_A.<adapter>.weight
_OLD_PROCESSOR = re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_LDM_UNET_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "out")
_UNET_ROOTS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "conv_norm_out")


@dataclass
class LoraFile:
    """A network file read into canonical form (see the module docstring)."""
    modules: dict[str, dict[str, torch.Tensor]]   # sd-scripts lora name -> {canonical key: tensor}
    metadata: dict[str, str]
    path: str | None = None
    convention: str = "sd-scripts"                 # how the keys were spelled (see _classify)
    family: str = "sd1"                            # sd1 | sd2 | sdxl | other
    family_guessed: bool = False                   # sd1 only by default: no metadata, name or width told
    unknown_keys: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else "network"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat sd-scripts keys ("<name>.<key>")."""
        return {f"{n}.{k}": t for n, w in self.modules.items() for k, t in w.items()}


# ---------------------------------------------------------------- SD1 ldm <-> diffusers module names

def _sd1_diffusers_module_paths() -> list[str]:
    """Every Linear / Conv module path of an SD1 U-Net in diffusers naming (structure only, no weights)."""
    attn = ["proj_in", "proj_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"]
    attn += [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    res = ["conv1", "conv2", "time_emb_proj", "conv_shortcut"]
    paths = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    for lvl in range(4):
        for j in range(2):
            paths += [f"down_blocks.{lvl}.resnets.{j}.{r}" for r in res]
            if lvl < 3:
                paths += [f"down_blocks.{lvl}.attentions.{j}.{a}" for a in attn]
        if lvl < 3:
            paths.append(f"down_blocks.{lvl}.downsamplers.0.conv")
        for j in range(3):
            paths += [f"up_blocks.{lvl}.resnets.{j}.{r}" for r in res]
            if lvl > 0:
                paths += [f"up_blocks.{lvl}.attentions.{j}.{a}" for a in attn]
        if lvl < 3:
            paths.append(f"up_blocks.{lvl}.upsamplers.0.conv")
    paths += [f"mid_block.resnets.{j}.{r}" for j in range(2) for r in res]
    paths += [f"mid_block.attentions.0.{a}" for a in attn]
    return paths


@functools.lru_cache(maxsize=1)
def sd1_ldm_names() -> tuple[dict[str, str], dict[str, str]]:
    """(exact, prefix) maps from underscored ldm module names to underscored diffusers names for SD1.

    Built with models.convert (the checkpoint converter) from the SD1 module structure; `prefix` maps whole
    attention blocks (e.g. input_blocks_1_1_ -> down_blocks_0_attentions_0_) for deeper transformer stacks.
    """
    from ..models.convert import unet_diffusers_to_ldm

    paths = _sd1_diffusers_module_paths()
    renamed = unet_diffusers_to_ldm({p + ".weight": p for p in paths})
    exact = {ldm[: -len(".weight")].replace(".", "_"): diff.replace(".", "_") for ldm, diff in renamed.items()}
    prefix = {}
    for ldm, diff in exact.items():
        if re.search(r"_attentions_\d+_proj_in$", diff):
            prefix[ldm[: -len("proj_in")]] = diff[: -len("proj_in")]
    return exact, prefix


def _ldm_to_diffusers_name(rest: str) -> str | None:
    exact, prefix = sd1_ldm_names()
    if rest in exact:
        return exact[rest]
    for ldm_p, diff_p in prefix.items():
        if rest.startswith(ldm_p):
            return diff_p + rest[len(ldm_p):]
    return None


# ---------------------------------------------------------------- key parsing

def _split_key(key: str) -> tuple[str, str] | None:
    """(module path as spelled in the file, canonical tensor key), or None."""
    m = _OLD_PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
        return f"{m.group('mod')}.{proj}", "lora_down.weight" if m.group("ud") == "down" else "lora_up.weight"
    for suffix in _SUFFIX_ORDER:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _SUFFIXES[suffix]
    m = _PEFT_ADAPTER.match(key)
    if m:
        return m.group("mod"), "lora_down.weight" if m.group("ab") == "A" else "lora_up.weight"
    if key.endswith(".weight") and key.startswith("lora_"):   # IA3 scale vector
        return key[: -len(".weight")], "weight"
    return None


def _te_name(prefix: str, path: str) -> str:
    path = path if path.startswith("text_model.") else "text_model." + path
    return prefix + "_" + path.replace(".", "_")


def _canonical(module: str, sdxl: bool) -> tuple[str, str]:
    """(canonical sd-scripts name, convention label) of a module path as spelled in the file."""
    if module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) and "." not in module:
        if module.startswith("lora_unet_") and not sdxl:
            rest = module[len("lora_unet_"):]
            if rest.startswith(_LDM_UNET_ROOTS):
                new = _ldm_to_diffusers_name(rest)
                if new is not None:
                    return "lora_unet_" + new, "kohya-ldm"
        return module, "sd-scripts"
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
        if module.startswith(("text_model.", "encoder.layers.")):
            return _te_name("lora_te", module), "peft"
        return "lora_unet_" + module.replace(".", "_"), "peft"
    if module.startswith("model.diffusion_model."):
        module = module[len("model."):]
    root, _, rest = module.partition(".")
    if sdxl and root in ("diffusion_model", "unet", "model") and rest.startswith(_LDM_UNET_ROOTS):
        # SDXL's sd-scripts names are the sgm paths themselves (ComfyUI / OneTrainer "omi" spell them dotted)
        return "lora_unet_" + rest.replace(".", "_"), "comfyui" if root == "diffusion_model" else "onetrainer-omi"
    if root == "diffusion_model" and rest.startswith(_LDM_UNET_ROOTS) and not sdxl:   # ComfyUI-style ldm names
        new = _ldm_to_diffusers_name(rest.replace(".", "_"))
        if new is not None:
            return "lora_unet_" + new, "comfyui"
    if root == "lora_unet":
        return "lora_unet_" + rest.replace(".", "_"), "onetrainer"
    if root in ("lora_te", "lora_te1", "lora_te2"):
        return _te_name(root, rest), "onetrainer"
    if root in ("unet", "model") and rest:
        if rest.startswith(_LDM_UNET_ROOTS) and not sdxl:
            new = _ldm_to_diffusers_name(rest.replace(".", "_"))
            if new is not None:
                return "lora_unet_" + new, "onetrainer-omi"
        return "lora_unet_" + rest.replace(".", "_"), "diffusers"
    if root in ("text_encoder", "clip_l", "te", "te1"):
        return _te_name("lora_te1" if sdxl else "lora_te", rest), "diffusers" if root == "text_encoder" \
            else "onetrainer-omi"
    if root in ("text_encoder_2", "clip_g", "te2"):
        return _te_name("lora_te2", rest), "diffusers"
    if root in _UNET_ROOTS:
        return "lora_unet_" + module.replace(".", "_"), "diffusers"
    if root == "text_model":
        return _te_name("lora_te", module), "diffusers"
    return module, "other"    # transformer.*, diffusion_model.* of other models: kept as spelled


def _family(keys: list[str], metadata: Mapping[str, str]) -> str:
    version = (metadata.get("ss_base_model_version") or "").lower()
    arch = (metadata.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or "-xl-" in arch or any(k.startswith(("lora_te1_", "lora_te2_", "lora_te1.",
                                                                          "text_encoder_2.", "clip_g."))
                                                           for k in keys):
        return "sdxl"
    if version.startswith("sd_v2") or "-v2-" in arch:
        return "sd2"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    dit = ("transformer.", "lora_transformer_", "double_blocks", "single_blocks", "joint_blocks")
    if any(k.startswith(dit) or k.startswith(tuple("diffusion_model." + d for d in dit)) for k in keys):
        return "other"
    return "sd1"


_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}            # cross-attention context width per family
_TE_WIDTHS = {768: "sd1", 1024: "sd2"}                        # the single text encoder's width


# Attention where only SDXL has it (the first up level; SD 1.x / 2.x have none there), or deeper transformer stacks
_SDXL_STRUCTURE = re.compile(r"output_blocks[._][0-2][._]1[._](proj_in|proj_out|transformer_blocks)|"
                             r"transformer_blocks[._][1-9]")


def _shape_hint_family(tensors: Mapping[str, torch.Tensor], family: str) -> str:
    """Tell SD 1.x, SD 2.x and SDXL apart by the cross-attention (or text-encoder) width when neither the
    metadata nor the key names say (e.g. a U-Net-only LoRA with ldm / sgm names)."""
    te_hint = None
    for key, t in tensors.items():
        down = "lora_down" in key or "lora_A" in key or "hada_w1_b" in key
        if not down or t.dim() < 2:
            continue
        flat = key.replace(".", "_")
        if "attn2_to_k" in flat and int(t.shape[1]) in _WIDTHS:
            return _WIDTHS[int(t.shape[1])]
        if te_hint is None and "self_attn_q_proj" in flat and flat.startswith(("lora_te_", "text_encoder_")):
            te_hint = _TE_WIDTHS.get(int(t.shape[1]))
    if te_hint is None and any(_SDXL_STRUCTURE.search(k) for k in tensors):
        return "sdxl"
    return te_hint or family


def normalise(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
              path: str | None = None) -> LoraFile:
    """Canonical LoraFile from raw file tensors (any convention in the module docstring)."""
    metadata = dict(metadata or {})
    keys = list(tensors)
    family = _family(keys, metadata)
    guessed = False
    if family == "sd1" and not metadata.get("ss_base_model_version") and not metadata.get("modelspec.architecture"):
        family = _shape_hint_family(tensors, "")
        guessed = not family
        family = family or "sd1"
    modules: dict[str, dict[str, torch.Tensor]] = {}
    conventions: dict[str, int] = {}
    unknown = []
    for key in keys:
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, canon_key = split
        name, conv = _canonical(module, family == "sdxl")
        conventions[conv] = conventions.get(conv, 0) + 1
        slot = modules.setdefault(name, {})
        if canon_key in slot:
            raise ModelError(f"{path or 'network file'}: two keys map to {name}.{canon_key} (e.g. {key})")
        slot[canon_key] = tensors[key]
    if not modules:
        raise ModelError(f"{path or 'the file'} holds no LoRA / LyCORIS tensors"
                         + (f" (keys such as {unknown[:3]})" if unknown else ""))
    # text-encoder names are the same in several conventions: the most common other spelling names the file
    special = {k: v for k, v in conventions.items() if k != "sd-scripts"}
    convention = max(special or conventions, key=(special or conventions).get)
    return LoraFile(modules=modules, metadata=metadata, path=path, convention=convention, family=family,
                    unknown_keys=unknown, family_guessed=guessed)


def read_lora(source: str | os.PathLike | LoraFile | Mapping[str, torch.Tensor],
              metadata: Mapping[str, str] | None = None) -> LoraFile:
    """A network file (.safetensors, or a .pt / .ckpt of tensors) or raw tensors -> LoraFile."""
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, Mapping):
        return normalise(source, metadata)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ModelError(f"network file not found: {path}")
    if path.lower().endswith(".safetensors"):
        from ..networks.io import read_network_file
        tensors, meta = read_network_file(path)
    else:
        from ..models.ckpt import read_checkpoint
        tensors, meta = read_checkpoint(path), {}
    return normalise(tensors, meta, path=path)
