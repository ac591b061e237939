"""The LoRA tools on SDXL and SD 2.x checkpoints (tiny, built in code): merge into a checkpoint equals applying
the LoRA to the models (float64), extract recovers a known low-rank update, checkpoint targets equal the
network's, LBW with SDXL's vectors, inspect, and the refusal of a LoRA of another family."""
import pytest
import torch

from lib_lora_train.errors import ModelError
from lib_lora_train.networks import (apply_deltas, create_network, module_delta, network_config_from_args,
                                     save_network_file, split_by_module)
from lib_lora_train.tools.checkpoint import CheckpointSource, family_targets
from lib_lora_train.tools.extract import extract_lora
from lib_lora_train.tools.inspect import inspect_lora
from lib_lora_train.tools.merge import LoraInput, merge_into_checkpoint, merge_into_state_dict
from lib_lora_train.tools.merge_lora import merge_loras
from tiny_sdxl import (sd2_checkpoint, sdxl_checkpoint, tiny_sd2_text_encoder, tiny_sd2_unet,
                       tiny_sdxl_text_encoders, tiny_sdxl_unet)


def _random_lora(unet, tes, family, seed=7, args=("conv_dim=2", "conv_alpha=1")):
    net = create_network(network_config_from_args("networks.lora", 4, 2, list(args), family=family), unet, tes,
                         family=family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.save_tensors()


def _models(family):
    if family == "sdxl":
        unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
        return unet.double(), [t.double() for t in tes]
    return tiny_sd2_unet().double(), tiny_sd2_text_encoder().double()


def _checkpoint(family, unet, tes):
    return sdxl_checkpoint(unet, tes) if family == "sdxl" else sd2_checkpoint(unet, tes)


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_merge_into_checkpoint_equals_applying_the_lora(family):
    unet, tes = _models(family)
    tensors = _random_lora(unet, tes, family)
    sd = _checkpoint(family, unet, tes)                    # float64 base
    before = {k: v.clone() for k, v in sd.items()}
    report = merge_into_state_dict(sd, [LoraInput(tensors, ratio=0.7)], merge_dtype=torch.float64, strict=True)
    assert report.merged and not report.skipped
    # reference: the plain reader merges the file into the diffusers / transformers modules, then the same layout
    if family == "sdxl":
        apply_deltas(unet, tensors, "unet", multiplier=0.7, family="sdxl")
        apply_deltas(tes[0], tensors, "text_encoder", multiplier=0.7, prefix="lora_te1")
        apply_deltas(tes[1], tensors, "text_encoder", multiplier=0.7, prefix="lora_te2")
    else:
        apply_deltas(unet, tensors, "unet", multiplier=0.7)
        apply_deltas(tes, tensors, "text_encoder", multiplier=0.7)
    expected = _checkpoint(family, unet, tes)
    changed = 0
    for k, v in sd.items():
        if k not in expected:      # SD 2.x's unused last text-encoder layer is random in each build
            continue
        torch.testing.assert_close(v, expected[k], rtol=1e-12, atol=1e-12, msg=k)
        changed += not torch.equal(v, before[k])
    assert changed == len(set(report.changed_keys))
    qkv = [k for k in report.changed_keys if k.endswith("attn.in_proj_weight")]
    assert qkv          # q / k / v landed in the fused OpenCLIP weight


def test_sdxl_lora_is_refused_by_an_sd1_checkpoint_and_vice_versa(tmp_path):
    from lib_lora_train.models.tiny import tiny_sd1_state_dict

    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    path = tmp_path / "xl.safetensors"
    save_network_file(str(path), _random_lora(unet, tes, "sdxl"), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ModelError, match=r"SDXL LoRA but .* SD 1\.x checkpoint"):
        merge_into_state_dict(tiny_sd1_state_dict(), [LoraInput(str(path))])
    sd1_lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(ModelError, match=r"SD 1\.x LoRA but .* SDXL checkpoint"):
        merge_into_state_dict(sdxl_checkpoint(unet, tes), [LoraInput(sd1_lora)])
    base = tmp_path / "base.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tiny_sd1_state_dict().items()}, str(base))
    with pytest.raises(ModelError, match=r"SDXL LoRA but base\.safetensors is an SD 1\.x checkpoint"):
        merge_into_checkpoint(str(base), [str(path)], str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ModelError, match="different model families"):
        merge_loras([str(path), LoraInput(sd1_lora)], new_rank=2)


def test_merged_sdxl_checkpoint_file_metadata(tmp_path):
    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    from safetensors.torch import save_file
    base = tmp_path / "xl_base.safetensors"
    save_file({k: v.contiguous() for k, v in sdxl_checkpoint(unet, tes).items()}, str(base))
    lora = tmp_path / "l.safetensors"
    save_network_file(str(lora), _random_lora(unet, tes, "sdxl"), {"ss_base_model_version": "sdxl_base_v1-0"})
    res = merge_into_checkpoint(str(base), [str(lora)], str(tmp_path / "merged.safetensors"), compute_hashes=False)
    assert res.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert res.metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert res.metadata["modelspec.resolution"] == "1024x1024"


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_checkpoint_targets_are_the_networks(family):
    """The checkpoint-side rule (tools) picks exactly the layers the class rule (networks) adapts."""
    unet, tes = _models(family)
    sd = _checkpoint(family, unet, tes)
    with CheckpointSource(sd) as src:
        for preset, args in (("lierla", ()), ("c3lier", ("conv_dim=2",))):
            got = {t.name for t in family_targets(src, family, preset)}
            net = create_network(network_config_from_args("networks.lora", 4, 1, list(args), family=family), unet,
                                 tes, family=family)
            assert got == set(net.names), preset


def test_extract_recovers_a_known_low_rank_update_on_sdxl():
    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    org = sdxl_checkpoint(unet, tes)
    tuned = {k: v.clone() for k, v in org.items()}
    g = torch.Generator().manual_seed(11)
    keys = {"lora_te2_text_model_encoder_layers_1_self_attn_k_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight", slice(32, 64)),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q":
            ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight", slice(None)),
            "lora_unet_output_blocks_2_2_conv": ("model.diffusion_model.output_blocks.2.2.conv.weight", slice(None))}
    known = {}
    for name, (key, rows) in keys.items():
        w = tuned[key][rows]
        a, b = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w[0].numel(), generator=g)
        known[name] = (a @ b).reshape(w.shape) * 0.01
        tuned[key][rows] += known[name]
    res = extract_lora(org, tuned, dim=4, conv_dim=4, clamp_quantile=None, min_diff=1e-6)
    assert res.summary["family"] == "sdxl" and res.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    modules = split_by_module(res.tensors)
    for name, delta in known.items():
        got = module_delta(modules[name], torch.empty(delta.shape, device="meta"))
        # float32 SVD of a rank-2 matrix: backward error ~ n * eps32 relative to its norm
        tol = max(delta.shape[0], delta[0].numel()) * torch.finfo(torch.float32).eps * float(delta.norm())
        assert float((got - delta).norm()) <= tol, name
    untouched = [m for m in res.modules if m["name"] not in known]
    assert untouched and all(m["update_norm"] == 0.0 for m in untouched)


def test_sdxl_block_weights_in_merge():
    unet, tes = _models("sdxl")
    tensors = _random_lora(unet, tes, "sdxl", args=())
    sd = sdxl_checkpoint(unet, tes)
    before = {k: v.clone() for k, v in sd.items()}
    # 12-value SDXL vector: BASE IN04 IN05 IN07 IN08 M00 OUT00..OUT05; IN04 and the text encoders off
    weights = "0,0,1,1,1,1,1,1,1,1,1,1"
    merge_into_state_dict(sd, [LoraInput(tensors, block_weights=weights)], merge_dtype=torch.float64)
    assert torch.equal(sd["model.diffusion_model.input_blocks.4.1.proj_in.weight"],
                       before["model.diffusion_model.input_blocks.4.1.proj_in.weight"])
    assert not torch.equal(sd["model.diffusion_model.input_blocks.5.1.proj_in.weight"],
                           before["model.diffusion_model.input_blocks.5.1.proj_in.weight"])
    te_keys = [k for k in sd if k.startswith("conditioner.")]
    assert all(torch.equal(sd[k], before[k]) for k in te_keys)
    # 20-value SDXL vector (BASE, IN00..IN08, M00, OUT00..OUT08): OUT02 off leaves the first up-block's last layer
    from lib_lora_train.tools.blocks import parse_block_weights
    w20 = parse_block_weights(",".join(["1"] * 13 + ["0"] + ["1"] * 6), family="sdxl")
    assert w20[16] == 0.0 and sum(w20) == 25          # LBW26 index 16 = OUT02
    sd2 = sdxl_checkpoint(unet, tes)
    ref = {k: v.clone() for k, v in sd2.items()}
    merge_into_state_dict(sd2, [LoraInput(tensors, block_weights=list(w20))], merge_dtype=torch.float64)
    out2 = [k for k in sd2 if k.startswith("model.diffusion_model.output_blocks.2.")]
    assert out2 and all(torch.equal(sd2[k], ref[k]) for k in out2)
    assert not torch.equal(sd2["model.diffusion_model.output_blocks.1.1.proj_in.weight"],
                           ref["model.diffusion_model.output_blocks.1.1.proj_in.weight"])
    with pytest.raises(Exception, match="SDXL LoRA takes 12 values"):
        merge_into_state_dict(sd, [LoraInput(tensors, block_weights=",".join(["1"] * 17))])


def test_inspect_tells_the_family(tmp_path):
    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    tensors = _random_lora(unet, tes, "sdxl")
    path = tmp_path / "xl.safetensors"
    save_network_file(str(path), tensors, {})                        # no metadata: names / shapes tell
    ins = inspect_lora(str(path))
    assert ins.family == "sdxl" and ins.base_model_version.startswith("sdxl_base_v1-0")
    assert ins.blocks["IN04"] > 0 and ins.blocks["BASE"] == 12 + 18
    unet_only = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    assert inspect_lora(unet_only).family == "sdxl"     # sgm names alone, told apart from SD1 ldm names by width
    sd2 = _random_lora(tiny_sd2_unet(), tiny_sd2_text_encoder(), "sd2", args=())
    from lib_lora_train.tools.formats import normalise
    assert normalise(sd2, {"ss_base_model_version": "sd_v2"}).family == "sd2"
    unknown = normalise(sd2)            # tiny widths, no metadata: SD 1.x / 2.x cannot be told apart
    assert unknown.family == "sd1" and unknown.family_guessed
    ins = inspect_lora(str(path))
    assert ins.blocks["M00"] > 0 and "OUT05" in ins.blocks


def test_resize_and_merge_loras_keep_sdxl_names_and_family(tmp_path):
    from lib_lora_train.tools.merge_lora import merge_loras_to_file
    from lib_lora_train.tools.resize import resize_lora

    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_network_file(str(a), _random_lora(unet, tes, "sdxl", seed=1), meta)
    save_network_file(str(b), _random_lora(unet, tes, "sdxl", seed=2), meta)
    resized = resize_lora(str(a), new_rank=2, new_conv_rank=1)
    assert {k.rsplit(".", 2)[0] for k in resized.tensors} >= {"lora_te2_text_model_encoder_layers_0_mlp_fc1",
                                                               "lora_unet_input_blocks_3_0_op"}
    assert resized.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    merged = merge_loras_to_file([str(a), str(b)], tmp_path / "m.safetensors", new_rank=4, new_conv_rank=2)
    assert merged.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert merged.metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert merged.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv.") for k in merged.tensors)


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_checkpoint_names_point_at_the_loaded_models_weights(family):
    """Every layer name of the network on a model loaded by models.load_sd_model points, in the checkpoint it was
    loaded from, at exactly that layer's weight (U-Net sgm / ldm keys, CLIP-L, OpenCLIP q/k/v row blocks)."""
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.models.tiny import tiny_sd2_state_dict, tiny_sdxl_state_dict
    from lib_lora_train.networks.targets import model_index
    from lib_lora_train.tools.checkpoint import family_name_index, rows

    sd = tiny_sdxl_state_dict() if family == "sdxl" else tiny_sd2_state_dict()
    model = load_sd_model(dict(sd))
    assert model.info.family == family
    net = create_network(network_config_from_args("networks.lora", 4, 1, ["conv_dim=2"], family=family),
                         model.unet, model.text_encoders, family=family)
    layers = model_index(model.unet, model.text_encoders, family)
    index = family_name_index(list(sd), family, lambda k: sd[k].dim())
    for name in net.names:
        keys = index[name]
        weight = layers[name].weight.detach()
        assert torch.equal(rows(sd[keys.weight], keys.chunk).reshape(weight.shape), weight), name


def test_extract_on_sd2_writes_v2_metadata(tmp_path):
    from lib_lora_train.tools.extract import extract_lora_to_file

    unet, te = tiny_sd2_unet(), tiny_sd2_text_encoder()
    org = sd2_checkpoint(unet, te)
    tuned = {k: v.clone() for k, v in org.items()}
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    g = torch.Generator().manual_seed(3)
    tuned[key][96:144] += torch.randn(48, 1, generator=g) @ torch.randn(1, 48, generator=g) * 0.1     # v_proj
    last = "cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight"                        # unused layer
    tuned[last] += 1.0
    res = extract_lora_to_file(org, tuned, tmp_path / "x.safetensors", dim=2, clamp_quantile=None, min_diff=1e-6,
                               v_parameterization=True)
    names = {k.split(".")[0] for k in res.tensors}
    assert "lora_te_text_model_encoder_layers_0_self_attn_v_proj" in names
    assert not any("layers_2_" in n for n in names)          # sd-scripts' SD 2.x text encoder has 23 of 24 layers
    by_name = {m["name"]: m["update_norm"] for m in res.modules}
    assert by_name["lora_te_text_model_encoder_layers_0_self_attn_v_proj"] > 0
    assert by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == 0
    assert res.metadata["ss_v2"] == "True" and res.metadata["ss_base_model_version"] == "sd_v2_v"
    assert res.metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert res.metadata["modelspec.resolution"] == "768x768"


def test_comfyui_style_sdxl_names_are_read_as_sd_scripts_names():
    t = {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(2, 2048),
         "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(640, 2),
         "diffusion_model.output_blocks.2.2.conv.lora_down.weight": torch.zeros(2, 1280, 3, 3),
         "diffusion_model.output_blocks.2.2.conv.lora_up.weight": torch.zeros(1280, 2, 1, 1)}
    from lib_lora_train.tools.formats import normalise

    lora = normalise(t)
    assert lora.family == "sdxl" and lora.convention == "comfyui"
    assert set(lora.modules) == {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
                                 "lora_unet_output_blocks_2_2_conv"}


def test_an_sdxl_refiner_is_refused_by_the_tools_by_name(tmp_path):
    """A refiner (bigG alone, as conditioner.embedders.0.model) is named, not reported as a shape mismatch."""
    from safetensors.torch import save_file

    from lib_lora_train.models import tiny_sdxl_state_dict
    from lib_lora_train.tools.families import checkpoint_family

    xl = tiny_sdxl_state_dict(seed=0, unet_layers=1)
    refiner = {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v.contiguous()
               for k, v in xl.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelError, match="SDXL refiner"):
        checkpoint_family(refiner)
    assert checkpoint_family(xl) == "sdxl"
    base = tmp_path / "refiner.safetensors"
    save_file(refiner, str(base))
    unet, tes = tiny_sdxl_unet(), tiny_sdxl_text_encoders()
    lora = tmp_path / "xl.safetensors"
    save_network_file(str(lora), _random_lora(unet, tes, "sdxl"), {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(ModelError, match="SDXL refiner"):
        merge_into_checkpoint(str(base), [str(lora)], str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
