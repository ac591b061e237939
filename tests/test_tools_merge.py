"""Merging networks into a checkpoint: same outputs as the live network, layout, precision, metadata, hashes."""
import hashlib
import json
import os
import threading

import pytest
import torch
from safetensors import safe_open

from lib_lora_train.errors import ConfigError, Interrupted, ModelError
from lib_lora_train.models import load_sd_model, save_checkpoint
from lib_lora_train.networks import save_network_file
from lib_lora_train.networks.delta import split_by_module
from lib_lora_train.tools.blocks import lbw_index
from lib_lora_train.tools.merge import LoraInput, merge_into_checkpoint, merge_into_state_dict
from numerics import assert_within, merged_reference
from test_tools_support import assert_close, base_model, inputs, outputs, random_network, tiny_sd

CASES = {
    "locon": ("networks.lora", 4, 2, ["conv_dim=3", "conv_alpha=1"]),
    "loha": ("lycoris.kohya", 4, 2, ["algo=loha", "conv_dim=2", "conv_alpha=1"]),
    "lokr": ("lycoris.kohya", 4, 2, ["algo=lokr", "factor=4", "conv_dim=2"]),
    "ia3": ("lycoris.kohya", 4, 1, ["algo=ia3"]),
}


def run_outputs(unet, te):
    """test_tools_support.outputs for float32 or float64 models."""
    dt = next(unet.parameters()).dtype
    x, t, ctx, ids = inputs()
    with torch.no_grad():
        return unet(x.to(dt), t, encoder_hidden_states=ctx.to(dt)).sample, te(ids)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_merged_checkpoint_gives_the_outputs_of_the_network_at_that_ratio(case):
    model = base_model()
    net = random_network(model, *CASES[case], seed=1, scale=0.3 if case == "ia3" else 0.1)
    ratio = -0.6 if case == "lokr" else 0.7
    sd = tiny_sd()
    report = merge_into_state_dict(sd, [LoraInput(net.save_tensors(), ratio)])
    assert report.merged and not report.skipped
    merged = outputs(load_sd_model(sd))
    net.multiplier = ratio
    net.apply_to()
    try:
        live = outputs(model)
    finally:
        net.remove()
    base = outputs(model)
    # both float32 results within float32 rounding of the exact (float64) merge: the same on any CPU
    exact, bounds = merged_reference(run_outputs, model.unet, model.text_encoder, net.save_tensors(), ratio)
    for got, want, ref, x, bound, what in zip(merged, live, base, exact, bounds, ("unet", "text encoder")):
        assert not torch.allclose(want, ref, atol=1e-4), f"the {case} network changes nothing in the {what}"
        assert_within(got, x, bound, f"{case} merged {what}")
        assert_within(want, x, bound, f"{case} live {what}")


def test_dylora_merged_at_a_chosen_rank_equals_its_first_ranks_as_a_lora():
    model = base_model()
    dy = random_network(model, "networks.dylora", 8, 4, ["unit=2"], seed=2)
    sd = tiny_sd()
    merge_into_state_dict(sd, [LoraInput(dy.save_tensors(), 0.8, rank=4)])
    merged = outputs(load_sd_model(sd))
    # the same file read by the engine's own LoRA modules at rank 4: rows / columns 0..3, alpha kept (sd-scripts)
    lora = random_network(model, "networks.lora", 4, 4, [], seed=0)
    sliced = {}
    for name, w in split_by_module(dy.save_tensors()).items():
        sliced[f"{name}.lora_down.weight"] = w["lora_down.weight"][:4]
        sliced[f"{name}.lora_up.weight"] = w["lora_up.weight"][:, :4]
        sliced[f"{name}.alpha"] = w["alpha"]
    lora.load_tensors(sliced)
    lora.multiplier = 0.8
    lora.apply_to()
    try:
        want = outputs(model)
    finally:
        lora.remove()
    exact, bounds = merged_reference(run_outputs, model.unet, model.text_encoder, sliced, 0.8)
    for got, exp, x, bound in zip(merged, want, exact, bounds):
        assert_within(got, x, bound, "dylora rank 4 merged")
        assert_within(exp, x, bound, "dylora rank 4 as a lora")


def test_full_modules_add_their_weight_and_bias_differences():
    model = base_model()
    g = torch.Generator().manual_seed(4)
    from lib_lora_train.networks.targets import module_index
    index = {**module_index(model.unet, "unet"), **module_index(model.text_encoder, "text_encoder")}
    names = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_1_resnets_0_conv1",
             "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"]
    layers = {n: index[n] for n in names}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.diff"] = torch.randn(layer.weight.shape, generator=g) * 0.05
        if layer.bias is not None:
            tensors[f"{name}.diff_b"] = torch.randn(layer.bias.shape, generator=g) * 0.05
    sd = tiny_sd()
    merge_into_state_dict(sd, [LoraInput(tensors, 0.5)])
    merged = outputs(load_sd_model(sd))
    saved = {name: (l.weight.detach().clone(), None if l.bias is None else l.bias.detach().clone())
             for name, l in layers.items()}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.add_(0.5 * tensors[f"{name}.diff"])
                if layer.bias is not None:
                    layer.bias.add_(0.5 * tensors[f"{name}.diff_b"])
        want = outputs(model)
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.copy_(saved[name][0])
                if layer.bias is not None:
                    layer.bias.copy_(saved[name][1])
    for got, exp in zip(merged, want):
        assert_close(got, exp, rel=3e-5, what="full")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    model = base_model()
    base16 = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_sd().items()}
    save_checkpoint(d / "base.safetensors", base16, {"modelspec.title": "Tiny Base", "note": "kept"})
    a = random_network(model, "networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=2"], seed=5)
    b = random_network(model, "lycoris.kohya", 2, 1, ["algo=loha"], seed=6)
    save_network_file(d / "a.safetensors", a.save_tensors(), {"modelspec.title": "Alpha", "ss_output_name": "a",
                                                              "ss_tag_frequency": json.dumps({"1_x": {"cat": 2}})})
    save_network_file(d / "b.safetensors", b.save_tensors(), {"ss_network_module": "lycoris.kohya"})
    return d


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_merged_file_keeps_the_layout_precision_and_records_its_inputs(files):
    before = {p: _sha(files / p) for p in ("base.safetensors", "a.safetensors", "b.safetensors")}
    out = files / "merged.safetensors"
    res = merge_into_checkpoint(files / "base.safetensors",
                                [LoraInput(files / "a.safetensors", 1.0), LoraInput(files / "b.safetensors", -0.5)],
                                out, save_precision="fp16")
    assert {p: _sha(files / p) for p in before} == before, "an input changed"
    assert res.sha256 == _sha(out)
    with safe_open(str(files / "base.safetensors"), "pt") as f_in, safe_open(str(out), "pt") as f_out:
        assert set(f_in.keys()) == set(f_out.keys())
        meta = f_out.metadata()
        changed = set(res.report.changed_keys)
        for k in f_in.keys():
            t_in, t_out = f_in.get_tensor(k), f_out.get_tensor(k)
            assert t_out.dtype == t_in.dtype
            if k not in changed:
                assert torch.equal(t_in, t_out), k
        assert any(k.startswith("cond_stage_model.") for k in changed)
        assert any(k.startswith("model.diffusion_model.") for k in changed)
        assert not any(k.startswith("first_stage_model.") for k in changed)
    assert meta["modelspec.merged_from"] == "Tiny Base, Alpha, b"
    assert meta["modelspec.title"] == "merged" and meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["note"] == "kept"
    inputs = json.loads(meta["lib_lora_train.inputs"])
    assert [i["ratio"] for i in inputs] == [1.0, -0.5]
    assert inputs[0]["metadata"]["ss_output_name"] == "a"
    # bf16 / float on request
    res32 = merge_into_checkpoint(files / "base.safetensors", [files / "a.safetensors"], files / "m32.safetensors",
                                  save_precision="float", compute_hashes=False)
    with safe_open(str(res32.path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()} == {torch.float32}


def test_inputs_are_never_overwritten_and_outputs_only_on_request(files):
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge_into_checkpoint(files / "base.safetensors", [files / "a.safetensors"], files / "base.safetensors",
                              overwrite=True)
    with pytest.raises(ConfigError, match="one of the inputs"):
        merge_into_checkpoint(files / "base.safetensors", [files / "a.safetensors"], files / "a.safetensors")
    (files / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="exists"):
        merge_into_checkpoint(files / "base.safetensors", [files / "a.safetensors"], files / "exists.safetensors")


def test_stop_interrupts_before_anything_is_written(files):
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        merge_into_checkpoint(files / "base.safetensors", [files / "a.safetensors"], files / "stopped.safetensors",
                              stop=stop)
    assert not os.path.exists(files / "stopped.safetensors")
    assert not [p for p in os.listdir(files) if p.endswith(".tmp")]


def test_zero_block_ratios_leave_those_blocks_bit_identical():
    model = base_model()
    net = random_network(model, "networks.lora", 4, 4, ["conv_dim=2"], seed=7)
    sd = tiny_sd()
    weights = [1.0] * 26
    for name in ("IN01", "IN02", "IN04", "M00", "OUT05", "OUT11"):
        weights[["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]]
                .index(name)] = 0.0
    from lib_lora_train.tools.checkpoint import name_index
    index = name_index(list(sd))
    orig = dict(sd)
    merge_into_state_dict(sd, [LoraInput(net.save_tensors(), 1.0, ",".join(map(str, weights)))])
    for name in net.names:
        key = index[name].weight
        idx = lbw_index(name)
        if idx is not None and weights[idx] == 0.0:
            assert torch.equal(sd[key], orig[key]), name
        else:
            assert not torch.equal(sd[key], orig[key]), name
    # the 17-value preset form: MIDD leaves the text encoder (BASE = 1) changed and OUT blocks untouched
    sd2 = tiny_sd()
    merge_into_state_dict(sd2, [LoraInput(net.save_tensors(), 1.0, "MIDD")])
    te = index["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].weight
    out = index["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q"].weight
    assert not torch.equal(sd2[te], orig[te]) and torch.equal(sd2[out], orig[out])


def test_in_memory_merge_can_be_restored_and_keeps_the_legacy_text_encoder_layout():
    model = base_model()
    net = random_network(model, "networks.lora", 4, 4, [], seed=8)
    prefix = "cond_stage_model.transformer.text_model."
    sd = {(k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k): v
          for k, v in tiny_sd().items()}
    orig = dict(sd)
    backup = {}
    report = merge_into_state_dict(sd, [LoraInput(net.save_tensors(), 1.0)], backup=backup)
    assert set(sd) == set(orig)
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in report.changed_keys)
    assert set(backup) == set(report.changed_keys)
    sd.update(backup)
    assert all(sd[k] is orig[k] for k in orig)


def test_a_network_for_another_model_is_refused():
    sd = tiny_sd()
    tensors = {"lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q.lora_up.weight": torch.zeros(8, 2),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)}
    with pytest.raises(ModelError, match=r"SDXL LoRA but the model is an SD 1\.x checkpoint"):
        merge_into_state_dict(sd, [LoraInput(tensors)])
    wrong = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 7),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(9, 2)}
    with pytest.raises(ModelError, match="shape"):
        merge_into_state_dict(sd, [LoraInput(wrong)])
