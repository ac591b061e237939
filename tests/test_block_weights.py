"""Block numbering (sd-scripts' 25 SD1 slots, LoRA Block Weight vectors) and block-weight training options."""
import math

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import create_network, network_config_from_args
from lib_lora_train.tools.blocks import (BLOCK_TABLE, LBW26, LBW_PRESETS, block_index, lbw_index, lr_weight_preset,
                                         parse_block_weights)
from tiny_diffusers import one_thread, tiny_text_encoder, tiny_unet


@pytest.fixture(scope="module")
def models():
    with one_thread():
        yield tiny_unet(), tiny_text_encoder()


# sd-scripts networks/lora.py get_block_index, worked out by hand for SD1 (trainers.md §4.1)
SLOTS = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1,
         "lora_unet_down_blocks_0_resnets_1_conv2": 2,
         "lora_unet_down_blocks_0_downsamplers_0_conv": 3,
         "lora_unet_down_blocks_1_resnets_0_time_emb_proj": 4,
         "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_q": 8,
         "lora_unet_down_blocks_2_downsamplers_0_conv": 9,
         "lora_unet_down_blocks_3_resnets_1_conv1": 11,
         "lora_unet_mid_block_resnets_1_conv2": 12,
         "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": 12,
         "lora_unet_up_blocks_0_resnets_0_conv1": 13,
         "lora_unet_up_blocks_0_upsamplers_0_conv": 15,
         "lora_unet_up_blocks_1_attentions_0_proj_out": 16,
         "lora_unet_up_blocks_2_resnets_2_conv_shortcut": 21,
         "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v": 24,
         "lora_unet_conv_in": -1, "lora_unet_time_embedding_linear_1": -1,
         "lora_te_text_model_encoder_layers_0_mlp_fc1": -1}


def test_block_numbering_matches_sd_scripts_and_lbw():
    for name, slot in SLOTS.items():
        assert block_index(name) == slot, name
        if name.startswith("lora_te"):
            assert lbw_index(name) == 0
        elif name == "lora_unet_conv_in":
            assert LBW26[lbw_index(name)] == "IN00"
        elif slot >= 0:
            assert lbw_index(name) == slot + 1
    assert [r.slot for r in BLOCK_TABLE] == list(range(25)) and [r.name for r in BLOCK_TABLE] == list(LBW26[1:])
    assert {r.slot for r in BLOCK_TABLE if r.lierla} == {1, 2, 4, 5, 7, 8, 12, *range(16, 25)}


def test_lbw_vectors_presets_and_their_errors():
    outall = parse_block_weights("outall")
    named = dict(zip(LBW26, outall))
    assert named["BASE"] == 1 and named["IN01"] == 0 and named["M00"] == 0 and named["OUT03"] == 1
    assert named["IN00"] == named["IN03"] == named["OUT00"] == 1     # unlisted in the 17-value form: 1
    assert len(LBW_PRESETS) >= 9 and all(len(v) == 17 for v in LBW_PRESETS.values())
    assert parse_block_weights("[" + ",".join(["0.5"] * 26) + "]") == (0.5,) * 26
    assert parse_block_weights(list(range(26))) == tuple(float(i) for i in range(26))
    assert parse_block_weights(None) is None and parse_block_weights("") is None
    for bad, pattern in (("1,2,3", "17 values"), (",".join(["1"] * 20), "SDXL"), ("ALLL", "preset"),
                         ("1,x", "preset")):
        with pytest.raises(ConfigError, match=pattern):
            parse_block_weights(bad)


def test_lr_weight_presets_follow_sd_scripts_formulas():
    s = [math.sin(math.pi * i / 11 / 2) for i in range(12)]
    assert lr_weight_preset("sine") == pytest.approx(s)
    assert lr_weight_preset("cosine") == pytest.approx(s[::-1])
    assert lr_weight_preset("linear") == pytest.approx([i / 11 for i in range(12)])
    assert lr_weight_preset("reverse_linear+0.5") == pytest.approx([i / 11 + 0.5 for i in reversed(range(12))])
    assert lr_weight_preset("zeros+.25") == [0.25] * 12
    with pytest.raises(ConfigError, match="unknown lr weight preset"):
        lr_weight_preset("cosin")


def _ranks(net):
    return {n: (int(a.lora_dim), float(a.alpha)) for n, a in net.adapters.items()}


def test_block_dims_and_alphas_set_ranks_per_block_and_rank_0_drops_a_block(models):
    dims = [0, 2, 3, 0, 5, 6, 0, 7, 8, 0, 0, 0, 4, 0, 0, 0, 0, 2, 3, 4, 5, 6, 7, 8, 2]
    alphas = [float(i) + 0.5 for i in range(25)]
    cfg = network_config_from_args("networks.lora", 8, 1, [f"block_dims={','.join(map(str, dims))}",
                                                           f"block_alphas={','.join(map(str, alphas))}"])
    net = create_network(cfg, *models)
    ranks = _ranks(net)
    lierla = create_network(network_config_from_args("networks.lora", 8, 1, []), *models).names
    for name in lierla:
        slot = block_index(name)
        if name.startswith("lora_te"):
            assert ranks[name] == (8, 1.0)
        elif dims[slot] == 0:
            assert name not in ranks, name
        else:
            assert ranks[name] == (dims[slot], alphas[slot]), name
    assert not any(block_index(n) == 16 for n in ranks) and any(block_index(n) == 17 for n in ranks)
    assert not any(n.endswith(("conv1", "conv2")) for n in ranks)           # LierLa: no 3x3 convs


def test_conv_block_dims_adapt_convs_per_block(models):
    conv = [0] + [3] * 11 + [2] + [1] * 12
    cfg = network_config_from_args("networks.lora", 4, 2, [f"conv_block_dims={','.join(map(str, conv))}",
                                                           "conv_alpha=0.5", "down_lr_weight=" + ",".join(
                                                               ["1"] * 4 + ["0"] * 8)])
    assert cfg.variant == "LoRA-C3Lier" and cfg.preset == "c3lier"
    ranks = _ranks(create_network(cfg, *models))
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == (3, 0.5)
    assert ranks["lora_unet_mid_block_resnets_0_conv2"] == (2, 0.5)
    assert ranks["lora_unet_up_blocks_0_upsamplers_0_conv"] == (1, 0.5)
    assert ranks["lora_unet_up_blocks_0_resnets_0_time_emb_proj"] == (4, 2.0)     # 1x1 / Linear: block_dims
    assert not any(4 <= block_index(n) <= 11 for n in ranks)                     # lr weight 0: no module


def test_lr_weights_make_one_group_per_block(models):
    cfg = network_config_from_args("networks.lora", 4, 4, ["down_lr_weight=0,0,0.5,1,1,1,1,1,2,2,2,2",
                                                           "mid_lr_weight=0.25", "up_lr_weight=cosine+0.25",
                                                           "block_lr_zero_threshold=0.4"])
    assert cfg.block_lr_weight[:3] == [0, 0, 0.5] and cfg.block_lr_weight[12] == 0.0    # 0.25 <= threshold
    up = [w + 0.25 for w in lr_weight_preset("cosine")]
    assert cfg.block_lr_weight[13:] == pytest.approx([w if w > 0.4 else 0.0 for w in up])
    net = create_network(cfg, *models)
    groups = net.param_groups(1e-3, 5e-4, 1e-2)
    names = [g["name"] for g in groups]
    assert names[0] == "text_encoder" and groups[0]["lr"] == 5e-4
    slots = sorted({block_index(n) for n in net.names_for("unet")})
    assert names[1:] == [f"unet_block{s}" for s in slots]
    assert 1 not in slots and 12 not in slots and 8 in slots          # weight 0: no module, no group
    for g in groups[1:]:
        slot = int(g["name"][len("unet_block"):])
        assert g["lr"] == pytest.approx(1e-3 * cfg.block_lr_weight[slot])
        expected = [p for n in net.names_for("unet") if block_index(n) == slot for p in net.adapters[n].parameters()]
        assert [id(p) for p in g["params"]] == [id(p) for p in expected]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    tensors = net.save_tensors()
    again = create_network(cfg, *models)
    again.load_tensors(tensors)
    assert all(torch.equal(again.save_tensors()[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("module, args, pattern", [
    ("networks.lora", ["block_dims=" + ",".join(["4"] * 24)], "24 values given, expected 25"),
    ("networks.lora", ["block_alphas=" + ",".join(["1"] * 26)], "26 values given, expected 25"),
    ("networks.lora", ["block_dims=" + ",".join(["a"] * 25)], "integers"),
    ("networks.lora", ["down_lr_weight=" + ",".join(["1"] * 13)], "13 values given, expected 12"),
    ("networks.lora", ["up_lr_weight=1,1"], "2 values given, expected 12"),
    ("networks.lora", ["mid_lr_weight=1,1"], "expected 1"),
    ("networks.lora", ["up_lr_weight=cosine+x"], "after '\\+' must be a number"),
    ("networks.lora", ["down_lr_weight=sinus"], "unknown lr weight preset 'sinus'"),
    ("networks.lora", ["conv_block_alphas=" + ",".join(["1"] * 25)], "needs conv_block_dims or conv_dim"),
    ("networks.lora", ["block_lr_zero_threshold=0.1"], "needs down_lr_weight"),
    ("networks.dylora", ["block_dims=" + ",".join(["4"] * 25)], "networks.lora only"),
    ("lycoris.kohya", ["down_lr_weight=cosine"], "networks.lora only"),
])
def test_bad_block_weight_options_give_clear_errors(module, args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        network_config_from_args(module, 4, 1, args)


def test_training_with_block_weights_saves_per_block_ranks_and_logs_block_groups(tmp_path):
    from PIL import Image
    from safetensors import safe_open

    from lib_lora_train.config import config_from_dict
    from lib_lora_train.events import STEP
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.training.loop import train

    ckpt = tmp_path / "tiny.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0)
    folder = tmp_path / "data" / "2_zkz"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zkz")
    dims = ",".join(["2"] * 12 + ["0"] + ["3"] * 12)
    args = [f"block_dims={dims}", "up_lr_weight=linear+0.5"]
    cfg = config_from_dict(dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(tmp_path / "data"),
                                output_dir=str(tmp_path / "out"), output_name="bw", resolution="64", network_dim=4,
                                network_alpha=2, network_args=args, learning_rate=1e-3, unet_lr=1e-3,
                                max_train_epochs=1, train_batch_size=2, seed=1, cache_latents=True, device="cpu"))
    events = []
    result = train(cfg, sink=events.append)
    with safe_open(result.outputs[-1], "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape[0] == 2
        assert f.get_tensor("lora_unet_up_blocks_3_attentions_2_proj_out.lora_down.weight").shape[0] == 3
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight").shape[0] == 4
        assert "block_dims" in f.metadata()["ss_network_args"]
    assert not any(k.startswith("lora_unet_mid_block") for k in keys)
    lrs = next(e.data["lr"] for e in events if e.kind == STEP)
    assert lrs["unet_block24"] == pytest.approx(1e-3 * 1.5)
    assert lrs["unet_block16"] == pytest.approx(1e-3 * (0.5 + 3 / 11))
    assert "unet_block12" not in lrs and "text_encoder" in lrs


def test_sdxl_lbw_vectors_and_auto_family():
    from lib_lora_train.tools.blocks import LBW26, parse_block_weights

    w12 = parse_block_weights("0,1,0.5,1,1,1,1,1,1,1,1,0", family="sdxl")
    assert len(w12) == 26 and w12[0] == 0 and w12[LBW26.index("IN05")] == 0.5 and w12[LBW26.index("OUT05")] == 0
    assert w12[LBW26.index("IN00")] == 1.0                         # unlisted blocks: 1, as svd_merge_lora
    assert parse_block_weights("INALL", family="sdxl")[LBW26.index("OUT00")] == 0
    assert parse_block_weights(",".join(["1"] * 20), family="auto")[LBW26.index("OUT08")] == 1
    assert parse_block_weights("0,1,0.5,1,1,1,1,1,1,1,1,0", family="auto") == w12
    assert parse_block_weights("ALL", family="auto") == parse_block_weights("ALL")
    with pytest.raises(ConfigError, match="SDXL LoRA takes 12 values"):
        parse_block_weights(",".join(["1"] * 17), family="sdxl")


def test_sdxl_block_table_matches_the_lbw_vectors():
    from lib_lora_train.tools.blocks import LBW12, LBW20, SDXL_BLOCK_TABLE

    assert tuple(r.name for r in SDXL_BLOCK_TABLE) == LBW20[1:]
    assert tuple(r.name for r in SDXL_BLOCK_TABLE if r.lierla) == LBW12[1:]
    assert not next(r for r in SDXL_BLOCK_TABLE if r.name == "IN00").c3lier         # conv_in: never adapted
