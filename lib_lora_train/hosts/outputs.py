"""What a host writes next to each trained LoRA so the WebUI's Lora cards show it well.

`<lora>.json` is the user-metadata sidecar the WebUI's Lora page reads and edits ("activation text", "preferred
weight", "sd version", "notes", ...); `<lora>.preview.png` is the card's picture. A sidecar the user already
edited keeps the user's values: only missing keys are filled in.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..fsutil import atomic_write, atomic_write_json

SD_VERSIONS = {"sd_v1": "SD1", "sd_v2": "SD2", "sdxl": "SDXL"}


def sidecar_path(lora_path: str) -> str:
    return os.path.splitext(lora_path)[0] + ".json"


def preview_path(lora_path: str) -> str:
    return os.path.splitext(lora_path)[0] + ".preview.png"


def sd_version(base_model_version: str | None) -> str:
    """The sidecar's "sd version" from ss_base_model_version (sd_v1, sd_v2_768_v, sdxl_base_v1-0, ...)."""
    v = (base_model_version or "").lower()
    for prefix, name in (("sdxl", "SDXL"), ("sd_v2", "SD2"), ("sd_v1", "SD1")):
        if v.startswith(prefix):
            return name
    return "Unknown"


def run_notes(config: dict[str, Any], *, epoch: int | None, step: int | None, loss: float | None) -> str:
    """One paragraph a user reads on the card: what was trained, how, and how far."""
    net = config.get("network_module", "networks.lora")
    args = " ".join(config.get("network_args") or [])
    parts = [f"Trained with lib_lora_train ({net}{' ' + args if args else ''}), "
             f"dim {config.get('network_dim')}, alpha {config.get('network_alpha')}"]
    lr = [f"lr {config.get('learning_rate')}"]
    if config.get("unet_lr") is not None:
        lr.append(f"unet {config.get('unet_lr')}")
    if config.get("text_encoder_lr") is not None:
        lr.append(f"text encoder {config.get('text_encoder_lr')}")
    parts.append(", ".join(lr))
    parts.append(f"{config.get('optimizer_type') or 'AdamW'}, batch {config.get('train_batch_size')}, "
                 f"resolution {config.get('resolution')}, clip skip {config.get('clip_skip') or 1}")
    if epoch is not None:
        parts.append(f"epoch {epoch}" + (f", step {step}" if step is not None else ""))
    if loss is not None:
        parts.append(f"last loss {loss:.4f}")
    base = config.get("pretrained_model_name_or_path")
    if base:
        parts.append(f"base {os.path.basename(str(base))}")
    return "; ".join(parts) + "."


def write_sidecar(lora_path: str, *, activation_text: str = "", preferred_weight: float = 1.0,
                  sd_version_name: str = "SD1", notes: str = "", description: str = "") -> str:
    """Create or complete `<lora>.json`; values the user set before are kept."""
    path = sidecar_path(lora_path)
    data: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = json.load(fh)
            data = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            data = {}   # unreadable: rewritten below (the LoRA itself is never touched)
    ours = {"description": description, "sd version": sd_version_name, "activation text": activation_text,
            "preferred weight": preferred_weight, "negative text": "", "notes": notes}
    for key, value in ours.items():
        data.setdefault(key, value)
    atomic_write_json(path, data)
    return path


def set_preview(lora_path: str, image_path: str, *, replace: bool = False) -> str | None:
    """Copy a sample image as the card's preview (unless one exists and `replace` is false)."""
    target = preview_path(lora_path)
    if not os.path.isfile(image_path) or (os.path.exists(target) and not replace):
        return None
    if not image_path.lower().endswith(".png"):
        from PIL import Image
        with Image.open(image_path) as im:
            atomic_write(target, lambda tmp, im=im: im.convert("RGB").save(tmp, format="PNG"))
    else:
        atomic_write(target, lambda tmp: shutil.copyfile(image_path, tmp))
    return target


def related_files(lora_path: str) -> list[str]:
    """The files this module writes beside a LoRA (for deleting a run)."""
    return [p for p in (sidecar_path(lora_path), preview_path(lora_path)) if os.path.exists(p)]
