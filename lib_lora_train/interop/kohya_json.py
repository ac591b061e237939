"""kohya_ss GUI configuration JSON (any release) -> sd-scripts options, field by field.

kohya_ss keeps its own field names for some options (`optimizer`, `max_resolution`, `epoch`, `lr_warmup` in
percent, `LoRA_type` instead of network_module + network_args, `sdxl_*`), stores numbers as text in older
releases and uses "" for "unset". The meaning of each field is what kohya_ss' lora_gui.py turns it into before
it starts sd-scripts.
"""
from __future__ import annotations

import re
import shlex
from typing import Any

from .translate import Translator, _falsy

# LoRA_type -> (network_module, LyCORIS algo); None: not trainable here
LORA_TYPES: dict[str, tuple[str, str | None] | None] = {
    "Standard": ("networks.lora", None), "Kohya LoCon": ("networks.lora", None),
    "LoCon": ("lycoris.kohya", "locon"), "LyCORIS/LoCon": ("lycoris.kohya", "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha"), "LyCORIS/LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3"), "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora"),
    "Kohya DyLoRA": ("networks.dylora", None),
    "Kohya LoHa": ("lycoris.kohya", "loha"), "Kohya LoKr": ("lycoris.kohya", "lokr"),
    "LyCORIS/GLoRA": None, "LyCORIS/BOFT": None, "LyCORIS/Diag-OFT": None, "LyCORIS/Native Fine-Tuning": None,
    "LoRA-FA": None, "Flux1": None, "Flux1 OFT": None, "HunyuanImage-2.1": None, "Anima": None, "Lumina": None,
}
# model checkboxes of other architectures
OTHER_MODELS = {"flux1_checkbox": "FLUX.1", "sd3_checkbox": "SD3", "hunyuan_image_checkbox": "HunyuanImage",
                "anima_checkbox": "Anima", "lumina_checkbox": "Lumina"}
# kohya_ss field -> sd-scripts option of another name
RENAMED = {"max_resolution": "resolution", "optimizer": "optimizer_type", "lora_network_weights": "network_weights"}
# fields only the GUI reads (no effect on the trained file)
GUI_ONLY = {
    "model_list": "the GUI's model dropdown", "save_as_bool": "a GUI switch", "print_only": "a GUI switch",
    "headless": "a GUI switch", "extra_accelerate_launch_args": "accelerate launch options",
    "main_process_port": "accelerate launch option", "num_machines": "accelerate launch option",
    "dynamo_mode": "a speed option", "dynamo_use_dynamic": "a speed option",
    "dynamo_use_fullgraph": "a speed option", "lowvram": "memory handling (kohya_ss no longer passes it)",
    "sample_every_n_steps_enabled": "a GUI switch", "config_file_name": "the GUI's file name",
}
# network fields read through LoRA_type
NETWORK_FIELDS = {"LoRA_type", "LyCORIS_preset", "conv_dim", "conv_alpha", "conv_dims", "conv_alphas", "unit",
                  "factor", "use_cp", "use_tucker", "decompose_both", "train_on_input", "rank_dropout",
                  "module_dropout", "bypass_mode", "dora_wd", "use_scalar", "rank_dropout_scale", "train_norm",
                  "constrain", "rescaled", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                  "block_lr_zero_threshold", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
                  "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _plain(value: Any) -> Any:
    """Older releases store numbers as text: '0.0001' -> 0.0001, '2' -> 2."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        x = float(value)
        return int(x) if x.is_integer() and "." not in value and "e" not in value.lower() else x
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _num(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def family_of(data: dict[str, Any]) -> str:
    for key, name in OTHER_MODELS.items():
        if data.get(key) is True:
            return name
    lt = str(data.get("LoRA_type") or "")
    if lt.startswith("Flux1"):
        return "FLUX.1"
    if data.get("sdxl") is True or data.get("sdxl") == "True":
        return "sdxl"
    if data.get("v2") is True:
        return "sd2"
    return "sd1"


def read(data: dict[str, Any], t: Translator) -> dict[str, str]:
    """Translate every field; returns extra files to write beside the result ({name: text})."""
    extra: dict[str, str] = {}
    data = {k: _plain(v) for k, v in data.items()}
    rep = t.report
    done: set[str] = set()

    def mark(*keys: str) -> None:
        done.update(keys)

    # ---- the model family
    fam = rep.family
    if fam not in ("sd1", "sd2", "sdxl"):
        t.unsupported("LoRA_type" if str(data.get("LoRA_type", "")).startswith("Flux1") else "model",
                      data.get("LoRA_type"), f"{fam} models are not supported (SD 1.x, SD 2.x and SDXL are)",
                      blocking=True)
    for key in OTHER_MODELS:
        if key in data:
            mark(key)
            if data[key] is not True:
                t.ignore(key, data[key], "another architecture's switch, off")
    if "sdxl" in data:
        mark("sdxl")
        t.set("sdxl", data["sdxl"], {}, "the model family: " + ("SDXL (sdxl_train_network.py)" if fam == "sdxl"
                                                                 else "not SDXL"), changed=False)
    sdxl = fam == "sdxl"
    for key, ours in (("sdxl_no_half_vae", "no_half_vae"), ("sdxl_cache_text_encoder_outputs",
                                                            "cache_text_encoder_outputs")):
        if key in data:
            mark(key)
            if sdxl:
                t.arg(key, ours, data[key])
            else:
                t.ignore(key, data[key], "an SDXL field; kohya_ss passes it only for SDXL")

    # ---- length: `epoch` is the GUI's epoch count, turned into max_train_steps by kohya_ss
    mark("epoch", "max_train_epochs", "max_train_steps")
    epochs, steps, epoch = _num(data.get("max_train_epochs")), _num(data.get("max_train_steps")), data.get("epoch")
    if steps > 0:
        t.arg("max_train_steps", "max_train_steps", int(steps))
        if epochs > 0:
            t.arg("max_train_epochs", "max_train_epochs", int(epochs), "sd-scripts lets max_train_epochs win over "
                                                                         "max_train_steps")
        elif "max_train_epochs" in data:
            t.arg("max_train_epochs", "max_train_epochs", data["max_train_epochs"])
        if epoch not in (None, ""):
            t.ignore("epoch", epoch, "max_train_steps is set, so kohya_ss does not compute steps from it")
    elif epochs > 0:
        t.arg("max_train_epochs", "max_train_epochs", int(epochs))
        if "max_train_steps" in data:
            t.arg("max_train_steps", "max_train_steps", data["max_train_steps"])
        if epoch not in (None, ""):
            t.ignore("epoch", epoch, "max_train_epochs is set and wins in sd-scripts")
    elif _num(epoch) > 0:
        for key in ("max_train_epochs", "max_train_steps"):
            if key in data:
                t.arg(key, key, data[key])
        t.set("epoch", epoch, {"max_train_epochs": int(_num(epoch))},
              "kohya_ss turns its epoch count into max_train_steps = images x repeats / batch x epochs (x2 with "
              "regularisation images), which ignores bucketing; sd-scripts has no `epoch` option. The same "
              "number of epochs is trained here")
    else:
        for key in ("max_train_epochs", "max_train_steps"):
            if key in data:
                t.arg(key, key, data[key])
        if "epoch" in data:
            t.ignore("epoch", epoch, "empty")

    # ---- warm-up: percent of the steps, or absolute steps
    mark("lr_warmup", "lr_warmup_steps")
    pct, abs_steps = _num(data.get("lr_warmup")), _num(data.get("lr_warmup_steps"))
    if abs_steps > 0:
        t.arg("lr_warmup_steps", "lr_warmup_steps", int(abs_steps))
        if "lr_warmup" in data:
            t.ignore("lr_warmup", data["lr_warmup"], "lr_warmup_steps wins in kohya_ss")
    elif pct:
        t.set("lr_warmup", data["lr_warmup"], {"lr_warmup_steps": pct / 100},
              "kohya_ss' warm-up is a percentage of the steps; a fraction below 1 means the same here")
        if "lr_warmup_steps" in data:
            t.ignore("lr_warmup_steps", data["lr_warmup_steps"], "0: the percentage applies")
    else:
        for key in ("lr_warmup", "lr_warmup_steps"):
            if key in data:
                t.set(key, data[key], {}, "no warm-up", changed=False)

    # ---- learning rates: kohya_ss picks UNet-only / TE-only training from them
    mark("learning_rate", "unet_lr", "text_encoder_lr")
    lr, unet_lr, te_lr = _num(data.get("learning_rate")), _num(data.get("unet_lr")), _num(data.get("text_encoder_lr"))
    if "learning_rate" in data:
        t.arg("learning_rate", "learning_rate", data["learning_rate"])
    if "unet_lr" in data:
        if unet_lr:
            t.arg("unet_lr", "unet_lr", data["unet_lr"])
        elif te_lr:
            t.set("unet_lr", data["unet_lr"], {"network_train_text_encoder_only": True},
                  "kohya_ss trains only the text encoder when the U-Net rate is 0")
        else:
            t.set("unet_lr", data["unet_lr"], {}, "0: learning_rate applies", changed=False)
    if "text_encoder_lr" in data:
        if te_lr:
            t.arg("text_encoder_lr", "text_encoder_lr", data["text_encoder_lr"])
        elif unet_lr:
            t.set("text_encoder_lr", data["text_encoder_lr"], {"network_train_unet_only": True},
                  "kohya_ss trains only the U-Net when the text-encoder rate is 0")
        else:
            t.set("text_encoder_lr", data["text_encoder_lr"], {}, "0: learning_rate applies", changed=False)
    if not (lr or unet_lr or te_lr):
        t.error("learning_rate", data.get("learning_rate"), "every learning rate is 0; kohya_ss refuses to start")

    # ---- noise: noise_offset_type picks which of the two kinds kohya_ss passes on
    mark("noise_offset_type", "noise_offset", "adaptive_noise_scale", "noise_offset_random_strength",
         "multires_noise_iterations", "multires_noise_discount")
    kind = str(data.get("noise_offset_type") or "Original")
    if "noise_offset_type" in data:
        t.set("noise_offset_type", kind, {}, "a kohya_ss selector: which noise options it passes on",
              changed=False)
    for key in ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"):
        if key in data:
            if kind == "Original":
                t.arg(key, key, data[key])
            else:
                t.ignore(key, data[key], f"noise_offset_type is {kind}: kohya_ss does not pass it")
    for key in ("multires_noise_iterations", "multires_noise_discount"):
        if key in data:
            if kind == "Multires":
                t.arg(key, key, data[key] if key != "multires_noise_discount" or
                      _num(data.get("multires_noise_iterations")) else "")
            else:
                t.ignore(key, data[key], f"noise_offset_type is {kind}: kohya_ss does not pass it")

    # ---- options kohya_ss accepts but never hands to sd-scripts' train_network.py
    for key in ("stop_text_encoder_training", "stop_text_encoder_training_pct"):
        if key in data:
            mark(key)
            why = ("kohya_ss does not pass it on for LoRA ('not yet supported'), and sd-scripts' "
                   "train_network.py has no such option: the text encoder trained for the whole run there, and "
                   "does here" if not _falsy(data[key]) else "0: off")
            t.ignore(key, data[key], why)
    if "no_token_padding" in data:
        mark("no_token_padding")
        t.ignore("no_token_padding", data["no_token_padding"], "a DreamBooth option; kohya_ss does not pass it "
                                                               "for LoRA")
    if "xformers" in data:
        mark("xformers")
        t.ignore("xformers", data["xformers"], "an attention kernel; PyTorch's SDPA gives the same result here")
    if "lr_scheduler_num_cycles" in data:
        mark("lr_scheduler_num_cycles")
        if data["lr_scheduler_num_cycles"] == "" and _num(epoch) > 0:
            t.set("lr_scheduler_num_cycles", "", {"lr_scheduler_num_cycles": int(_num(epoch))},
                  "kohya_ss passes the epoch count when it is empty")
        else:
            t.arg("lr_scheduler_num_cycles", "lr_scheduler_num_cycles", data["lr_scheduler_num_cycles"])
    if "caption_extension" in data and _falsy(data["caption_extension"]):
        mark("caption_extension")
        t.set("caption_extension", data["caption_extension"], {"caption_extension": ".caption"},
              "kohya_ss does not pass an empty extension, so sd-scripts read its default .caption files (caption "
              "files named .txt were not used); set caption_extension = \".txt\" to use them")
    if "seed" in data:
        mark("seed")
        if _falsy(data["seed"]):
            t.set("seed", data["seed"], {"seed": 42}, "unset: sd-scripts draws a random seed each run; here the "
                                                      "run is reproducible with 42")
        else:
            t.arg("seed", "seed", data["seed"])
    if "sample_prompts" in data:
        mark("sample_prompts")
        text = str(data["sample_prompts"] or "")
        if text.strip():
            extra["sample_prompts.txt"] = text if text.endswith("\n") else text + "\n"
            t.set("sample_prompts", text, {"sample_prompts": "sample_prompts.txt"},
                  "kohya_ss keeps the prompts as text and writes them to a file; written beside the result")
        else:
            t.arg("sample_prompts", "sample_prompts", "")
    for key in ("multi_gpu", "num_processes", "gpu_ids"):
        if key in data:
            mark(key)
            if key == "num_processes" and _num(data[key]) > 1 or key == "multi_gpu" and data[key] is True:
                t.set(key, data[key], {}, "several GPUs split each epoch's batches between them in sd-scripts; "
                                          "here one device trains every batch, so the step count is larger")
            else:
                t.ignore(key, data[key], "one process")
    if "optimizer_args" in data:
        mark("optimizer_args")
        args = str(data["optimizer_args"] or "").replace('"', "").split()
        t.arg("optimizer_args", "optimizer_args", args)
    if "lr_scheduler_args" in data:
        mark("lr_scheduler_args")
        t.arg("lr_scheduler_args", "lr_scheduler_args", str(data["lr_scheduler_args"] or "").replace('"', "")
              .split())

    _network(data, t)
    mark(*NETWORK_FIELDS)
    if str(data.get("LoRA_type")) == "LyCORIS/iA3" and "network_dropout" in data:
        mark("network_dropout")
        t.ignore("network_dropout", data["network_dropout"], "LyCORIS' (IA)3 module does not use neuron dropout: "
                                                             "sd-scripts passes it and it has no effect")

    if "additional_parameters" in data:
        mark("additional_parameters")
        _additional(str(data["additional_parameters"] or ""), t)

    for key, value in data.items():
        if key in done:
            continue
        if key in GUI_ONLY:
            t.ignore(key, value, GUI_ONLY[key])
        elif key in RENAMED:
            t.arg(key, RENAMED[key], value)
        else:
            t.arg(key, key, value)
    return extra


def _network(data: dict[str, Any], t: Translator) -> None:
    lt = str(data.get("LoRA_type") or "Standard")
    kind = LORA_TYPES.get(lt, "unknown")
    if kind is None or kind == "unknown":
        if not str(lt).startswith("Flux1"):
            t.unsupported("LoRA_type", lt, "this network type is not trained here (LoRA, LoCon, LoHa, LoKr, DyLoRA "
                                           "and (IA)3 are)" if kind is None else "an unknown kohya_ss LoRA_type",
                          blocking=True)
        for key in NETWORK_FIELDS - {"LoRA_type"}:
            if key in data:
                t.ignore(key, data[key], f"a network option of {lt}")
        return
    module, algo = kind
    args: list[str] = []
    used: dict[str, str] = {}

    def add(field: str, name: str | None = None, *, keep_zero: bool = False, keep_false: bool = True) -> None:
        value = data.get(field)
        if value is None or value == "" or (not keep_zero and not isinstance(value, bool) and _num(value) == 0
                                             and _num(value, 1.0) == 0):
            return
        if isinstance(value, bool):
            if not value and not keep_false:
                return
            value = str(value)
        args.append(f"{name or field}={value}")
        used[field] = f"network_args {name or field}"

    block_keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                  "block_alphas", "conv_block_dims", "conv_block_alphas")
    conv_dim = data.get("conv_dim", data.get("conv_dims"))
    conv_alpha = data.get("conv_alpha", data.get("conv_alphas"))
    if module == "networks.lora":
        if lt == "Kohya LoCon":
            args += [f"conv_dim={conv_dim}", f"conv_alpha={conv_alpha}"]
            used.update({"conv_dim": "network_args conv_dim", "conv_alpha": "network_args conv_alpha"})
        for key in block_keys + ("rank_dropout", "module_dropout"):
            add(key)
    elif module == "networks.dylora":
        if not _falsy(conv_dim):
            args.append(f"conv_dim={conv_dim}")
            used["conv_dim"] = "network_args conv_dim"
            if "conv_alpha" in data:
                t.ignore("conv_alpha", conv_alpha, "sd-scripts' networks.dylora scales its conv layers with "
                                                   "network_alpha too")
                used["conv_alpha"] = ""
        add("unit")
        for key in ("rank_dropout", "module_dropout"):
            if not _falsy(data.get(key)):
                t.unsupported(key, data[key], "networks.dylora has no dropout here")
                used[key] = ""
    else:
        args.append(f"algo={algo}")
        if data.get("LyCORIS_preset") not in (None, ""):
            add("LyCORIS_preset", "preset")
        args += [f"conv_dim={conv_dim if conv_dim is not None else 1}",
                 f"conv_alpha={conv_alpha if conv_alpha is not None else 1}"]
        used.update({"conv_dim": "network_args conv_dim", "conv_alpha": "network_args conv_alpha"})
        if algo == "dylora":
            add("unit", "block_size")
        if algo != "ia3" and algo != "dylora":
            for key in ("rank_dropout", "module_dropout"):
                add(key)
            tucker = any(data.get(k) is True for k in ("use_tucker", "use_cp"))
            if tucker:
                args.append("use_tucker=True")
            used.update({k: "network_args use_tucker" for k in ("use_tucker", "use_cp") if k in data})
            for key in ("use_scalar", "bypass_mode", "dora_wd", "train_norm"):
                if data.get(key) is True:
                    add(key)
        if algo == "lokr":
            add("factor", keep_zero=True)
            if data.get("decompose_both") is True:
                add("decompose_both")
    new = {"network_module": module, "network_args": args}
    t.set("LoRA_type", lt, new, f"kohya_ss' '{lt}' is {module}" + (f" with algo={algo}" if algo else ""))
    for key in sorted(NETWORK_FIELDS - {"LoRA_type"}):
        if key not in data:
            continue
        if key in used:
            if used[key]:
                t.report.add(key, "carried", data[key],
                             {"network_args": f"{used[key].split()[-1]}={data[key]}"})
        elif key.startswith("loraplus") and not _falsy(data[key]):
            t.arg(key, key, data[key])
        elif key in ("train_on_input", "rescaled", "constrain", "rank_dropout_scale") and not _falsy(data[key]):
            t.ignore(key, data[key], f"not read by {lt} training in sd-scripts / LyCORIS' kohya wrapper "
                                     f"(lycoris-lora 4.1.3)" if key == "train_on_input" else
                     f"an option of other LyCORIS algorithms; not used by {lt}")
        else:
            t.ignore(key, data[key], f"not used by {lt}" if not _falsy(data[key]) else "empty / off")


def _additional(text: str, t: Translator) -> None:
    """`additional_parameters`: extra sd-scripts flags kohya_ss appends to the command line."""
    if not text.strip():
        t.ignore("additional_parameters", text, "empty")
        return
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        t.error("additional_parameters", text, f"cannot split it into flags: {exc}")
        return
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            t.error("additional_parameters", tok, "expected --flag or --flag value")
            i += 1
            continue
        key, eq, value = tok[2:].partition("=")
        values = [value] if eq else []
        j = i + 1
        while not eq and j < len(tokens) and not tokens[j].startswith("--"):
            values.append(tokens[j])
            j += 1
        field = f"additional_parameters {tok if eq else ' '.join(tokens[i:j])}"
        if key in ("network_args", "optimizer_args", "lr_scheduler_args"):
            merged = list(t.values.get(key) or []) + values
            t.arg(field, key, merged)
        else:
            t.arg(field, key, True if not values else values[0] if len(values) == 1 else values)
        i = j if not eq else i + 1
