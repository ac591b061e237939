"""The benchmark's training settings: the plain loop, the built-in presets (at 64 px), and the ablations.

A setting maps (concept, folders) to the keys of a run (sd-scripts names, as a run TOML or the API takes them).
Presets are used as a user gets them (`preset = "concept"`): only the resolution is set to the tiny model's 64 px,
and the image folder's repeats are the preset's own suggestion, so the step budget is the preset's
(epochs x repeats x images / batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lib_lora_train import presets as preset_lib

COMMON = {"resolution": "64", "device": "cpu", "cache_latents": True, "seed": 0, "save_precision": "fp16",
          "overwrite": True, "save_every_n_epochs": None, "validation_fallback": False}


@dataclass(frozen=True)
class Setting:
    name: str
    about: str
    preset: str | None = None            # a built-in preset's name; None: the keys below only
    keys: dict[str, Any] = field(default_factory=dict)
    repeats: int | None = None           # None: the preset's suggestion (1 without a preset)
    reg: bool = False                    # prior preservation: world images of the class in reg_data_dir
    ablation_of: str | None = None

    def folder_repeats(self) -> int:
        if self.repeats is not None:
            return self.repeats
        if self.preset:
            return preset_lib.builtin()[self.preset].repeats or 1
        return 1

    def run_values(self) -> dict[str, Any]:
        out = dict(COMMON)
        if self.preset:
            out["preset"] = self.preset
        out.update(self.keys)
        return out



PLAIN = {"network_module": "networks.lora", "network_dim": 8, "network_alpha": 8, "learning_rate": 5e-4,
         "optimizer_type": "AdamW", "lr_scheduler": "constant", "train_batch_size": 4, "max_train_steps": 400}

_settings = [
    Setting("base", "the base model alone (no LoRA)"),
    Setting("plain", "minimal LoRA loop: dim 8, alpha 8, AdamW lr 5e-4 constant, batch 4, 400 steps, "
                     "U-Net and text encoder", keys=PLAIN),
    Setting("concept", "preset \"concept\" (sd1 values, 64 px)", preset="concept"),
    Setting("character", "preset \"character\" (sd1 values, 64 px)", preset="character"),
    Setting("style", "preset \"style\" (sd1 values, 64 px)", preset="style"),
]
SETTINGS: dict[str, Setting] = {s.name: s for s in _settings}


def register(s: Setting) -> Setting:
    SETTINGS[s.name] = s
    return s


# --- exploration candidates (kept: the numbers in results_quality.md name them)
PRODIGY = {"optimizer_type": "Prodigy", "learning_rate": 1.0, "unet_lr": 1.0, "text_encoder_lr": 1.0,
           "optimizer_args": ["d_coef=1.0", "use_bias_correction=True", "safeguard_warmup=True",
                              "weight_decay=0.01", "decouple=True"],
           "lr_scheduler": "cosine"}
for _s in (
    Setting("x-prodigy-unet", "concept preset + Prodigy, U-Net only", preset="concept",
            keys={**PRODIGY, "network_train_unet_only": True}),
    Setting("x-prodigy-unet-reg", "concept preset + Prodigy, U-Net only, world reg images", preset="concept",
            keys={**PRODIGY, "network_train_unet_only": True}, reg=True),
    Setting("x-adamw-unet-hi", "concept preset + AdamW lr 1e-3, U-Net only", preset="concept",
            keys={"learning_rate": 1e-3, "unet_lr": 1e-3, "network_train_unet_only": True}),
    Setting("x-adamw-unet-hi-reg", "concept preset + AdamW lr 1e-3, U-Net only, reg", preset="concept",
            keys={"learning_rate": 1e-3, "unet_lr": 1e-3, "network_train_unet_only": True}, reg=True),
):
    register(_s)
