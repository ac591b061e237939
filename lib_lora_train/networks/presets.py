"""Which modules each preset adapts, as plain data.

Keys of a preset:
  unet_classes / te_classes: class names; every Linear / Conv2d inside a module of that class is adapted
                             (sd-scripts' rule; the class's own path and all its descendants).
  unet_names / te_names:     fnmatch patterns on module paths; a matching Linear / Conv2d itself is adapted.
                             Text-encoder paths are normalised to start with "text_model." first.
  conv:                      k×k convs (k > 1) inside the targets get conv_dim / conv_alpha; without it they are
                             skipped. Linears and 1×1 convs always get network_dim / network_alpha.
  on_input:                  (IA3) patterns of modules whose scale acts on the input channels.

"lierla" and "c3lier" are sd-scripts' networks.lora sets. The LyCORIS names follow lycoris-lora 4.1.3's
presets, fixed for diffusers / transformers models: "full" reaches time_embedding.linear_1/2 by name only (the
upstream preset also lists TimestepEmbedding as a class and then wraps them twice), "attn-only" targets
diffusers' `Attention` class (upstream names sd-scripts' CrossAttention / SelfAttention, which match nothing),
"ia3" matches path suffixes (upstream anchors its patterns at the start of the path, which matches nothing).
On SDXL, name patterns are matched against the sgm path of each layer (as LyCORIS sees sd-scripts' own SDXL
U-Net), so the conv_in / conv_out / time_embedding names of "full" / "unet-only" match nothing there, as upstream.
"""
from __future__ import annotations

SD_UNET_TRANSFORMER = ["Transformer2DModel"]
SD_UNET_CONV_BLOCKS = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
# transformers has named its CLIP attention class differently over time (eager / SDPA / flash variants)
CLIP_ATTENTION = ["CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"]
CLIP_MLP = ["CLIPMLP"]
CLIP_TARGETS = CLIP_ATTENTION + CLIP_MLP
UNET_EXTRA_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]

PRESETS: dict[str, dict] = {
    # sd-scripts networks.lora / networks.dylora
    "lierla": {"unet_classes": SD_UNET_TRANSFORMER, "te_classes": CLIP_TARGETS, "conv": False},
    "c3lier": {"unet_classes": SD_UNET_TRANSFORMER + SD_UNET_CONV_BLOCKS, "te_classes": CLIP_TARGETS,
               "conv": True},
    # LyCORIS presets (lycoris.kohya)
    "full": {"unet_classes": SD_UNET_TRANSFORMER + SD_UNET_CONV_BLOCKS, "unet_names": UNET_EXTRA_NAMES,
             "te_classes": CLIP_TARGETS, "conv": True},
    "full-lin": {"unet_classes": SD_UNET_TRANSFORMER + ["ResnetBlock2D"],
                 "unet_names": ["time_embedding.linear_1", "time_embedding.linear_2"],
                 "te_classes": CLIP_TARGETS, "conv": False},
    "attn-mlp": {"unet_classes": SD_UNET_TRANSFORMER, "te_classes": CLIP_TARGETS, "conv": False},
    "attn-only": {"unet_classes": ["Attention"], "te_classes": CLIP_ATTENTION, "conv": False},
    "unet-only": {"unet_classes": SD_UNET_TRANSFORMER + SD_UNET_CONV_BLOCKS, "unet_names": UNET_EXTRA_NAMES,
                  "conv": True},
    "unet-transformer-only": {"unet_classes": SD_UNET_TRANSFORMER, "conv": False},
    "unet-convblock-only": {"unet_classes": SD_UNET_CONV_BLOCKS, "unet_names": ["conv_in", "conv_out"],
                            "conv": True},
    "ia3": {"unet_names": ["*.to_k", "*.to_v", "*.ff.net.2"],
            "te_names": ["*.self_attn.k_proj", "*.self_attn.v_proj", "*.mlp.fc2"],
            "on_input": ["*.ff.net.2", "*.mlp.fc2"], "conv": False},
}
