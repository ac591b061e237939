"""The loaded model as the rest of the engine sees it: diffusers / transformers modules plus facts.

text_encoder is CLIP ViT-L for SD 1.x and SDXL (its first encoder), the converted OpenCLIP ViT-H for SD 2.x.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def base_model_version(family: str, v_pred: bool = False) -> str:
    """ss_base_model_version as sd-scripts writes it: sd_v1(_v), sd_v2(_v), and sdxl_base_v1-0 for every SDXL
    model (sd-scripts adds no "_v" for v-prediction SDXL)."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return {"sd1": "sd_v1", "sd2": "sd_v2"}[family] + ("_v" if v_pred else "")


@dataclass
class ModelInfo:
    family: str = "sd1"                  # "sd1" | "sd2" | "sdxl"
    prediction_type: str = "epsilon"     # "epsilon" | "v_prediction"
    latent_scale: float = 0.18215        # 0.13025 for SDXL
    base_model_version: str = "sd_v1"    # written as ss_base_model_version: sd_v1(_v), sd_v2(_v), sdxl_base_v1-0
    v2: bool = False                     # True for SD 2.x (ss_v2)
    native_resolution: int = 512         # 768 for SD 2.x v-prediction, 1024 for SDXL
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

    @property
    def implementation(self) -> str:
        """modelspec.implementation of a LoRA trained on this model (as sd-scripts writes it)."""
        return "https://github.com/Stability-AI/generative-models" if self.family == "sdxl" else "diffusers"


@dataclass
class SDModel:
    unet: Any            # diffusers.UNet2DConditionModel
    vae: Any             # diffusers.AutoencoderKL
    text_encoder: Any    # transformers.CLIPTextModel
    tokenizer: Any       # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler with the checkpoint's schedule
    info: ModelInfo
    text_encoder_2: Any = None   # SDXL: transformers.CLIPTextModelWithProjection (OpenCLIP bigG)
    tokenizer_2: Any = None      # SDXL: the same vocabulary, padded with "!" (id 0)

    @property
    def text_encoders(self) -> list:
        """[text_encoder] or, for SDXL, [text_encoder, text_encoder_2] (the order of lora_te1_ / lora_te2_)."""
        return [self.text_encoder] if self.text_encoder_2 is None else [self.text_encoder, self.text_encoder_2]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] if self.tokenizer_2 is None else [self.tokenizer, self.tokenizer_2]
