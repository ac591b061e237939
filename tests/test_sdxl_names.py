"""SDXL and SD 2.x LoRA names and module sets, against lists derived from the architecture (sd-scripts' rules).

The expected SDXL names are written out from the sgm layout (input_blocks / middle_block / output_blocks) here,
independently of the diffusers -> sgm path mapping the code uses.
"""
import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import create_network, find_targets, network_config_from_args
from lib_lora_train.networks.targets import model_index
from lib_lora_train.tools.blocks import block_index, lbw_index
from tiny_sdxl import (TINY_SDXL_UNET, sdxl_meta, tiny_sd2_text_encoder, tiny_sd2_unet, tiny_sdxl_text_encoders,
                       tiny_sdxl_unet)

BLOCK_LINEARS = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                 "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
TE_LINEARS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def sgm_transformers(depths):
    """{sgm transformer prefix: depth} of an SDXL U-Net whose levels 1 and 2 have the given transformer depths."""
    d1, d2 = depths
    out = {f"input_blocks_{i}_1": d1 for i in (4, 5)}
    out.update({f"input_blocks_{i}_1": d2 for i in (7, 8)})
    out["middle_block_1"] = d2
    out.update({f"output_blocks_{i}_1": d2 for i in (0, 1, 2)})
    out.update({f"output_blocks_{i}_1": d1 for i in (3, 4, 5)})
    return out


def expected_lierla_unet(depths):
    names = set()
    for prefix, depth in sgm_transformers(depths).items():
        names |= {f"lora_unet_{prefix}_proj_in", f"lora_unet_{prefix}_proj_out"}
        names |= {f"lora_unet_{prefix}_transformer_blocks_{b}_{leaf}" for b in range(depth) for leaf in BLOCK_LINEARS}
    return names


def expected_c3lier_extra():
    """sd-scripts' C3Lier additions on SDXL: every ResnetBlock2D's in_layers_2 / emb_layers_1 / out_layers_3
    (+ skip_connection where the channels change), the Downsample2D op and Upsample2D conv."""
    names = set()
    resnets = [f"input_blocks_{i}_0" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block_0", "middle_block_2"]
    resnets += [f"output_blocks_{i}_0" for i in range(9)]
    for r in resnets:
        names |= {f"lora_unet_{r}_in_layers_2", f"lora_unet_{r}_emb_layers_1", f"lora_unet_{r}_out_layers_3"}
    skips = ["input_blocks_4_0", "input_blocks_7_0"] + [f"output_blocks_{i}_0" for i in range(9)]
    names |= {f"lora_unet_{r}_skip_connection" for r in skips}
    names |= {"lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op", "lora_unet_output_blocks_2_2_conv",
              "lora_unet_output_blocks_5_2_conv"}
    return names


def expected_te(prefix, layers):
    return {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in TE_LINEARS}


def targets(unet, tes, preset):
    te1 = find_targets(tes[0], "text_encoder", preset, family="sdxl", prefix="lora_te1")
    te2 = find_targets(tes[1], "text_encoder", preset, family="sdxl", prefix="lora_te2")
    return te1, te2, find_targets(unet, "unet", preset, family="sdxl")


@pytest.fixture(scope="module")
def full_sdxl():
    return sdxl_meta()


@pytest.fixture(scope="module")
def tiny():
    return tiny_sdxl_unet(), tiny_sdxl_text_encoders()


def test_full_size_sdxl_lierla_is_sd_scripts_set(full_sdxl):
    unet, tes = full_sdxl
    te1, te2, un = targets(unet, tes, "lierla")
    assert (len(te1), len(te2), len(un)) == (72, 192, 722)
    assert {t.name for t in te1} == expected_te("lora_te1", 12)
    assert {t.name for t in te2} == expected_te("lora_te2", 32)
    assert {t.name for t in un} == expected_lierla_unet((2, 10))
    assert not any(t.kxk for t in un)


def test_full_size_sdxl_c3lier_adds_the_resnet_and_sampler_convs(full_sdxl):
    unet, tes = full_sdxl
    lierla = {t.name for t in find_targets(unet, "unet", "lierla", family="sdxl")}
    c3 = find_targets(unet, "unet", "c3lier", family="sdxl")
    extra = {t.name for t in c3} - lierla
    assert extra == expected_c3lier_extra()
    assert len(c3) == 722 + 66
    kxk = {t.name for t in c3 if t.kxk}
    # 3x3: in_layers_2, out_layers_3, op, upsampler conv; emb_layers_1 is a Linear, skip_connection a 1x1 conv
    assert "lora_unet_input_blocks_1_0_in_layers_2" in kxk and "lora_unet_input_blocks_3_0_op" in kxk
    assert "lora_unet_output_blocks_2_2_conv" in kxk
    assert "lora_unet_input_blocks_4_0_skip_connection" not in kxk
    assert "lora_unet_input_blocks_1_0_emb_layers_1" not in kxk


def test_tiny_sdxl_names_scale_with_the_model(tiny):
    unet, tes = tiny
    te1, te2, un = targets(unet, tes, "lierla")
    assert {t.name for t in te1} == expected_te("lora_te1", 2)
    assert {t.name for t in te2} == expected_te("lora_te2", 3)
    assert {t.name for t in un} == expected_lierla_unet((1, 2))
    c3 = {t.name for t in find_targets(unet, "unet", "c3lier", family="sdxl")}
    assert c3 - {t.name for t in un} == expected_c3lier_extra()


def test_create_network_sdxl_prefixes_and_parts(tiny):
    unet, tes = tiny
    net = create_network(network_config_from_args("networks.lora", 4, 1, None), unet, tes)
    assert net.family == "sdxl"
    assert len(net.names_for("text_encoder")) == 12 + 18
    assert {n.split("_")[1] for n in net.names} == {"te1", "te2", "unet"}
    encoders = {net._targets[n].encoder for n in net.names_for("text_encoder")}
    assert encoders == {1, 2}


def test_family_mismatch_is_refused(tiny):
    unet, tes = tiny
    cfg = network_config_from_args("networks.lora", 4, 1, None)
    with pytest.raises(ConfigError, match="SDXL U-Net"):
        create_network(cfg, unet, tes, family="sd1")
    with pytest.raises(ConfigError, match="both text encoders"):
        create_network(cfg, unet, tes[0], family="sdxl")
    with pytest.raises(ConfigError, match="one text encoder"):
        create_network(cfg, tiny_sd2_unet(), tes, family="sd2")


def test_lycoris_full_preset_on_sdxl_matches_sd_scripts_names(tiny):
    """LyCORIS' full preset names conv_in / conv_out / time_embedding.*: paths sd-scripts' SDXL U-Net (sgm) does
    not have, so on SDXL it adapts the class targets only (conv_in etc. are never named)."""
    unet, tes = tiny
    full = {t.name for t in find_targets(unet, "unet", "full", family="sdxl")}
    c3 = {t.name for t in find_targets(unet, "unet", "c3lier", family="sdxl")}
    assert full == c3
    assert not any("time_embed" in n or "input_blocks_0_0" in n or n.startswith("lora_unet_out_") for n in full)
    ia3 = {t.name for t in find_targets(unet, "unet", "ia3", family="sdxl")}
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in ia3


def test_module_index_reads_every_sdxl_layer_back(tiny):
    unet, tes = tiny
    index = model_index(unet, tes, "sdxl")
    assert index["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] is \
        unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert index["lora_unet_output_blocks_2_2_conv"] is unet.up_blocks[0].upsamplers[0].conv
    assert index["lora_unet_label_emb_0_0"] is unet.add_embedding.linear_1
    te2_layer = tes[1].text_model.encoder.layers[2].mlp.fc1 if hasattr(tes[1], "text_model") else None
    if te2_layer is not None:
        assert index["lora_te2_text_model_encoder_layers_2_mlp_fc1"] is te2_layer
    net = create_network(network_config_from_args("networks.lora", 4, 1, ["conv_dim=2"]), unet, tes)
    assert set(net.names) <= set(index)


def test_sdxl_block_slots():
    # sd-scripts' 23 SDXL training slots and the svd_merge_lora LBW index
    assert block_index("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == 5
    assert block_index("lora_unet_input_blocks_3_0_op") == 4
    assert block_index("lora_unet_middle_block_1_proj_in") == 11
    assert block_index("lora_unet_middle_block_2_in_layers_2") == 12
    assert block_index("lora_unet_output_blocks_0_1_proj_out") == 13
    assert block_index("lora_unet_output_blocks_8_0_skip_connection") == 21
    assert block_index("lora_te2_text_model_encoder_layers_0_mlp_fc1") == -1
    assert lbw_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") == 0
    assert lbw_index("lora_unet_input_blocks_4_1_proj_in") == 5          # IN04
    assert lbw_index("lora_unet_middle_block_2_out_layers_3") == 13      # M00
    assert lbw_index("lora_unet_output_blocks_5_1_proj_in") == 19        # OUT05
    # SD 1.x names keep their slots
    assert block_index("lora_unet_down_blocks_1_attentions_0_proj_in") == 4


def test_sd2_names_are_diffusers_names_with_linear_projections():
    unet, te = tiny_sd2_unet(), tiny_sd2_text_encoder()
    net = create_network(network_config_from_args("networks.lora", 4, 1, None), unet, te, family="sd2")
    assert net.family == "sd2"
    names = set(net.names)
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in names
    assert isinstance(net._targets["lora_unet_down_blocks_0_attentions_0_proj_in"].module, torch.nn.Linear)
    assert len(net.names_for("text_encoder")) == 12
    assert len(net.names_for("unet")) == 16 * 12


def test_sdxl_unet_config_is_what_the_names_assume():
    assert TINY_SDXL_UNET["addition_embed_type"] == "text_time"


DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_full_size_sdxl_names_equal_sd_scripts_real_output(full_sdxl):
    """tests/data/sdscripts_sdxl_lierla_modules.txt: the module names of a LoRA written by sd-scripts 48d368fa's
    sdxl_train_network.py (networks.lora, dim 4) on a full-size SDXL checkpoint with random weights."""
    unet, tes = full_sdxl
    te1, te2, un = targets(unet, tes, "lierla")
    ours = {t.name for t in te1 + te2 + un}
    reference = set((DATA / "sdscripts_sdxl_lierla_modules.txt").read_text().split())
    assert len(reference) == 986
    assert ours == reference



def test_full_size_sd2_module_sets():
    """SD 2.x: sd-scripts' SD1 rules on SD2's shapes: TE 23 layers x 6 = 138, U-Net 16 transformers x 12 = 192
    (Linear proj_in / proj_out), C3Lier adds the same convs as SD1."""
    from tiny_sdxl import sd2_meta

    unet, te = sd2_meta()
    te_t = find_targets(te, "text_encoder", "lierla", family="sd2")
    un = find_targets(unet, "unet", "lierla", family="sd2")
    assert (len(te_t), len(un)) == (138, 192)
    assert {t.name for t in te_t} == expected_te("lora_te", 23)
    proj_in = next(t for t in un if t.name == "lora_unet_down_blocks_0_attentions_0_proj_in")
    assert isinstance(proj_in.module, torch.nn.Linear)
    c3 = find_targets(unet, "unet", "c3lier", family="sd2")
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in {t.name for t in c3}
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in {t.name for t in c3}


def test_full_size_sdxl_locon_names_equal_sd_scripts_real_output(full_sdxl):
    """tests/data/sdscripts_sdxl_c3lier_modules.txt: sd-scripts 48d368fa, networks.lora with conv_dim=4 on SDXL."""
    unet, tes = full_sdxl
    te1, te2, un = targets(unet, tes, "c3lier")
    reference = set((DATA / "sdscripts_sdxl_c3lier_modules.txt").read_text().split())
    assert len(reference) == 72 + 192 + 788
    assert {t.name for t in te1 + te2 + un} == reference


def test_full_size_sd2_names_equal_sd_scripts_real_output():
    """tests/data/sdscripts_sd2v_lierla_modules.txt: sd-scripts 48d368fa's train_network.py --v2
    --v_parameterization (networks.lora) on a full-size SD 2.x 768-v checkpoint with random weights."""
    from tiny_sdxl import sd2_meta

    unet, te = sd2_meta()
    ours = {t.name for t in find_targets(te, "text_encoder", "lierla", family="sd2")}
    ours |= {t.name for t in find_targets(unet, "unet", "lierla", family="sd2")}
    reference = set((DATA / "sdscripts_sd2v_lierla_modules.txt").read_text().split())
    assert len(reference) == 138 + 192
    assert ours == reference
