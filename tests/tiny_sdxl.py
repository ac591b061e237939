"""Tiny SDXL- and SD2-shaped diffusers U-Nets and transformers CLIP encoders built in code (random weights), and
the full-size SDXL / SD2 shapes on the meta device (for name and count checks without weights).

SDXL: three levels (DownBlock2D, then two CrossAttnDownBlock2D), linear proj_in / proj_out, transformer depth per
level scaled down from (1, 2, 10) to (1, 1, 2), text_time added conditioning; te1 = CLIPTextModel (CLIP-L),
te2 = CLIPTextModelWithProjection (bigG). SD2: SD1's block layout with linear projections and a 1024-wide context.
"""
from __future__ import annotations

import torch

TINY_SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96), layers_per_block=2, cross_attention_dim=64,
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), norm_num_groups=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32, upcast_attention=False,
)
TINY_TE1 = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu")
TINY_TE2 = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32)

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), norm_num_groups=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, upcast_attention=False,
)
SDXL_TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu")
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

TINY_SD2_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=48, attention_head_dim=(2, 4, 4, 4),
    norm_num_groups=32, use_linear_projection=True,
)
TINY_SD2_TE = dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=77, hidden_act="gelu")


def _unet(config: dict, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def tiny_sdxl_unet(seed: int = 0):
    return _unet(TINY_SDXL_UNET, seed)


def tiny_sd2_unet(seed: int = 0):
    return _unet(TINY_SD2_UNET, seed)


def _te(config: dict, seed: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**config)).eval()


def tiny_sdxl_text_encoders(seed: int = 0):
    return [_te(TINY_TE1, seed, False), _te(TINY_TE2, seed + 1, True)]


def tiny_sd2_text_encoder(seed: int = 0):
    return _te(TINY_SD2_TE, seed, False)


def sdxl_meta():
    """(unet, [te1, te2]) of full-size SDXL base on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return (UNet2DConditionModel(**SDXL_UNET),
                [CLIPTextModel(CLIPTextConfig(**SDXL_TE1)), CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2))])


def sdxl_unet_inputs(batch: int = 2, seed: int = 1):
    """(sample, timesteps, kwargs) for the tiny SDXL U-Net."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500][:batch])
    kwargs = dict(encoder_hidden_states=torch.randn(batch, 5, TINY_SDXL_UNET["cross_attention_dim"], generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=g),
                                     "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})
    return sample, timesteps, kwargs


def te_input_ids(batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49408, (batch, 7), generator=g)


# ---------------------------------------------------------------- single-file (ldm / sgm) checkpoints of the above

def _te_sd(te) -> dict:
    """text_model.* keys of a CLIP text model (transformers >= 5.6 may drop the text_model level)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in te.state_dict().items()}


def openclip_state_dict(te, extra_layers: int = 0, seed: int = 5) -> dict:
    """A transformers CLIP text model in OpenCLIP's layout (q/k/v fused into attn.in_proj_*), plus `extra_layers`
    random resblocks after the last one (SD 2.x checkpoints keep a last layer sd-scripts' model drops)."""
    sd = _te_sd(te)
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    n = te.config.num_hidden_layers
    leaves = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n):
        p = f"text_model.encoder.layers.{i}."
        q = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + "attn.in_proj_" + kind] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for hf, oc in leaves.items():
                out[q + f"{oc}.{kind}"] = sd[p + f"{hf}.{kind}"]
    g = torch.Generator().manual_seed(seed)
    for i in range(n, n + extra_layers):
        for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[k.replace("resblocks.0.", f"resblocks.{i}.")] = torch.randn(out[k].shape, generator=g,
                                                                           dtype=out[k].dtype)
    return out


def unet_ldm(unet) -> dict:
    from lib_lora_train.models.convert import unet_diffusers_to_ldm

    return {"model.diffusion_model." + k: v for k, v in unet_diffusers_to_ldm(unet.state_dict()).items()}


def sdxl_checkpoint(unet, tes) -> dict:
    """An SDXL-layout state dict: U-Net (sgm), CLIP-L at embedders.0, bigG (OpenCLIP) at embedders.1, a VAE stub."""
    sd = unet_ldm(unet)
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in _te_sd(tes[0]).items()})
    sd.update({"conditioner.embedders.1.model." + k: v for k, v in openclip_state_dict(tes[1]).items()})
    sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    return sd


def sd2_checkpoint(unet, te) -> dict:
    """An SD 2.x-layout state dict: U-Net (ldm), OpenCLIP ViT-H-style text model with one unused last layer."""
    sd = unet_ldm(unet)
    sd.update({"cond_stage_model.model." + k: v for k, v in openclip_state_dict(te, extra_layers=1).items()})
    sd["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    return sd


SD2_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), sample_size=96,
                use_linear_projection=True)
SD2_TE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, hidden_act="gelu")


def sd2_meta():
    """(unet, te) of full-size SD 2.x (768-v shapes; the text encoder as sd-scripts builds it: 23 layers)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD2_UNET), CLIPTextModel(CLIPTextConfig(**SD2_TE))
