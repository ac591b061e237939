"""Reading other trainers' key conventions, inspecting a file, checking its hash and editing its metadata."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.networks import read_network_file, save_network_file
from lib_lora_train.networks.delta import split_by_module
from lib_lora_train.networks.io import addnet_hash, network_hashes
from lib_lora_train.networks.targets import lora_name
from lib_lora_train.tools.formats import normalise, read_lora
from lib_lora_train.tools.inspect import edit_metadata, inspect_lora
from lib_lora_train.tools.merge import LoraInput, merge_into_state_dict
from test_tools_support import base_model, plain_updates, random_network, tiny_sd

# Known SD1 facts: diffusers module path -> the same module in the ldm (CompVis) layout.
LDM = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
       "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
       "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "middle_block.1.transformer_blocks.0.ff.net.2",
       "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
       "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_out.0":
           "output_blocks.9.1.transformer_blocks.0.attn2.to_out.0",
       "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
       "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
       "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
       "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
       "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
       "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
       "up_blocks.0.resnets.2.conv2": "output_blocks.2.0.out_layers.3"}


@pytest.fixture(scope="module")
def locon():
    return random_network(base_model(), "networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=1"], seed=41).save_tensors()


def _paths(model):
    """sd-scripts name -> (part, dotted module path) for every layer of the tiny model."""
    out = {}
    for part, root in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        for path, _ in root.named_modules():
            if path:
                p = path if part == "unet" or path.startswith("text_model.") else "text_model." + path
                out[lora_name(path, part)] = (part, p)
    return out


_PEFT_KEYS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}


def _convert(tensors, style, paths):
    out = {}
    for name, w in split_by_module(tensors).items():
        part, path = paths[name]
        for key, t in w.items():
            if style == "peft":
                root = "unet" if part == "unet" else "text_encoder"
                out[f"{root}.{path}.{_PEFT_KEYS[key]}"] = t
            elif style == "onetrainer":
                root = "lora_unet" if part == "unet" else "lora_te"
                out[f"{root}.{path}.{key}"] = t
            elif style in ("omi", "kohya-ldm"):
                if part == "unet" and path not in LDM:
                    continue
                ldm = LDM.get(path, path)
                if style == "omi":
                    out[f"{'unet' if part == 'unet' else 'clip_l'}.{ldm}.{key}"] = t
                else:
                    prefix = "lora_unet_" if part == "unet" else "lora_te_"
                    out[f"{prefix}{ldm.replace('.', '_')}.{key}"] = t
    return out


@pytest.mark.parametrize("style, label", [("peft", "diffusers"), ("onetrainer", "onetrainer"),
                                          ("omi", "onetrainer-omi"), ("kohya-ldm", "kohya-ldm")])
def test_other_trainers_key_conventions_read_as_sd_scripts_modules(locon, style, label):
    paths = _paths(base_model())
    lora = normalise(_convert(locon, style, paths))
    assert lora.convention == label and lora.family == "sd1" and not lora.unknown_keys
    canon = split_by_module(locon)
    if style in ("omi", "kohya-ldm"):
        expected = {lora_name(p, "unet") for p in LDM if lora_name(p, "unet") in canon}
        assert len(expected) == len(LDM) - 1          # the tiny model has no conv_shortcut there
        expected |= {n for n in canon if n.startswith("lora_te")}
        assert set(lora.modules) == expected
    else:
        assert set(lora.modules) == set(canon)
    for name, w in lora.modules.items():
        assert w.keys() == canon[name].keys() and all(torch.equal(w[k], canon[name][k]) for k in w), name


def test_a_peft_file_merges_like_the_same_file_in_sd_scripts_names(locon):
    paths = _paths(base_model())
    a, b = tiny_sd(), tiny_sd()
    merge_into_state_dict(a, [LoraInput(locon, 0.9)])
    merge_into_state_dict(b, [LoraInput(_convert(locon, "peft", paths), 0.9)])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_diffusers_attention_processor_keys_and_peft_without_alpha():
    t = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight":
         torch.ones(2, 32),
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight":
         torch.ones(32, 2),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(2, 32),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.default.weight": torch.ones(32, 2)}
    lora = normalise(t)
    assert set(lora.modules) == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
                                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    ins = inspect_lora(lora)
    assert {m.alpha for m in ins.modules} == {None}
    assert all(m.norm == pytest.approx(float((torch.ones(32, 2) @ torch.ones(2, 32)).norm())) for m in ins.modules)


def _lycoris_file(locon):
    """Our LoCon with one LoHa, one LoKr and one full module swapped in, as LyCORIS would save them."""
    g = torch.Generator().manual_seed(3)
    t = dict(locon)
    for name in ("lora_unet_mid_block_attentions_0_proj_out", "lora_unet_up_blocks_1_attentions_0_proj_in",
                 "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        for k in ("lora_down.weight", "lora_up.weight"):
            t.pop(f"{name}.{k}")
    hada = "lora_unet_mid_block_attentions_0_proj_out"
    for k, shape in (("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 64))):
        t[f"{hada}.{k}"] = torch.randn(shape, generator=g) * 0.3
    lokr = "lora_unet_up_blocks_1_attentions_0_proj_in"
    t[f"{lokr}.lokr_w1"] = torch.randn(4, 4, generator=g)
    t[f"{lokr}.lokr_w2_a"] = torch.randn(16, 2, generator=g) * 0.1
    t[f"{lokr}.lokr_w2_b"] = torch.randn(2, 16, generator=g) * 0.1
    full = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    t.pop(f"{full}.alpha")
    t[f"{full}.diff"] = torch.randn(32, 64, generator=g) * 0.01
    return t, hada, lokr, full


def test_inspection_of_types_ranks_alphas_norms_and_flags(locon):
    model = base_model()
    t, hada, lokr, full = _lycoris_file(locon)
    zero = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    big = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    bad = "lora_te_text_model_encoder_layers_0_self_attn_v_proj"
    t[f"{zero}.lora_up.weight"] = torch.zeros_like(t[f"{zero}.lora_up.weight"])
    t[f"{big}.lora_up.weight"] = t[f"{big}.lora_up.weight"] * 1000
    t[f"{bad}.lora_down.weight"] = t[f"{bad}.lora_down.weight"].clone()
    t[f"{bad}.lora_down.weight"][0, 0] = float("nan")
    ins = inspect_lora(t)
    by = {m.name: m for m in ins.modules}
    assert by[hada].type == "LoHa" and by[hada].rank == 2 and by[hada].block == "M00"
    assert by[lokr].type == "LoKr" and by[lokr].rank == 2 and by[lokr].block == "OUT03"
    assert by[full].type == "Full" and by[full].rank is None and by[full].block == "BASE"
    assert by["lora_unet_down_blocks_0_resnets_0_conv1"].type == "LoCon"
    assert by["lora_unet_down_blocks_0_resnets_0_conv1"].alpha == 1.0 and by[zero].alpha == 2.0
    assert ins.types == {"LoRA": len(ins.modules) - 50 - 3, "LoCon": 50, "LoHa": 1, "LoKr": 1, "Full": 1}
    assert by[zero].flags == ["untrained"] and by[big].flags == ["exploded"] and by[bad].flags == ["non-finite"]
    clean = {k: v for k, v in t.items() if not k.startswith(bad)}
    want = plain_updates({k: v for k, v in clean.items() if not k.startswith(full)}, model)
    for name, d in want.items():
        assert by[name].norm == pytest.approx(float(d.double().norm()), rel=1e-4, abs=1e-9), name
    assert by[full].norm == pytest.approx(float(t[f"{full}.diff"].norm()), rel=1e-5)


def test_hash_check_top_tags_and_metadata(locon, tmp_path):
    path = tmp_path / "ours.safetensors"
    tags = {"5_cat": {"cat": 5, "red": 2}, "2_dog": {"dog": 7, "red": 1}}
    save_network_file(path, locon, {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
                                    "ss_network_dim": "4", "ss_network_alpha": "2", "modelspec.title": "Cats",
                                    "ss_tag_frequency": json.dumps(tags), "ss_network_args": '{"conv_dim": "2"}'})
    ins = inspect_lora(path)
    assert ins.hash["status"] == "ok" and ins.hash["model_hash_ok"] and ins.hash["legacy_hash_ok"]
    assert ins.top_tags[:2] == [("dog", 7), ("cat", 5)] and ("red", 3) in ins.top_tags
    assert ins.title == "Cats" and ins.network_args == {"conv_dim": "2"} and ins.base_model_version == "sd_v1"
    assert ins.convention == "sd-scripts" and ins.parts == {"text_encoder": 12, "unet": 277}
    # tampered: the stored hash no longer matches the tensors
    raw, meta = read_network_file(path)
    meta["sshs_model_hash"] = "0" * 64
    save_file(raw, str(tmp_path / "bad.safetensors"), meta)
    assert inspect_lora(tmp_path / "bad.safetensors").hash["status"] == "MISMATCH"
    # LyCORIS' own hash format is recognised, not reported as a mismatch
    meta["sshs_model_hash"] = "0x" + "ab" * 32
    save_file(raw, str(tmp_path / "lyco.safetensors"), meta)
    assert inspect_lora(tmp_path / "lyco.safetensors").hash["status"].startswith("lycoris-format")
    json.dumps(ins.to_json())      # JSON-serialisable for --json


def test_editing_metadata_rewrites_the_hashes_and_protects_the_input(locon, tmp_path):
    path = tmp_path / "in.safetensors"
    save_network_file(path, locon, {"modelspec.title": "old", "ss_output_name": "x"})
    before = addnet_hash(path)
    meta = edit_metadata(path, title="New title", trigger_words="zkz, red", description="a test",
                         save_to=tmp_path / "out.safetensors")
    assert addnet_hash(path) == before and read_network_file(path)[1]["modelspec.title"] == "old"
    tensors, written = read_network_file(tmp_path / "out.safetensors")
    assert written["modelspec.title"] == "New title" and written["modelspec.trigger_phrase"] == "zkz, red"
    assert written["modelspec.description"] == "a test" and written["ss_output_name"] == "x"
    assert written["sshs_model_hash"] == addnet_hash(tmp_path / "out.safetensors") == before
    assert written["sshs_legacy_hash"] == network_hashes(tensors, written)[1] == meta["sshs_legacy_hash"]
    assert inspect_lora(tmp_path / "out.safetensors").hash["status"] == "ok"
    with pytest.raises(ConfigError, match="in_place"):
        edit_metadata(path, title="x")
    with pytest.raises(ConfigError, match="in_place"):
        edit_metadata(path, title="x", save_to=path)
    edit_metadata(path, title="", in_place=True)
    assert "modelspec.title" not in read_network_file(path)[1] and addnet_hash(path) == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_other_model_families_are_recognised():
    dit = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
           "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)}
    lora = normalise(dit)
    assert lora.family == "other" and lora.convention == "other"
    assert inspect_lora(dit).modules[0].type == "LoRA"
    with pytest.raises(ModelError, match="not a Stable Diffusion 1.x / 2.x / SDXL network"):
        merge_into_state_dict(tiny_sd(), [LoraInput(dit)])
    sd2 = {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 1024),
           "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(8, 2)}
    assert normalise(sd2).family == "sd2"
    xl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}
    assert normalise(xl).family == "sdxl"
    with pytest.raises(ModelError, match="no LoRA"):
        normalise({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)})
    with pytest.raises(ModelError, match="not found"):
        read_lora("/nonexistent/file.safetensors")


def test_comfyui_ldm_names_and_a_non_sd1_checkpoint():
    t = {"diffusion_model.input_blocks.4.1.proj_in.lora_A.weight": torch.ones(2, 64),
         "diffusion_model.input_blocks.4.1.proj_in.lora_B.weight": torch.ones(64, 2),
         "diffusion_model.output_blocks.2.1.conv.lora_down.weight": torch.ones(2, 64, 3, 3),
         "diffusion_model.output_blocks.2.1.conv.lora_up.weight": torch.ones(64, 2, 1, 1)}
    lora = normalise(t)
    assert set(lora.modules) == {"lora_unet_down_blocks_1_attentions_0_proj_in",
                                 "lora_unet_up_blocks_0_upsamplers_0_conv"}
    assert lora.family == "sd1" and lora.convention == "comfyui"
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        merge_into_state_dict(dict(t), [LoraInput(t)])      # a network given as the model
