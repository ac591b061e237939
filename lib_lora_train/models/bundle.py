"""The loaded model as the rest of the engine sees it: diffusers / transformers modules plus facts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    family: str = "sd1"                  # "sd1"; "sd2" and "sdxl" come later
    prediction_type: str = "epsilon"     # "epsilon" | "v_prediction"
    latent_scale: float = 0.18215
    base_model_version: str = "sd_v1"    # written as ss_base_model_version
    v2: bool = False
    name: str = "model"                  # file basename or a name given by the host
    path: str | None = None
    sha256: str | None = None            # full-file sha256 (ss_new_sd_model_hash)
    legacy_hash: str | None = None       # 8 hex of 64 KiB at 1 MiB (ss_sd_model_hash)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        """modelspec.architecture of a LoRA trained on this model."""
        if self.family == "sd1":
            return "stable-diffusion-v1/lora"
        if self.family == "sd2":
            return "stable-diffusion-v2-768-v/lora" if self.prediction_type == "v_prediction" \
                else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-xl-v1-base/lora"


@dataclass
class SDModel:
    unet: Any            # diffusers.UNet2DConditionModel
    vae: Any             # diffusers.AutoencoderKL
    text_encoder: Any    # transformers.CLIPTextModel
    tokenizer: Any       # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler with the checkpoint's schedule
    info: ModelInfo
