"""Training really learns, every network type trains, and a saved file reproduces the trained network."""
import copy

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lora_train.config import config_from_dict
from lib_lora_train.models import encode_prompts, load_sd_model, write_tiny_checkpoint
from lib_lora_train.networks import apply_deltas, create_network, network_config_from_args, read_network_file
from lib_lora_train.training.data_setup import build_training_data, make_encoder
from lib_lora_train.training.evaluate import fixed_denoising_loss
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=3)
    return str(path)


def star_dataset(root, n=6):
    """A consistent concept: a bright square on a dark background, slightly moved each time."""
    folder = root / "5_zkz"
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), (20, 20, 40))
        x = 12 + 3 * i
        img.paste((240, 200, 30), (x, 16, x + 28, 44))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zkz")
    return root


def cfg_for(ckpt, tmp_path, **kw):
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), output_name="lrn", resolution="64", network_dim=8,
                  network_alpha=8, learning_rate=3e-3, max_train_epochs=4, train_batch_size=2, seed=0,
                  cache_latents=True, device="cpu", save_precision="float")
    values.update(kw)
    return config_from_dict(values)


def _latents_and_captions(cfg, model):
    data, _ = build_training_data(cfg)
    from lib_lora_train.dataset import load_item_tensor
    images = torch.stack([load_item_tensor(it) for it in data.items])
    return make_encoder(model, torch.device("cpu"))(images), [it.caption for it in data.items]


def test_training_lowers_the_denoising_loss_against_multiplier_zero(ckpt, tmp_path):
    star_dataset(tmp_path / "data")
    cfg = cfg_for(ckpt, tmp_path)
    result = train(cfg)
    model = load_sd_model(ckpt)
    latents, captions = _latents_and_captions(cfg, model)
    net = create_network(network_config_from_args("networks.lora", 8, 8, []), model.unet, model.text_encoder)
    net.load_tensors(read_network_file(result.outputs[-1])[0])
    net.apply_to()
    net.multiplier = 0.0
    before = fixed_denoising_loss(model, latents, captions, seed=1)
    net.multiplier = 1.0
    after = fixed_denoising_loss(model, latents, captions, seed=1)
    net.remove()
    assert after < 0.8 * before, (before, after)
    # the number is a property of the model, not of chance: the same call gives the same value
    assert fixed_denoising_loss(model, latents, captions, seed=1) == pytest.approx(before, rel=0, abs=0)


@pytest.mark.parametrize("module, args, key", [
    ("networks.lora", ["conv_dim=4", "conv_alpha=2"], "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"),
    ("networks.dylora", ["unit=2"], "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"),
    ("lycoris.kohya", ["algo=loha", "conv_dim=4", "conv_alpha=2"], "lora_unet_conv_in.hada_w1_a"),
    ("lycoris.kohya", ["algo=lokr", "factor=4"],
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1"),
    ("lycoris.kohya", ["algo=ia3"], "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.weight"),
    ("lycoris.kohya", ["algo=locon", "preset=attn-mlp"],
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2.lora_up.weight"),
])
def test_every_network_type_trains_and_its_file_reproduces_the_network(ckpt, tmp_path, module, args, key):
    star_dataset(tmp_path / "data", n=2)
    lr = 5e-3 if "algo=ia3" not in args else 5e-2
    cfg = cfg_for(ckpt, tmp_path, network_module=module, network_args=args, max_train_epochs=1,
                  learning_rate=lr, network_dim=4, network_alpha=2)
    result = train(cfg)
    tensors = load_file(result.outputs[-1])
    assert key in tensors, sorted(tensors)[:5]

    # outputs of the live network (rebuilt from the file) == base weights merged with the file's deltas. The
    # identity is exact arithmetic, so it is checked in float64, where rounding cannot reach the tolerance on any CPU.
    model = load_sd_model(ckpt, dtype=torch.float64)
    net = create_network(network_config_from_args(module, 4, 2, args), model.unet, model.text_encoder)
    net.load_tensors(read_network_file(result.outputs[-1])[0])
    net.to(torch.float64)
    merged_unet, merged_te = copy.deepcopy(model.unet), copy.deepcopy(model.text_encoder)
    file_tensors = read_network_file(result.outputs[-1])[0]
    apply_deltas(merged_unet, file_tensors, "unet")
    apply_deltas(merged_te, file_tensors, "text_encoder")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([500])
    with torch.no_grad():
        cond = encode_prompts(model, ["zkz"])
        base_out = model.unet(x, t, cond).sample
        net.apply_to()
        net.eval()
        cond_live = encode_prompts(model, ["zkz"])
        live = model.unet(x, t, cond_live).sample
        net.remove()
        model.text_encoder, model.unet = merged_te, merged_unet
        cond_merged = encode_prompts(model, ["zkz"])
        merged = merged_unet(x, t, cond_merged).sample
    assert not torch.allclose(live, base_out, atol=1e-6), "training changed nothing"
    scale = float(merged.abs().max())
    assert torch.allclose(live, merged, atol=1e-9 * max(scale, 1.0), rtol=0), float((live - merged).abs().max())
