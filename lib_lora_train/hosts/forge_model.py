"""Forge 2.x's loaded model as the engine sees it. Never imports Forge.

Forge (lllyasviel/stable-diffusion-webui-forge, `backend/`) holds a checkpoint as a `ForgeDiffusionEngine` that is
not a torch module: `forge_objects.unet.model.diffusion_model` (ldm names: input_blocks / middle_block /
output_blocks), `forge_objects.vae.first_stage_model` (ldm names: encoder.down.N.block...), and
`forge_objects.clip.cond_stage_model` holding transformers CLIP text models by key (`clip_l`; SD 2.x `clip_h`;
SDXL `clip_l` + `clip_g`, whose projection sits at `transformer.text_projection`). This module turns those into
the checkpoint's ldm / sgm state dict the engine loads (SD 1.x, SD 2.x, SDXL), refuses quantized storage, and clears
LoRA patches. SD 2.x: Forge keeps OpenCLIP-H as a 23-layer transformers model (it drops the last of the file's 24
layers, the penultimate-layer cut); the engine's loader makes the same cut when it reads the checkpoint layout
(as sd-scripts does), so the missing slot is filled with views of Forge's last layer that the loader drops unread.

Forge loads its model inside `torch.inference_mode()`, so its tensors are inference tensors, which autograd cannot
save for backward. Being an inference tensor is a property of the tensor object, not of its memory: a plain tensor
made outside inference mode on the same storage (`Tensor.set_`) is one autograd accepts, so Forge's weights are
shared, not copied. Only tensors that do not exist in Forge's layout (SDXL bigG's fused q/k/v) are new.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import ConfigError, ModelError
from .webui_model import strip_wrapped

FAMILY_FLAGS = (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1"))
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")


def objects(sd_model: Any) -> Any:
    objs = getattr(sd_model, "forge_objects", None)
    if objs is None or getattr(objs, "unet", None) is None or getattr(objs, "vae", None) is None \
            or getattr(objs, "clip", None) is None:
        raise ModelError("Forge has no complete model loaded (UNet, VAE and text encoder); load an SD 1.x, SD 2.x "
                         "or SDXL checkpoint in the checkpoint dropdown first")
    return objs


def forge_family(sd_model: Any) -> tuple[str, str]:
    """(family, prediction_type) as Forge decided them: its is_sd1 / is_sd2 / is_sdxl flags and its UNet
    predictor's prediction type. Another engine (Flux, SD 3.5, Chroma) is "other"."""
    family = next((name for flag, name in FAMILY_FLAGS if getattr(sd_model, flag, False)), "other")
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    kind = str(getattr(predictor, "prediction_type", "epsilon"))
    return family, "v_prediction" if kind in ("v", "v_prediction") else "epsilon"


def parts(sd_model: Any) -> dict:
    """{"unet" | "vae" | "text": torch module} of the loaded model."""
    objs = objects(sd_model)
    return {"unet": objs.unet.model.diffusion_model, "vae": objs.vae.first_stage_model,
            "text": objs.clip.cond_stage_model}


def quantized_storage(sd_model: Any) -> str | None:
    """How the loaded model's weights are stored when that is not plain fp32 / fp16 / bf16, else None."""
    import torch

    unet_model = getattr(objects(sd_model).unet, "model", None)
    storage = getattr(unet_model, "storage_dtype", None)
    if isinstance(storage, str) and storage.lower() in QUANTIZED_STORAGE:
        return storage
    for name, module in parts(sd_model).items():
        for p in module.parameters():
            if getattr(p, "bnb_quantized", False) or type(p).__name__.startswith("ForgeParams4bit"):
                return "nf4/fp4 (bitsandbytes)"
            if getattr(p, "gguf_cls", None) is not None or type(p).__name__.startswith("ParameterGGUF"):
                return "gguf"
            if p.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
                return f"fp8 ({str(p.dtype).replace('torch.', '')})"
    return None


def refuse_unsupported(sd_model: Any) -> None:
    family, _ = forge_family(sd_model)
    if family == "other":
        raise ModelError(f"Forge has a {type(sd_model).__name__} model loaded; LoRA training here supports SD 1.x, "
                         "SD 2.x and SDXL checkpoints. Load one of those in the checkpoint dropdown.")
    storage = quantized_storage(sd_model)
    if storage:
        raise ConfigError(f"Forge stores the loaded UNet as {storage}; training needs the full-precision weights "
                          "(the quantized ones cannot be trained through exactly). Set the 'Diffusion in Low Bits' "
                          "selector to 'Automatic' (or fp16 / bf16), generate once or reload the checkpoint, then "
                          "train; or name the checkpoint file with pretrained_model_name_or_path so it is read "
                          "from disk.")


def _text_state_dict(text: Any, family: str, transformers_to_openclip: Callable) -> dict:
    """The text encoder(s) under the checkpoint's keys."""
    def hf(name: str) -> dict:
        enc = getattr(text, name, None)
        if enc is None and hasattr(text, "__getitem__"):
            enc = text[name]
        if enc is None:
            raise ModelError(f"Forge's text encoder has no '{name}' model")
        # Forge's text engine wraps the token embedding for textual inversion (`token_embedding.wrapped`)
        return {strip_wrapped(k): t for k, t in enc.transformer.state_dict(keep_vars=True).items()}

    if family == "sd1":
        return {"cond_stage_model.transformer." + k: t for k, t in hf("clip_l").items()}
    if family == "sd2":
        return {"cond_stage_model.model." + k: t for k, t in sd2_openclip(hf("clip_h"), transformers_to_openclip).items()}
    out = {"conditioner.embedders.0.transformer." + k: t for k, t in hf("clip_l").items()
           if not k.startswith("text_projection")}
    out.update({"conditioner.embedders.1.model." + k: t
                for k, t in transformers_to_openclip(hf("clip_g")).items()})
    return out


def plain_alias(t: Any) -> Any:
    """A tensor autograd can save for backward on the memory of `t` (an inference tensor): no copy. Made outside
    inference mode; a tensor whose storage cannot be re-viewed (a quantized subclass) is cloned instead."""
    import torch

    with torch.inference_mode(False):
        t = t.detach()
        if not t.is_inference():
            return t
        try:
            alias = torch.empty(0, dtype=t.dtype, device=t.device)
            alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        except (RuntimeError, TypeError, NotImplementedError):
            return t.clone()
        return alias


def sd2_openclip(clip_h: dict, transformers_to_openclip: Callable) -> dict:
    """SD 2.x's OpenCLIP-H keys from Forge's cut transformers model (n layers, the file had n + 1). The file's last
    resblock is never used (the loader drops it again: the penultimate-layer output is what SD 2.x conditions on),
    so its slot holds views of layer n - 1 (no memory) only to give the loader the file's layer count."""
    from ..models.openclip import openclip_layer_count

    oc = transformers_to_openclip(clip_h)
    last = openclip_layer_count(oc) - 1
    if last < 0:
        raise ModelError("Forge's SD 2.x text encoder has no layers")
    here, slot = f"transformer.resblocks.{last}.", f"transformer.resblocks.{last + 1}."
    oc.update({slot + k[len(here):]: t for k, t in list(oc.items()) if k.startswith(here)})
    return oc


def forge_state_dict(sd_model: Any) -> tuple[dict, int]:
    """(the loaded model's tensors under the checkpoint's ldm / sgm keys, how many of them are new tensors
    rather than Forge's memory). Position-id buffers and other non-weights are passed through."""
    import torch

    from ..models.openclip import transformers_to_openclip

    family, _ = forge_family(sd_model)
    p = parts(sd_model)
    raw = {"model.diffusion_model." + k: t for k, t in p["unet"].state_dict(keep_vars=True).items()}
    raw.update({"first_stage_model." + k: t for k, t in p["vae"].state_dict(keep_vars=True).items()})
    raw.update(_text_state_dict(p["text"], family, transformers_to_openclip))
    forge_ptrs = {_storage_ptr(t) for m in p.values() for t in m.state_dict(keep_vars=True).values()}
    out, new = {}, 0
    for k, t in raw.items():
        out[k] = plain_alias(t)
        new += _storage_ptr(out[k]) not in forge_ptrs
    return out, new


def _storage_ptr(t: Any) -> int:
    return t.untyped_storage().data_ptr()


def engine_model(sd_model: Any, log: Callable[[str], None]) -> Any:
    """The engine's SDModel on Forge's loaded weights (shared where Forge's tensors allow it)."""
    from ..models import load_sd_model
    from .webui_model import shared_count

    refuse_unsupported(sd_model)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    tensors, new = forge_state_dict(sd_model)
    device = next(iter(parts(sd_model)["unet"].parameters())).device
    _family, prediction = forge_family(sd_model)
    model = load_sd_model(tensors, device=device, overrides={"prediction_type": prediction},
                          name=os.path.basename(filename) if filename else "forge-model")
    sha256 = getattr(info, "sha256", None)
    model.info.path = filename if (filename and sha256) else None
    model.info.sha256 = sha256
    model.info.legacy_hash = getattr(info, "hash", None)
    forge_tensors = [t for m in parts(sd_model).values() for t in m.state_dict(keep_vars=True).values()]
    unet = shared_count(model.unet.state_dict().values(), forge_tensors)
    encoders = getattr(model, "text_encoders", None) or [model.text_encoder]
    te = shared_count([t for m in encoders for k, t in m.state_dict().items() if not k.endswith("position_ids")],
                      forge_tensors)
    model.info.extra["webui_shared_unet_tensors"] = list(unet)
    model.info.extra["webui_shared_text_encoder_tensors"] = list(te)
    model.info.extra["forge_new_tensors"] = new
    log(f"training on Forge's loaded {model.info.name} ({model.info.family}): {unet[0]}/{unet[1]} UNet and "
        f"{te[0]}/{te[1]} text-encoder tensors shared with Forge's model (inference tensors re-viewed, no copy); "
        f"{new} tensors Forge does not hold in the checkpoint's layout were built for the run")
    return model


def clear_lora_patches(sd_model: Any, memory: Any) -> int:
    """Forge merges LoRAs into the weights when it loads a patcher (LoraLoader.refresh, originals in its
    `backup`); put the originals back and let the memory manager unload (it also undoes object patches).
    Returns how many weights were restored. The next generation patches again what its prompt asks for."""
    objs = objects(sd_model)
    if memory is not None and hasattr(memory, "unload_all_models"):
        memory.unload_all_models()
    restored = 0
    seen = set()
    for patcher in (objs.unet, getattr(objs.clip, "patcher", None), getattr(objs.vae, "patcher", None)):
        model = getattr(patcher, "model", None)
        loader = getattr(model, "lora_loader", None)
        if loader is None or id(loader) in seen:
            continue
        seen.add(id(loader))
        restored += len(getattr(loader, "backup", {}) or {}) + len(getattr(loader, "online_backup", []) or [])
        offload = getattr(patcher, "offload_device", None)
        kwargs = {"force_refresh": True}
        if offload is not None:
            kwargs["offload_device"] = offload
        loader.refresh(lora_patches={}, **kwargs)
    return restored
