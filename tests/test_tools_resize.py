"""Resizing a LoRA: lossless at full rank, best approximation below, sd-scripts' dynamic ranks, scale kept."""
import json

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import network_hashes, read_network_file, save_network_file
from lib_lora_train.networks.delta import split_by_module
from lib_lora_train.networks.io import addnet_hash
from lib_lora_train.tools.resize import resize_lora, resize_lora_to_file
from test_tools_support import assert_close, base_model, plain_updates, random_network


@pytest.fixture(scope="module")
def locon():
    return random_network(base_model(), "networks.lora", 4, 2, ["conv_dim=3", "conv_alpha=1"], seed=31).save_tensors()


def test_full_rank_is_lossless_and_keeps_the_scale(locon):
    model = base_model()
    res = resize_lora(locon, new_rank=4, new_conv_rank=3)
    want, got = plain_updates(locon, model), plain_updates(res.tensors, model)
    for name in want:
        assert_close(got[name], want[name], rel=2e-5, what=name)
    old, new = split_by_module(locon), split_by_module(res.tensors)
    for name, w in new.items():
        r_new, r_old = w["lora_down.weight"].shape[0], old[name]["lora_down.weight"].shape[0]
        assert float(w["alpha"]) / r_new == pytest.approx(float(old[name]["alpha"]) / r_old)


def test_a_lower_rank_is_the_best_approximation_with_the_reported_energy(locon):
    model = base_model()
    res = resize_lora(locon, new_rank=2, new_conv_rank=1)
    want, got = plain_updates(locon, model), plain_updates(res.tensors, model)
    for m in res.modules:
        full = want[m["name"]].reshape(want[m["name"]].shape[0], -1).double()
        U, S, Vh = torch.linalg.svd(full)
        r = 1 if m["kxk"] else 2
        assert m["new_rank"] == r
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        assert_close(got[m["name"]].reshape(full.shape), best, rel=1e-4, what=m["name"])
        energy = float((got[m["name"]].double().norm() / full.norm()) ** 2)
        assert m["fro_retained"] ** 2 == pytest.approx(energy, rel=1e-4)
        assert m["sum_retained"] == pytest.approx(float(S[:r].sum() / S.sum()), rel=1e-5)


def _sd_scripts_rank(S: torch.Tensor, method: str, param: float) -> int:
    """resize_lora.py's rule written out: the strict index, clamped to [1, n-1], plus one."""
    n = len(S)
    if method == "sv_ratio":
        idx = sum(1 for s in S if s > S[0] / param)
    else:
        vals = S if method == "sv_cumulative" else S ** 2
        target = param if method == "sv_cumulative" else param ** 2
        share, idx = 0.0, n
        for i, v in enumerate(vals):
            share += float(v) / float(vals.sum())
            if share >= target:
                idx = i + 1
                break
    return max(1, min(idx, n - 1)) + 1


@pytest.mark.parametrize("method, param", [("sv_ratio", 3.0), ("sv_fro", 0.85), ("sv_cumulative", 0.6)])
def test_dynamic_ranks_follow_sd_scripts_rules_including_the_extra_rank(method, param):
    model = base_model()
    # a LoRA with a steep spectrum, so each method picks different ranks per module
    tensors = random_network(model, "networks.lora", 8, 8, [], seed=32).save_tensors()
    for name, w in split_by_module(tensors).items():
        decay = torch.tensor([2.0 ** -i for i in range(8)])
        down = w["lora_down.weight"]
        tensors[f"{name}.lora_down.weight"] = down * decay.reshape(-1, *[1] * (down.dim() - 1))
    res = resize_lora(tensors, new_rank=6, dynamic_method=method, dynamic_param=param)
    want = plain_updates(tensors, model)
    picked = set()
    for m in res.modules:
        full = want[m["name"]].reshape(want[m["name"]].shape[0], -1).double()
        S = torch.linalg.svd(full.float())[1]
        expected = min(_sd_scripts_rank(S, method, param), 6, 8)
        assert m["new_rank"] == expected, (m["name"], m["new_rank"], expected)
        picked.add(expected)
    assert len(picked) > 1 or method == "sv_ratio", picked
    assert res.metadata["ss_network_dim"] == "Dynamic"


def test_lycoris_modules_become_loras_and_ia3_is_kept():
    model = base_model()
    loha = random_network(model, "lycoris.kohya", 2, 1, ["algo=loha", "preset=attn-mlp"], seed=33).save_tensors()
    res = resize_lora(loha, new_rank=4)
    want, got = plain_updates(loha, model), plain_updates(res.tensors, model)
    assert all("lora_down.weight" in w for w in split_by_module(res.tensors).values())
    for name in want:                          # a LoHa of rank 2 has an update of rank <= 4: exact at 4
        assert_close(got[name], want[name], rel=1e-4, what=name)
    ia3 = random_network(model, "lycoris.kohya", 4, 1, ["algo=ia3"], seed=34).save_tensors()
    kept = resize_lora(ia3, new_rank=2)
    assert kept.tensors.keys() == ia3.keys() and all(torch.equal(kept.tensors[k], ia3[k]) for k in ia3)


def test_resized_file_keeps_training_metadata_and_gets_fresh_hashes(locon, tmp_path):
    src = tmp_path / "in.safetensors"
    save_network_file(src, locon, {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_training_comment": "hi",
                                   "ss_tag_frequency": json.dumps({"3_a": {"x": 1}}), "modelspec.title": "T",
                                   "ss_network_args": json.dumps({"conv_dim": "3", "conv_alpha": "1"})})
    before = addnet_hash(src)
    out = tmp_path / "out.safetensors"
    res = resize_lora_to_file(src, out, new_rank=2, save_precision="fp16")
    assert addnet_hash(src) == before
    tensors, meta = read_network_file(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.6666666666666666"}
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2; hi"
    assert meta["ss_tag_frequency"] == json.dumps({"3_a": {"x": 1}}) and meta["modelspec.title"] == "T"
    assert meta["sshs_model_hash"] == addnet_hash(out) == res.hashes["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] == network_hashes(tensors, meta)[1]
    record = json.loads(meta["lib_lora_train.inputs"])[0]
    assert record["replaced"]["ss_network_dim"] == "4"
    with pytest.raises(ConfigError, match="dynamic_param"):
        resize_lora(locon, dynamic_method="sv_fro")
    with pytest.raises(ConfigError, match="at most 1"):
        resize_lora(locon, dynamic_method="sv_fro", dynamic_param=2)
