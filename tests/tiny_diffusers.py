"""Tiny SD1-shaped diffusers UNet and transformers CLIP text model, built in code with random weights.

The structure follows SD1 (4 levels, 2 layers per block, cross-attention on the first 3 levels, 1x1 conv
proj_in/proj_out) so module names are the real SD1 names; only the widths are small.
"""
from __future__ import annotations

import contextlib

import torch

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
    use_linear_projection=False,
)

TINY_TE_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)

# Full-size SD1.5 shapes (for name/count checks on the meta device).
SD15_UNET_CONFIG = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SD15_TE_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, hidden_act="quick_gelu")


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**TINY_TE_CONFIG))
    return te.eval()


def sd15_unet_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


def sd15_text_encoder_meta():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**SD15_TE_CONFIG))


def unet_inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    context = torch.randn(batch, 7, TINY_UNET_CONFIG["cross_attention_dim"], generator=g)
    return sample, timesteps, context


def te_inputs(batch: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49408, (batch, 9), generator=g)


@contextlib.contextmanager
def one_thread():
    """Tiny models run far faster on one thread than on two busy cores (OpenMP barriers)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_unet(unet, inputs):
    sample, timesteps, context = inputs
    with torch.no_grad():
        return unet(sample, timesteps, encoder_hidden_states=context).sample


def run_te(te, ids):
    with torch.no_grad():
        return te(ids)[0]
