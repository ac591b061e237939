"""The embedded demo base model: present, loadable offline by the engine's own loader, and actually pre-trained
(it denoises its shape world far better than the same architecture with random weights, and its text encoder
matters to it)."""
import json

import pytest
import torch
from safetensors import safe_open

from lib_lora_train.demo import pretrain, world
from lib_lora_train.demo.run import BASE_MODEL
from lib_lora_train.models import load_sd_model
from lib_lora_train.training.evaluate import fixed_denoising_loss


@pytest.fixture(scope="module")
def base():
    assert BASE_MODEL.exists(), "lib_lora_train/demo/tiny_base.safetensors is missing (python -m " \
                                "lib_lora_train.demo.pretrain rebuilds it)"
    return load_sd_model(str(BASE_MODEL), dtype=torch.float32)


def test_the_file_says_what_it_is_and_how_to_rebuild_it():
    with safe_open(str(BASE_MODEL), "pt") as fh:
        meta = fh.metadata()
    assert "demo.pretrain" in meta["rebuild"]
    cfg = json.loads(meta["pretrain_config"])
    assert set(cfg) == set(pretrain.PretrainConfig.__dataclass_fields__)
    assert meta["resolution"] == str(world.IMAGE_SIZE)


def _world_latents(model, n=6):
    images, captions = world.world_array(n, seed=123)         # not the training draw (seed 0)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = model.vae.encode(x).latent_dist.mean * model.info.latent_scale
    return lat, captions


def test_it_is_pretrained_not_random(base):
    lat, captions = _world_latents(base)
    trained = fixed_denoising_loss(base, lat, captions, seed=0)
    # the same architecture, random weights: what the demo had before this file existed
    cfg = pretrain.PretrainConfig()
    unet, _, _ = pretrain.build_modules(cfg)
    random_unet, base.unet = base.unet, unet.eval()
    try:
        untrained = fixed_denoising_loss(base, lat, captions, seed=0)
    finally:
        base.unet = random_unet
    assert trained < 0.5 * untrained, (trained, untrained)
    # and the captions matter: the right ones predict the noise better than swapped ones
    swapped = fixed_denoising_loss(base, lat, captions[1:] + captions[:1], seed=0)
    assert trained < swapped, (trained, swapped)


def test_its_autoencoder_reconstructs_the_world(base):
    images, _ = world.world_array(4, seed=7)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = base.vae.decode(base.vae.encode(x).latent_dist.mean).sample
    assert (rec - x).abs().mean().item() < 0.15
