"""Merging networks into one LoRA: SVD (exact at full rank, best low-rank otherwise) and concatenation."""
import json

import pytest
import torch
from safetensors import safe_open

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import network_hashes, read_network_file, save_network_file
from lib_lora_train.networks.io import addnet_hash
from lib_lora_train.tools.blocks import lbw_index
from lib_lora_train.tools.merge import LoraInput
from lib_lora_train.tools.merge_lora import merge_loras, merge_loras_to_file
from test_tools_support import assert_close, base_model, plain_updates, random_network


@pytest.fixture(scope="module")
def nets():
    model = base_model()
    locon = random_network(model, "networks.lora", 4, 2, ["conv_dim=3", "conv_alpha=1"], seed=11)
    return {"locon": locon.save_tensors(),
            "lora": random_network(model, "networks.lora", 2, 8, [], seed=12).save_tensors(),
            "loha": random_network(model, "lycoris.kohya", 2, 1, ["algo=loha", "preset=attn-mlp"], seed=13)
            .save_tensors(),
            "lokr": random_network(model, "lycoris.kohya", 2, 1, ["algo=lokr", "factor=4", "preset=attn-mlp"],
                                   seed=14).save_tensors()}


def _expected(parts, model):
    total = {}
    for tensors, ratio in parts:
        for name, d in plain_updates(tensors, model, ratio).items():
            total[name] = total[name] + d if name in total else d
    return total


def _check(result_tensors, expected, model, rel=2e-5):
    got = plain_updates(result_tensors, model)
    assert set(got) == set(expected)
    for name in expected:
        assert_close(got[name], expected[name], rel=rel, what=name)


def test_svd_merge_at_full_rank_equals_the_summed_updates(nets):
    model = base_model()
    parts = [(nets["locon"], 0.8), (nets["lora"], -0.5)]
    res = merge_loras([LoraInput(t, r) for t, r in parts], new_rank=6, new_conv_rank=3)
    _check(res.tensors, _expected(parts, model), model)
    ranks = {m["name"]: m["rank"] for m in res.modules}
    assert ranks["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 6
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 3
    assert all(m["fro_retained"] == pytest.approx(1.0, abs=1e-6) for m in res.modules)


def test_svd_merge_of_lycoris_types_is_exact_at_full_rank(nets):
    model = base_model()
    parts = [(nets["loha"], 1.0), (nets["lokr"], 0.5), (nets["locon"], -0.3)]
    res = merge_loras([LoraInput(t, r) for t, r in parts], new_rank=64)
    _check(res.tensors, _expected(parts, model), model, rel=5e-5)


def test_svd_merge_at_a_lower_rank_is_the_best_approximation_and_reports_it(nets):
    model = base_model()
    parts = [(nets["locon"], 1.0), (nets["lora"], 1.0)]
    res = merge_loras([LoraInput(t, r) for t, r in parts], new_rank=2)
    expected = _expected(parts, model)
    got = plain_updates(res.tensors, model)
    report = {m["name"]: m for m in res.modules}
    for name in ("lora_te_text_model_encoder_layers_1_mlp_fc2", "lora_unet_up_blocks_2_attentions_1_proj_out",
                 "lora_unet_down_blocks_1_resnets_0_conv2"):
        full = expected[name].reshape(expected[name].shape[0], -1).double()
        U, S, Vh = torch.linalg.svd(full)
        r = 2
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        assert_close(got[name].reshape(full.shape), best, rel=1e-4, what=name)
        energy = float((best.norm() / full.norm()) ** 2)
        assert report[name]["fro_retained"] ** 2 == pytest.approx(energy, rel=1e-5)
        assert report[name]["sum_retained"] == pytest.approx(float(S[:r].sum() / S.sum()), rel=1e-5)


def test_concat_is_exact_with_any_ratios_and_alphas(nets):
    model = base_model()
    parts = [(nets["locon"], 0.7), (nets["lora"], -1.3), (nets["locon"], 0.25)]
    res = merge_loras([LoraInput(t, r) for t, r in parts], concat=True)
    _check(res.tensors, _expected(parts, model), model)
    w = read = {k: v for k, v in res.tensors.items()}
    name = "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_2"
    assert w[f"{name}.lora_down.weight"].shape[0] == 4 + 2 + 4 and float(read[f"{name}.alpha"]) == 10.0
    conv = "lora_unet_up_blocks_1_resnets_2_conv1"
    assert w[f"{conv}.lora_down.weight"].shape[0] == 3 + 3     # the LierLa input has no conv modules
    shuffled = merge_loras([LoraInput(t, r) for t, r in parts], concat=True, shuffle=True, seed=3)
    assert not torch.equal(shuffled.tensors[f"{name}.lora_down.weight"], w[f"{name}.lora_down.weight"])
    _check(shuffled.tensors, _expected(parts, model), model)


def test_zero_block_ratios_keep_those_blocks_out_of_the_merge(nets):
    model = base_model()
    only_in = "1," + ",".join(["1"] * 12) + ",0," + ",".join(["0"] * 12)    # BASE + IN blocks only
    res = merge_loras([LoraInput(nets["locon"], 1.0, only_in), LoraInput(nets["lora"], 0.5)], new_rank=8)
    got = plain_updates(res.tensors, model)
    a, b = plain_updates(nets["locon"], model), plain_updates(nets["lora"], model, 0.5)
    for name in a:
        idx = lbw_index(name)
        blocked = idx is not None and idx >= 13      # M00 and OUT blocks
        want = b.get(name) if blocked else (a[name] + b[name] if name in b else a[name])
        if want is None:
            assert name not in got, f"{name}: every contribution has ratio 0, it must be left out"
        else:
            assert_close(got[name], want, rel=2e-5, what=name)


def test_merged_file_has_fresh_hashes_minimum_metadata_and_the_inputs_metadata(nets, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_network_file(a, nets["locon"], {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                                         "ss_v2": "False", "modelspec.title": "A", "modelspec.trigger_phrase": "zkz",
                                         "ss_tag_frequency": json.dumps({"5_a": {"red": 2}})})
    save_network_file(b, nets["lora"], {"ss_tag_frequency": json.dumps({"5_a": {"red": 1, "blue": 4}})})
    before = (addnet_hash(a), addnet_hash(b))
    out = tmp_path / "m.safetensors"
    res = merge_loras_to_file([LoraInput(a, 1.0), LoraInput(b, 0.5)], out, new_rank=4, save_precision="fp16")
    assert (addnet_hash(a), addnet_hash(b)) == before
    tensors, meta = read_network_file(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert meta["sshs_model_hash"] == addnet_hash(out) == res.hashes["sshs_model_hash"]
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == network_hashes(tensors, meta)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert meta["modelspec.merged_from"] == "A, b" and meta["modelspec.title"] == "m"
    assert meta["modelspec.trigger_phrase"] == "zkz"
    assert json.loads(meta["ss_tag_frequency"]) == {"5_a": {"red": 3, "blue": 4}}
    inputs = json.loads(meta["lib_lora_train.inputs"])
    assert [i["ratio"] for i in inputs] == [1.0, 0.5]
    assert inputs[0]["metadata"]["modelspec.trigger_phrase"] == "zkz"
    assert inputs[0]["sshs_model_hash"] == before[0]
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/lora"
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge_loras_to_file([a, b], a, new_rank=4, overwrite=True)


def test_bad_requests_are_refused(nets):
    with pytest.raises(ConfigError, match="new_rank.*concat"):
        merge_loras([nets["lora"], nets["locon"]])
    with pytest.raises(ConfigError, match="LoHa"):
        merge_loras([nets["loha"], nets["lora"]], concat=True)
    with pytest.raises(ConfigError, match="17 values"):
        merge_loras([LoraInput(nets["lora"], 1.0, "1,1,1")], new_rank=2)
    with pytest.raises(ConfigError, match="SDXL"):
        merge_loras([LoraInput(nets["lora"], 1.0, ",".join(["1"] * 12))], new_rank=2)
