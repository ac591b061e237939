"""The WebUI's loaded model as the engine sees it: its family, its tensors under the checkpoint's (ldm / sgm) key
names, and the engine's SDModel built on those same tensors (shared, not copied). Never imports the WebUI.

Live key layouts after the WebUI's hijack (webui_ecosystem.md §2.3): the text encoders sit under `.wrapped`
levels (SD1 `cond_stage_model.wrapped.transformer.…`, SD2 `cond_stage_model.wrapped.model.…`, SDXL
`conditioner.embedders.N.wrapped.…`, token embeddings one `.wrapped` deeper), and SDXL also registers its
`conditioner` a second time as `cond_stage_model`.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TE_PREFIXES = ("cond_stage_model.", "conditioner.")


def is_sdxl_shaped(sd_model: Any) -> bool:
    return bool(getattr(sd_model, "is_sdxl", False)) or hasattr(sd_model, "conditioner")


def live_family(sd_model: Any) -> tuple[str, str]:
    """(family, prediction_type) of the loaded model, as the WebUI itself decided them: its is_sdxl / is_sd2 /
    is_sd3 flags (set from the weights at load) and `parameterization` ("v" for v-prediction models)."""
    prediction = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
    if getattr(sd_model, "is_sd3", False):
        return "sd3", prediction
    if is_sdxl_shaped(sd_model):
        return "sdxl", prediction
    cond = getattr(sd_model, "cond_stage_model", None)
    if getattr(sd_model, "is_sd2", False) or hasattr(cond, "model") or hasattr(getattr(cond, "wrapped", None), "model"):
        return "sd2", prediction
    return "sd1", prediction


def strip_wrapped(key: str) -> str:
    return ".".join(p for p in key.split(".") if p != "wrapped")


def live_state_dict(sd_model: Any) -> dict:
    """The live model's tensors under the checkpoint's keys: `.wrapped` levels of the text encoders dropped,
    SDXL's `cond_stage_model` alias of its conditioner left out, other wrappers' extras (e.g. sgm's denoiser
    buffers) left out. Tensors are the model's own (no copies)."""
    sdxl = is_sdxl_shaped(sd_model)
    out = {}
    for key, tensor in sd_model.state_dict(keep_vars=True).items():
        if sdxl and key.startswith("cond_stage_model."):
            continue
        if key.startswith(TE_PREFIXES):
            key = strip_wrapped(key)
        if key.startswith((UNET, VAE, *TE_PREFIXES)) or "." not in key:   # top-level: betas, alphas_cumprod, ...
            out.setdefault(key, tensor.detach())
    if sdxl:
        return _openclip_in_checkpoint_layout(out, "conditioner.embedders.1.")
    if live_family(sd_model)[0] == "sd2":
        return _openclip_in_checkpoint_layout(out, "cond_stage_model.")
    return out


def _openclip_in_checkpoint_layout(out: dict, prefix: str) -> dict:
    """reForge (ldm_patched) holds the OpenCLIP text encoders (SDXL's bigG, SD 2.x's H) as transformers-layout
    CLIPs (`<prefix>transformer.text_model.*`) with the projection it uses beside them (`<prefix>text_projection`,
    applied as x @ P like OpenCLIP's own); the checkpoint layout is OpenCLIP's (`<prefix>model.*`). Converted:
    the same tensors under OpenCLIP's names, only the fused q/k/v are new (a copy). H keeps all 24 layers there,
    as in the file; the loader makes the penultimate-layer cut."""
    hf_prefix, oc_prefix = prefix + "transformer.", prefix + "model."
    if any(k.startswith(oc_prefix) for k in out) or not any(k.startswith(hf_prefix) for k in out):
        return out
    from ..models.openclip import transformers_to_openclip

    hf = {k[len(hf_prefix):]: out.pop(k) for k in [k for k in out if k.startswith(hf_prefix)]}
    hf.pop("text_projection.weight", None)          # a transformers model's own projection: not the one used
    oc = transformers_to_openclip(hf)
    proj = out.pop(prefix + "text_projection", None)
    if proj is not None:
        oc["text_projection"] = proj
    out.update({oc_prefix + k: t for k, t in oc.items()})
    return out


def model_parts(sd_model: Any) -> list:
    """The UNet, VAE and text encoder(s) as modules, each once (SDXL's cond_stage_model is its conditioner)."""
    parts, seen = [], set()
    for attr in ("model", "first_stage_model", "conditioner", "cond_stage_model"):
        part = getattr(sd_model, attr, None)
        if part is not None and id(part) not in seen and hasattr(part, "parameters"):
            seen.add(id(part))
            parts.append(part)
    return parts


def _storage(t: Any) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return t.data_ptr()


def shared_count(model_tensors: Iterable, webui_tensors: Iterable) -> tuple:
    """(how many of `model_tensors` live in the memory of one of `webui_tensors`, how many there are). By
    storage, so views count: SD2 / SDXL's q, k and v projections are slices of OpenCLIP's in_proj_weight."""
    ptrs = {_storage(t) for t in webui_tensors}
    tensors = list(model_tensors)
    return sum(1 for t in tensors if _storage(t) in ptrs), len(tensors)


def first_device(module: Any):
    for p in module.parameters():
        return p.device
    return None


def engine_model(sd_model: Any, log: Callable[[str], None]) -> Any:
    """The engine's SDModel on the live tensors, with the WebUI's own prediction type and hashes."""
    from ..models import load_sd_model

    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(info, "filename", None)
    tensors = live_state_dict(sd_model)
    device = first_device(sd_model.model) if hasattr(sd_model, "model") else None
    _family, prediction = live_family(sd_model)
    # SD 2.x 768-v and the v-prediction SDXL finetunes look like their epsilon twins in the weights: the WebUI
    # decided at load time (its v-prediction test / the config), and the run follows that decision.
    model = load_sd_model(tensors, device=device or "cpu", overrides={"prediction_type": prediction},
                          name=os.path.basename(filename) if filename else "webui-model")
    sha256 = getattr(info, "sha256", None)
    if sha256 is None and info is not None and hasattr(info, "calculate_shorthash"):
        with contextlib.suppress(Exception):
            info.calculate_shorthash()        # the WebUI's own cached hash (None with --no-hashing)
            sha256 = getattr(info, "sha256", None)
    # With the hashes known the engine never re-reads the (GB-sized) file; without a sha256 it gets no path
    # so it does not hash it either (the metadata then lacks ss_new_sd_model_hash).
    model.info.path = filename if (filename and sha256) else None
    model.info.sha256 = sha256
    model.info.legacy_hash = getattr(info, "hash", None)
    webui_tensors = list(sd_model.state_dict(keep_vars=True).values())   # the WebUI's own, not converted ones
    unet = shared_count(model.unet.state_dict().values(), webui_tensors)
    encoders = getattr(model, "text_encoders", None) or [model.text_encoder]
    te = shared_count([t for m in encoders for k, t in m.state_dict().items() if not k.endswith("position_ids")],
                      webui_tensors)
    model.info.extra["webui_shared_unet_tensors"] = list(unet)
    model.info.extra["webui_shared_text_encoder_tensors"] = list(te)
    log(f"training on the WebUI's {model.info.name} ({model.info.family}): {unet[0]}/{unet[1]} UNet and "
        f"{te[0]}/{te[1]} text-encoder tensors shared with the loaded model (no copy)")
    return model
