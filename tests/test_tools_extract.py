"""Extracting a LoRA from (base + merged LoRA) and base recovers the update to a tolerance set by the rank."""
import json

import pytest
import torch

from lib_lora_train.models import save_checkpoint
from lib_lora_train.networks import network_hashes, read_network_file
from lib_lora_train.networks.io import addnet_hash
from lib_lora_train.tools.extract import extract_lora, extract_lora_to_file
from lib_lora_train.tools.merge import LoraInput, merge_into_state_dict
from test_tools_support import assert_close, base_model, plain_updates, random_network, tiny_sd


@pytest.fixture(scope="module")
def tuned():
    """(base state dict, tuned state dict, the merged network's tensors): a rank-4 LoCon merged at ratio 1."""
    model = base_model()
    net = random_network(model, "networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=2"], seed=21, scale=0.2)
    base, sd = tiny_sd(), tiny_sd()
    merge_into_state_dict(sd, [LoraInput(net.save_tensors(), 1.0)])
    return base, sd, net.save_tensors()


def test_extraction_at_the_lora_rank_recovers_the_update(tuned):
    base, sd, tensors = tuned
    model = base_model()
    res = extract_lora(base, sd, dim=4, conv_dim=2, clamp_quantile=1.0)
    want, got = plain_updates(tensors, model), plain_updates(res.tensors, model)
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], rel=1e-4, what=name)
    assert all(m["fro_retained"] > 0.99999 and m["rel_error"] < 1e-4 for m in res.modules)
    assert res.summary["text_encoder"] == "extracted"
    ranks = {m["name"]: m["rank"] for m in res.modules}
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2
    assert ranks["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == 4


def test_a_lower_rank_keeps_the_reported_share_and_the_default_clamp_reports_its_error(tuned):
    base, sd, tensors = tuned
    model = base_model()
    want = plain_updates(tensors, model)
    res = extract_lora(base, sd, dim=2, clamp_quantile=1.0)     # LierLa: no 3x3 convs
    got = plain_updates(res.tensors, model)
    assert not any(n.endswith(("conv1", "conv2")) for n in got)
    for m in res.modules:
        full = want[m["name"]].reshape(want[m["name"]].shape[0], -1).double()
        U, S, Vh = torch.linalg.svd(full)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        assert_close(got[m["name"]].reshape(full.shape), best, rel=1e-4, what=m["name"])
        kept = float(torch.sqrt((S[:2] ** 2).sum() / (S ** 2).sum()))
        assert m["fro_retained"] == pytest.approx(kept, rel=1e-5)
        assert m["rel_error"] == pytest.approx(float(torch.sqrt(1 - torch.tensor(kept) ** 2)), abs=1e-4)
    clamped = extract_lora(base, sd, dim=4, clamp_quantile=0.9)
    got = plain_updates(clamped.tensors, model)
    errors = []
    for m in clamped.modules:
        full = want[m["name"]].reshape(want[m["name"]].shape[0], -1)
        actual = float((got[m["name"]].reshape(full.shape) - full).norm() / full.norm())
        assert m["rel_error"] == pytest.approx(actual, rel=1e-3, abs=1e-6)
        errors.append(actual)
    assert max(errors) > 1e-3, "a 0.9-quantile clamp should cut something"


def test_an_unchanged_text_encoder_is_left_out(tmp_path):
    model = base_model()
    net = random_network(model, "networks.lora", 4, 4, [], seed=22, train_text_encoder=False)
    base, sd = tiny_sd(), tiny_sd()
    merge_into_state_dict(sd, [LoraInput(net.save_tensors(), 1.0)])
    key = next(k for k in sd if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    sd[key] = sd[key] + 0.005            # below min_diff (0.01): still "the same"
    res = extract_lora(base, sd, dim=4)
    assert res.summary["text_encoder"] == "same" and res.summary["text_encoder_max_diff"] == pytest.approx(0.005,
                                                                                                           rel=1e-3)
    assert not any(k.startswith("lora_te") for k in res.tensors)
    res = extract_lora(base, sd, dim=4, min_diff=0.001)
    assert any(k.startswith("lora_te") for k in res.tensors)


def test_extracted_file_has_sd_scripts_metadata_and_valid_hashes(tuned, tmp_path):
    base, sd, _ = tuned
    save_checkpoint(tmp_path / "base.safetensors", base)
    save_checkpoint(tmp_path / "tuned.safetensors", sd)
    out = tmp_path / "x.safetensors"
    res = extract_lora_to_file(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, dim=4, conv_dim=2,
                               save_precision="bf16")
    tensors, meta = read_network_file(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].float()) == 2.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.title"] == "x"
    assert meta["sshs_model_hash"] == addnet_hash(out) == res.hashes["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] == network_hashes(tensors, meta)[1]
    roles = [i["role"] for i in json.loads(meta["lib_lora_train.inputs"])]
    assert roles == ["base", "tuned"]


def test_dense_svd_paths_give_the_best_approximation(monkeypatch):
    from lib_lora_train.tools import modules

    g = torch.Generator().manual_seed(0)
    for shape in ((300, 90), (90, 300), (120, 100)):          # Gram path (tall / wide) and LAPACK path
        m = torch.randn(*shape, generator=g) @ torch.diag(torch.logspace(0, -2, shape[1]))
        lr = modules.svd_dense(m, 7)
        U, S, Vh = torch.linalg.svd(m.double(), full_matrices=False)
        assert_close(lr.up @ lr.down, (U[:, :7] * S[:7]) @ Vh[:7], rel=1e-5, what=str(shape))
        # float32 singular values (the Gram path squares the matrix): error up to about n * eps32 * s1^2 / s_k,
        # a bound from float32's roundoff and these magnitudes, not from one CPU's kernels
        bound = max(shape) * torch.finfo(torch.float32).eps * S[0] ** 2 / S[:7]
        assert torch.all((lr.S[:7].double() - S[:7]).abs() <= bound), (shape, lr.S[:7], S[:7], bound)
        assert torch.allclose(lr.down @ lr.down.t(), torch.eye(7), atol=1e-5)
    x = torch.randn(1001, generator=g)
    want = float(torch.quantile(x, 0.99))
    monkeypatch.setattr(modules, "QUANTILE_LIMIT", 100)          # the sort-based path for huge inputs
    assert modules.quantile(x, 0.99) == pytest.approx(want, rel=1e-6)
