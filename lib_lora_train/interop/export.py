"""A run (its run.json record, or a run TOML) -> sd-scripts' --config_file TOML and the accelerate command that
trains the same LoRA with sd-scripts, with a comment on every option sd-scripts lacks or names differently."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any

from .. import config as cfgmod
from ..errors import ConfigError
from .sdnames import SD_SCRIPTS_OPTIONS, SD_SCRIPTS_SAMPLERS, SDXL_ONLY_OPTIONS
from .tomlfmt import header, value as toml_value

# this engine's options sd-scripts does not have: why each is left out
OURS_ONLY = {
    "device": "sd-scripts picks the device through accelerate",
    "overwrite": "sd-scripts replaces files of the same name without asking",
    "latents_cache_dir": "sd-scripts writes its .npz latent caches beside the images",
    "validation_fallback": "sd-scripts measures a validation loss only with validation_split",
    "sdxl": "the script is sdxl_train_network.py",
}
# our value -> sd-scripts' value, where the names differ
SAMPLER_NAMES = {"dpm++_2m_karras": "dpmsolver++", "dpm++_2m": "dpmsolver++", "euler_a": "euler_a",
                 "euler": "euler", "ddim": "ddim"}
# written even at their default: sd-scripts' defaults differ from this engine's
ALWAYS = ("pretrained_model_name_or_path", "resolution", "caption_extension", "network_module", "network_dim",
          "network_alpha", "optimizer_type", "learning_rate", "output_dir", "output_name", "seed")


@dataclasses.dataclass
class Export:
    script: str                   # train_network.py | sdxl_train_network.py
    family: str
    options: dict[str, Any]       # sd-scripts option -> value
    comments: dict[str, str]      # sd-scripts option -> comment
    left_out: dict[str, str]      # our option -> why it has no sd-scripts counterpart
    source: str

    def toml(self) -> str:
        head = [f"sd-scripts --config_file for {self.script}, exported from {os.path.basename(self.source)} by "
                f"`python -m lib_lora_train export`.",
                f"Run: accelerate launch {self.script} --config_file <this file>"]
        for key, why in self.left_out.items():
            head.append(f"not in sd-scripts: {key} ({why})")
        lines = []
        for key, v in self.options.items():
            line = f"{key} = {toml_value(v)}"
            if key in self.comments:
                line += "  # " + self.comments[key]
            lines.append(line)
        return header(head) + "\n".join(lines) + "\n"

    def command(self, config_file: str | None = None, mixed_precision: str | None = None) -> str:
        launch = ["accelerate", "launch", "--num_cpu_threads_per_process", "1"]
        mp = mixed_precision or self.options.get("mixed_precision")
        if mp and mp != "no":
            launch += ["--mixed_precision", str(mp)]
        args = [self.script]
        if config_file:
            args += ["--config_file", config_file]
        else:
            for key, v in self.options.items():
                if isinstance(v, bool):
                    if v:
                        args.append(f"--{key}")
                elif isinstance(v, (list, tuple)):
                    if v:
                        args += [f"--{key}"] + [str(x) for x in v]
                else:
                    args += [f"--{key}", str(v)]
        return " ".join(shlex.quote(a) for a in launch + args)


def load_run(path: str) -> tuple[dict[str, Any], str | None]:
    """(our config dict, family or None) of a run.json record or a run TOML."""
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read the run record {path}: {exc}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
            raise ConfigError(f"{path} is not a run record (no 'config' object)")
        cfg = {k: v for k, v in rec["config"].items() if k in cfgmod._FIELDS}
        cfgmod.config_from_dict(cfg)     # the record's keys must still be valid
        family = (rec.get("model") or {}).get("family")
        return cfg, family
    cfg = cfgmod.load_config(path)
    return cfg.to_dict(), None


def _family(cfg: dict[str, Any], family: str | None) -> str:
    if family:
        return family
    if cfg.get("sdxl"):
        return "sdxl"
    if cfg.get("v2"):
        return "sd2"
    ckpt = cfg.get("pretrained_model_name_or_path")
    if ckpt and os.path.isfile(ckpt):
        try:
            from ..models.detect import detect_checkpoint
            return detect_checkpoint(ckpt)[0]
        except Exception:   # noqa: BLE001 - an unreadable file leaves the family to the flags
            pass
    return "sd1"


def export_run(path: str, family: str | None = None) -> Export:
    """`family`: the model family when the caller knows it (a host's loaded model); else the record's, the
    config's sdxl / v2 flags, or the checkpoint's keys."""
    cfg, rec_family = load_run(path)
    family = _family(cfg, family or rec_family)
    if family not in ("sd1", "sd2", "sdxl"):
        raise ConfigError(f"model family {family!r} has no sd-scripts LoRA script this exporter knows")
    script = "sdxl_train_network.py" if family == "sdxl" else "train_network.py"
    defaults = cfgmod.TrainConfig().to_dict()
    options: dict[str, Any] = {}
    comments: dict[str, str] = {}
    left_out: dict[str, str] = {}
    full = dict(defaults, **cfg)
    for key in cfgmod._FIELDS:
        v = full.get(key)
        if key in OURS_ONLY:
            if v not in (None, False, defaults.get(key)) or key == "sdxl" and v:
                left_out[key] = f"{v!r}: {OURS_ONLY[key]}"
            continue
        if v is None or (v == defaults.get(key) and key not in ALWAYS) or v == [] or v == "":
            continue
        if key == "max_token_length" and v == 75:
            continue            # 75 is the plain length; sd-scripts' parser accepts only 150 / 225 (None = 75)
        if key not in SD_SCRIPTS_OPTIONS:
            left_out[key] = f"{v!r}: not an sd-scripts option"
            continue
        if key in SDXL_ONLY_OPTIONS and family != "sdxl":
            left_out[key] = f"{v!r}: an SDXL-only option in sd-scripts"
            continue
        options[key] = v
    if family == "sd2":
        options["v2"] = True
    if options.get("network_alpha") is None:
        options["network_alpha"] = 1.0
        comments["network_alpha"] = "unset here means 1, as in sd-scripts"
    if options.get("seed") is None:
        options["seed"] = 42
        comments["seed"] = "unset here means 42; sd-scripts would draw a random seed"
    if not (cfg.get("unet_lr") or cfg.get("text_encoder_lr")) and "learning_rate" in options:
        comments["learning_rate"] = "written out: sd-scripts' default is 2e-6"
    if options.get("caption_extension") == ".txt" and "caption_extension" not in cfg:
        comments["caption_extension"] = "this engine's default; sd-scripts' is .caption"
    sampler = full.get("sample_sampler")
    if full.get("sample_prompts"):
        sd_name = SAMPLER_NAMES.get(str(sampler), str(sampler))
        if sd_name not in SD_SCRIPTS_SAMPLERS:
            sd_name = "dpmsolver++"
        options["sample_sampler"] = sd_name
        if sd_name != sampler:
            comments["sample_sampler"] = (f"here {sampler}; sd-scripts has no Karras-sigma variant, so its previews "
                                          f"differ slightly (the trained file does not)")
    else:
        options.pop("sample_sampler", None)
    if family == "sdxl" and full.get("clip_skip") not in (None, 1, 2):
        comments["clip_skip"] = "sd-scripts' SDXL script ignores clip_skip"
    if options.get("output_dir"):
        # sd-scripts writes NAME.safetensors without asking: beside this run's own files it would replace them
        options["output_dir"] = os.path.join(str(options["output_dir"]), "sd-scripts")
        comments["output_dir"] = "a subfolder, so sd-scripts never writes over this run's own files"
    for key in ("train_data_dir", "dataset_config"):
        if key in options and not os.path.isabs(str(options[key])):
            comments[key] = "relative to the folder sd-scripts is started in"
    return Export(script, family, options, comments, left_out, os.path.abspath(path))
