"""SDXL networks on tiny models: save -> file -> read -> load_tensors, the plain reader agrees with the trained
forward, learning-rate groups (text_encoder_lr lists) and SDXL block-weight training (23 slots)."""
import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import (apply_deltas, create_network, network_config_from_args, read_network_file,
                                     save_network_file)
from tiny_sdxl import sdxl_unet_inputs, te_input_ids, tiny_sdxl_text_encoders, tiny_sdxl_unet


@pytest.fixture()
def models():
    return tiny_sdxl_unet(), tiny_sdxl_text_encoders()


def _randomise(net, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_round_trip_through_a_file(models, tmp_path):
    unet, tes = models
    cfg = network_config_from_args("networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=1"], family="sdxl")
    net = create_network(cfg, unet, tes)
    _randomise(net)
    tensors = net.save_tensors()
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in tensors
    path = tmp_path / "x.safetensors"
    save_network_file(str(path), tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    read, meta = read_network_file(str(path))
    fresh = create_network(cfg, unet, tes)
    fresh.load_tensors(read)
    for k, v in fresh.save_tensors().items():
        assert torch.equal(v, tensors[k]), k
    # the same file with diffusers-spelled U-Net names (as diffusers / some trainers write SDXL) reads the same
    from lib_lora_train.networks.names import sdxl_unet_paths
    back = {v.replace(".", "_"): k.replace(".", "_") for k, v in sdxl_unet_paths(unet).items()}
    diffusers_named = {}
    for key, t in read.items():
        module, _, rest = key.partition(".")
        sgm = module[len("lora_unet_"):] if module.startswith("lora_unet_") else None
        diffusers_named[("lora_unet_" + back[sgm] if sgm else module) + "." + rest] = t
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in diffusers_named)
    again = create_network(cfg, unet, tes)
    again.load_tensors(diffusers_named)
    assert all(torch.equal(v, tensors[k]) for k, v in again.save_tensors().items())
    # an SD1-named file does not fit (strict), and says why
    with pytest.raises(ConfigError, match="missing keys"):
        fresh.load_tensors({k.replace("lora_te1_", "lora_te_"): v for k, v in read.items()})


@torch.no_grad()
def test_file_applied_by_the_plain_reader_equals_the_hooked_network(models):
    """The second encoder and the U-Net with a random LoRA: hooked forward == weights merged from the file
    (float64 models, so the tolerance is float64 round-off)."""
    unet, tes = models
    unet, tes = unet.double(), [t.double() for t in tes]
    cfg = network_config_from_args("networks.lora", 4, 2, ["conv_dim=2"], family="sdxl")
    net = create_network(cfg, unet, tes).double()
    _randomise(net)
    ids = te_input_ids()
    sample, t, kw = sdxl_unet_inputs()
    kw = {"encoder_hidden_states": kw["encoder_hidden_states"].double(),
          "added_cond_kwargs": {k: v.double() for k, v in kw["added_cond_kwargs"].items()}}
    base_te2 = tes[1](ids).text_embeds
    net.apply_to()
    hooked_te2 = tes[1](ids).text_embeds
    hooked_unet = unet(sample.double(), t, **kw).sample
    net.remove()
    assert not torch.allclose(hooked_te2, base_te2)
    tensors = net.save_tensors()
    merged = apply_deltas(unet, tensors, "unet", family="sdxl")
    merged += apply_deltas(tes[0], tensors, "text_encoder", prefix="lora_te1")
    merged += apply_deltas(tes[1], tensors, "text_encoder", prefix="lora_te2")
    assert sorted(merged) == sorted(net.names)
    merged_te2 = tes[1](ids).text_embeds
    merged_unet = unet(sample.double(), t, **kw).sample
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(merged_te2, hooked_te2, **tol)
    torch.testing.assert_close(merged_unet, hooked_unet, **tol)


def test_text_encoder_lr_list_as_sd_scripts(models):
    unet, tes = models
    net = create_network(network_config_from_args("networks.lora", 4, 1, None, family="sdxl"), unet, tes)
    groups = {g["name"]: g for g in net.param_groups(1e-4, [5e-5], 1e-3)}
    assert groups["text_encoder"]["lr"] == 5e-5 and groups["unet"]["lr"] == 1e-4
    n_te = sum(p.numel() for n in net.names_for("text_encoder") for p in net.adapters[n].parameters())
    assert sum(p.numel() for p in groups["text_encoder"]["params"]) == n_te
    assert {g["name"]: g["lr"] for g in net.param_groups(1e-4, [5e-5, 5e-5], None)}["text_encoder"] == 5e-5
    assert {g["name"]: g["lr"] for g in net.param_groups(1e-4, [], 2e-4)}["text_encoder"] == 2e-4
    with pytest.raises(ConfigError, match="one learning rate"):
        net.param_groups(1e-4, [5e-5, 1e-5], None)


def test_sdxl_block_weight_training(models):
    unet, tes = models
    dims = ",".join(["0"] + ["2"] * 4 + ["0"] * 5 + ["3"] * 3 + ["2"] * 9 + ["0"])       # 23 slots
    args = [f"block_dims={dims}", "up_lr_weight=1,1,1,0.5,0.5,0.5,0,0,0", "mid_lr_weight=2,2,2"]
    cfg = network_config_from_args("networks.lora", 4, 1, args, family="sdxl")
    assert len(cfg.block_dims) == 23 and cfg.block_lr_weight[0] == 1.0 and cfg.block_lr_weight[22] == 1.0
    net = create_network(cfg, unet, tes)
    unet_names = net.names_for("unet")
    assert not any(n.startswith(("lora_unet_input_blocks_4_", "lora_unet_input_blocks_5_")) for n in unet_names)
    ranks = {n: net.adapters[n].lora_dim for n in unet_names}
    assert ranks["lora_unet_middle_block_1_proj_in"] == 3
    assert ranks["lora_unet_output_blocks_0_1_proj_in"] == 2
    assert not any(n.startswith("lora_unet_output_blocks_6_") for n in unet_names)       # lr weight 0
    lrs = {g["name"]: g["lr"] for g in net.param_groups(1.0, 0.5, None)}
    assert lrs["unet_block11"] == 2.0 and lrs["unet_block16"] == 0.5 and lrs["unet_block13"] == 1.0
    # lists in SD1's 25-slot layout are refused for SDXL with both layouts named
    with pytest.raises(ConfigError, match="expected 23"):
        network_config_from_args("networks.lora", 4, 1, ["block_dims=" + ",".join(["1"] * 25)], family="sdxl")
    sd1_cfg = network_config_from_args("networks.lora", 4, 1, ["block_dims=" + ",".join(["1"] * 25)])
    with pytest.raises(ConfigError, match="SDXL"):
        create_network(sd1_cfg, unet, tes)


@pytest.mark.parametrize("module,args", [
    ("lycoris.kohya", ["algo=loha"]), ("lycoris.kohya", ["algo=lokr", "factor=4"]),
    ("lycoris.kohya", ["algo=ia3"]), ("networks.dylora", ["unit=2"]), ("lycoris.kohya", ["algo=lora"])])
def test_other_network_types_on_sdxl_round_trip(models, module, args):
    unet, tes = models
    cfg = network_config_from_args(module, 4, 1, args, family="sdxl")
    net = create_network(cfg, unet, tes)
    assert any(n.startswith("lora_te2_") for n in net.names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in net.names)
    _randomise(net)
    tensors = net.save_tensors()
    fresh = create_network(cfg, unet, tes)
    fresh.load_tensors(tensors)
    for k, v in fresh.save_tensors().items():
        assert torch.equal(v, tensors[k]), k


def test_sd2_files_hold_proj_in_out_as_1x1_convs_as_sd_scripts():
    """sd-scripts trains SD 2.x on a U-Net with 1x1-conv proj_in / proj_out (its real SD 2.x file has lora_down
    [4, 320, 1, 1]); ours are Linear: the file gets sd-scripts' shapes and both shapes read back."""
    from tiny_sdxl import tiny_sd2_text_encoder, tiny_sd2_unet

    unet, te = tiny_sd2_unet(), tiny_sd2_text_encoder()
    cfg = network_config_from_args("networks.lora", 4, 1, None, family="sd2")
    net = create_network(cfg, unet, te, family="sd2")
    _randomise(net)
    tensors = net.save_tensors()
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tuple(tensors[f"{name}.lora_down.weight"].shape) == (4, 32, 1, 1)
    assert tuple(tensors[f"{name}.lora_up.weight"].shape) == (32, 4, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].dim() == 2
    flat = {k: (v.reshape(v.shape[:2]) if v.dim() == 4 else v) for k, v in tensors.items()}
    for given in (tensors, flat):
        fresh = create_network(cfg, unet, te, family="sd2")
        fresh.load_tensors(given)
        assert all(torch.equal(v, tensors[k]) for k, v in fresh.save_tensors().items())
