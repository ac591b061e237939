"""sd-scripts `--config_file` TOML (sectioned or flat), the TOMLs lora-scripts writes and ships (its GUI's
extra keys, its `[metadata]` + `[data]` presets), and a referenced `dataset_config`."""
from __future__ import annotations

import os
from typing import Any

from ..errors import DataError
from .translate import SD_SCRIPTS_DEFAULTS, Translator, _falsy

# lora-scripts (mikazuki) GUI keys that its backend turns into something else before sd-scripts sees them
LORA_SCRIPTS_TRAIN_TYPES = {"sd-lora": "sd1", "sdxl-lora": "sdxl", "sd-dreambooth": "DreamBooth (train_db.py)",
                            "sdxl-finetune": "SDXL fine-tuning", "sd3-lora": "SD3", "flux-lora": "FLUX.1",
                            "flux-finetune": "FLUX.1 fine-tuning", "lumina2-lora": "Lumina 2"}
SAMPLE_KEYS = ("positive_prompts", "negative_prompts", "sample_width", "sample_height", "sample_cfg",
               "sample_seed", "sample_steps", "randomly_choice_prompt", "prompt_file")
PATH_KEYS = ("pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "network_weights",
             "resume", "dataset_config", "sample_prompts")


def flatten(data: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(field as written, key, value), one level of sections flattened as sd-scripts does."""
    out = []
    for name, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                out.append((f"[{name}] {k}", k, v))
        else:
            out.append((name, name, value))
    return out


def family_of(data: dict[str, Any]) -> str:
    flat = {k: v for _, k, v in flatten(data)}
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    ttype = flat.get("model_train_type") or meta.get("train_type")
    if ttype:
        return LORA_SCRIPTS_TRAIN_TYPES.get(str(ttype), str(ttype))
    if str(flat.get("model_type", "")).lower() in ("chroma", "flux"):
        return "FLUX.1"
    if flat.get("sdxl") is True:
        return "sdxl"
    if flat.get("v2") is True:
        return "sd2"
    return "sd1"


def read(data: dict[str, Any], t: Translator, *, source_dir: str, lora_scripts: bool) -> dict[str, str]:
    extra: dict[str, str] = {}
    rep = t.report
    fam = rep.family
    if fam not in ("sd1", "sd2", "sdxl"):
        t.unsupported("model type", fam, f"{fam} is not supported (SD 1.x, SD 2.x and SDXL LoRAs are)",
                      blocking=True)
    items = flatten(data)
    flat = {k: v for _, k, v in items}
    for field, key, value in items:
        if field.startswith("[metadata] "):
            t.ignore(field, value, "the preset's description")
            continue
        if key == "model_train_type":
            t.set(field, value, {}, f"lora-scripts' trainer choice: {fam}", changed=False)
            continue
        if key == "model_type" and lora_scripts:
            t.set(field, value, {}, f"the model family: {fam}", changed=False)
            continue
        if key == "lr_restart_cycles":
            if "lr_scheduler_num_cycles" in flat:
                t.ignore(field, value, "lr_scheduler_num_cycles is set as well")
            elif _falsy(value) or str(value) == "1":
                t.ignore(field, value, "lora-scripts' own name; 1 cycle is sd-scripts' default anyway")
            else:
                t.arg(field, "lr_scheduler_num_cycles", value,
                      "lora-scripts' name for lr_scheduler_num_cycles; sd-scripts silently ignores this key in a "
                      "config file (the run had 1 cycle), carried as meant")
            continue
        if key == "gpu_ids":
            t.ignore(field, value, "which GPU; the host picks the device")
            continue
        if key in SAMPLE_KEYS:
            continue
        if key in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
            t.set(field, value, {key: os.path.normpath(os.path.join(source_dir, value))},
                  "a relative path: resolved against the file's folder (sd-scripts resolves it against the "
                  "folder it is started in)")
            continue
        t.arg(field, key, value)
    if any(k in flat for k in SAMPLE_KEYS):
        _sample_prompts(flat, t, extra)
    if not lora_scripts:
        t.source_defaults(SD_SCRIPTS_DEFAULTS, "sd-scripts")
    path = t.values.get("dataset_config")
    if path:
        _check_dataset_config(path, t)
    return extra


def _sample_prompts(flat: dict[str, Any], t: Translator, extra: dict[str, str]) -> None:
    """lora-scripts' GUI keeps the preview prompt as fields and writes sd-scripts' one-line prompt file."""
    fields = {k: flat[k] for k in SAMPLE_KEYS if k in flat}
    if flat.get("prompt_file"):
        t.arg("prompt_file", "sample_prompts", flat["prompt_file"])
        return
    pos = str(flat.get("positive_prompts") or "").strip()
    if not pos:
        t.ignore("positive_prompts", fields, "no preview prompt")
        return
    if flat.get("randomly_choice_prompt"):
        t.unsupported("randomly_choice_prompt", True, "picking a caption file at random as the preview prompt is "
                                                      "not supported; the positive prompt is used")
    line = (f"{pos} --n {flat.get('negative_prompts', '')} --w {flat.get('sample_width', 512)} "
            f"--h {flat.get('sample_height', 512)} --l {flat.get('sample_cfg', 7)} "
            f"--s {flat.get('sample_steps', 24)} --d {flat.get('sample_seed', 2333)}")
    extra["sample_prompts.txt"] = line + "\n"
    t.set("positive_prompts (+ negative_prompts, sample_*)", fields, {"sample_prompts": "sample_prompts.txt"},
          "lora-scripts writes these fields as one sd-scripts prompt line; written beside the result")


def _check_dataset_config(path: str, t: Translator) -> None:
    from ..dataset.config import datasets_from_config, load_config_file
    if not os.path.isfile(path):
        t.report.notes.append(f"dataset_config {path} does not exist here; it is checked when the run starts")
        return
    try:
        datasets_from_config(load_config_file(path), {}, os.path.dirname(path), os.path.basename(path))
    except DataError as exc:
        msg = str(exc)
        if "does not exist" in msg or "No images" in msg or "not found" in msg:
            t.report.notes.append(f"dataset_config: {msg} (checked again when the run starts)")
        else:
            t.error("dataset_config", path, msg)
