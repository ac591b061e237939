"""The trained network's hooked forward pass equals its saved file merged into the base weights, for every type."""
import copy

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import apply_deltas, create_network, module_delta, network_config_from_args
from lib_lora_train.networks.delta import split_by_module
from numerics import assert_within, merged_reference
from tiny_diffusers import one_thread, run_te, run_unet, te_inputs, tiny_text_encoder, tiny_unet, unet_inputs


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


def build(dtype):
    unet, te = tiny_unet().to(dtype), tiny_text_encoder().to(dtype)
    ui = tuple(x.to(dtype) if x.is_floating_point() else x for x in unet_inputs())
    ti = te_inputs()
    return unet, te, ui, ti, run_unet(unet, ui), run_te(te, ti)


@pytest.fixture(scope="module")
def models():
    """float64 models: hooked and merged outputs then agree to ~1e-12, so any wrong scale or layout shows."""
    return build(torch.float64)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def randomise(net, seed=0, std=0.1):
    """Stand-in for training: every adapter weight random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def make(models, module, dim, alpha, args, **kw):
    unet, te = models[0], models[1]
    net = create_network(network_config_from_args(module, dim, alpha, args, **kw), unet, te)
    return net.to(unet.dtype)


def hooked_outputs(net, models):
    unet, te, ui, ti = models[:4]
    net.apply_to()
    try:
        return run_unet(unet, ui), run_te(te, ti)
    finally:
        net.remove()


def merged_outputs(tensors, models, multiplier=1.0):
    unet, te, ui, ti = models[:4]
    unet2, te2 = copy.deepcopy(unet), copy.deepcopy(te)
    n = len(apply_deltas(unet2, tensors, "unet", multiplier=multiplier))
    n += len(apply_deltas(te2, tensors, "text_encoder", multiplier=multiplier))
    assert n == len(split_by_module(tensors))
    return run_unet(unet2, ui), run_te(te2, ti)


CASES = {
    "lora": ("networks.lora", 4, 2, []),
    "locon": ("networks.lora", 4, 2, ["conv_dim=3", "conv_alpha=1.5"]),
    "locon-tucker": ("lycoris.kohya", 4, 2, ["algo=locon", "use_tucker=true", "preset=full"]),
    "loha": ("lycoris.kohya", 4, 2, ["algo=loha"]),
    "loha-tucker": ("lycoris.kohya", 4, 2, ["algo=loha", "use_tucker=true", "preset=unet-convblock-only"]),
    "lokr": ("lycoris.kohya", 2, 1, ["algo=lokr"]),
    "lokr-tucker": ("lycoris.kohya", 2, 1, ["algo=lokr", "use_tucker=true", "preset=unet-convblock-only"]),
    "lokr-both": ("lycoris.kohya", 1, 0.5, ["algo=lokr", "factor=8", "decompose_both=true", "preset=attn-mlp"]),
    "ia3": ("lycoris.kohya", 4, 1, ["algo=ia3"]),
    "dylora": ("networks.dylora", 4, 2, ["unit=2", "conv_dim=4"]),
    "lycoris-dylora": ("lycoris.kohya", 4, 2, ["algo=dylora", "block_size=2", "preset=full-lin"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hooked_forward_equals_saved_file_merged(models, case):
    net = randomise(make(models, *CASES[case]))
    base_u, base_t = models[4], models[5]
    hooked_u, hooked_t = hooked_outputs(net, models)
    tensors = net.save_tensors()
    merged_u, merged_t = merged_outputs(tensors, models)
    # the network really changes both models, and the file read back plainly gives the same change
    if not case.endswith("tucker"):
        assert (hooked_t - base_t).abs().max() > 1e-3
    assert (hooked_u - base_u).abs().max() > 1e-3
    close(hooked_u, merged_u)
    close(hooked_t, merged_t)
    # and at half strength
    net.multiplier = 0.5
    half_u, half_t = hooked_outputs(net, models)
    merged_u, merged_t = merged_outputs(tensors, models, multiplier=0.5)
    close(half_u, merged_u)
    close(half_t, merged_t)


@pytest.mark.parametrize("case", ["lora", "loha"])
def test_float32_forward_equals_merged(case):
    """In float32 the hooked network and the merged file both land within float32 rounding of the exact result.

    The exact result is the float64 base model merged with the file's tensors; the allowed distance is derived
    from float32's roundoff and this model's conditioning (tests/numerics.py), so it holds on any CPU. The
    latents are 16x16: at 8x8 the lowest UNet level is 1x1, where GroupNorm subtracts nearly equal numbers and
    amplifies rounding ~300-fold (a property of the tiny test model, not of the network code).
    """
    unet, te = tiny_unet(), tiny_text_encoder()
    g = torch.Generator().manual_seed(1)
    ui = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g))
    ti = te_inputs()
    models = (unet, te, ui, ti)
    net = randomise(make(models, *CASES[case]), std=0.05)
    tensors = net.save_tensors()
    hooked = hooked_outputs(net, models)
    merged = merged_outputs(tensors, models)

    def run(u, t):
        dt = next(u.parameters()).dtype
        return run_unet(u, tuple(x.to(dt) if x.is_floating_point() else x for x in ui)), run_te(t, ti)

    refs, bounds = merged_reference(run, unet, te, tensors)
    base = run(unet, te)
    for what, h, m, ref, bound, b in zip(("unet", "text encoder"), hooked, merged, refs, bounds, base):
        assert float((ref - b.double()).abs().max()) > 10 * bound, f"the {case} network changes the {what}"
        assert_within(h, ref, bound, f"{case} hooked {what}")
        assert_within(m, ref, bound, f"{case} merged {what}")


@pytest.mark.parametrize("case", ["lora", "locon", "loha", "lokr", "ia3", "dylora"])
def test_multiplier_zero_is_the_base_model_and_remove_restores(models, case):
    unet, te, ui, ti, base_u, base_t = models
    before = {id(m): (dict(m.__dict__), m.forward.__func__) for m in list(unet.modules()) + list(te.modules())}
    params_before = {k: v.clone() for k, v in list(unet.state_dict().items())[:50]}
    net = randomise(make(models, *CASES[case]))
    net.multiplier = 0.0
    assert all(a.multiplier == 0.0 for a in net.adapters.values())
    u, t = hooked_outputs(net, models)
    torch.testing.assert_close(u, base_u, rtol=0, atol=1e-6)
    torch.testing.assert_close(t, base_t, rtol=0, atol=1e-6)
    net.multiplier = 1.0
    net.apply_to()
    assert net.applied and "forward" in net._targets[net.names[0]].module.__dict__
    net.remove()
    assert not net.applied
    # outputs identical, no attribute left behind, weights untouched
    assert torch.equal(run_unet(unet, ui), base_u) and torch.equal(run_te(te, ti), base_t)
    for m in list(unet.modules()) + list(te.modules()):
        d, f = before[id(m)]
        assert m.__dict__.keys() == d.keys() and m.forward.__func__ is f
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in params_before.items())


def test_lora_bypass_and_rebuild_modes_agree(models):
    bypass = randomise(make(models, "networks.lora", 4, 2, ["conv_dim=3"]))
    assert all(a.bypass_mode for a in bypass.adapters.values())
    rebuild = make(models, "lycoris.kohya", 4, 2, ["algo=lora", "preset=c3lier", "conv_dim=3", "conv_alpha=1",
                                                   "bypass_mode=false"])
    assert rebuild.names == bypass.names and not any(a.bypass_mode for a in rebuild.adapters.values())
    rebuild.load_tensors(bypass.save_tensors())
    for a, b in zip(hooked_outputs(bypass, models), hooked_outputs(rebuild, models)):
        close(a, b)


@pytest.mark.parametrize("args", [["algo=loha"], ["algo=loha", "use_tucker=true"], ["algo=lokr"],
                                  ["algo=lokr", "use_tucker=true"], ["algo=ia3"]])
def test_lycoris_bypass_mode_agrees_with_rebuild_mode(models, args):
    bypass = randomise(make(models, "lycoris.kohya", 2, 1, args))
    rebuild = make(models, "lycoris.kohya", 2, 1, args + ["bypass_mode=false"])
    assert not any(a.bypass_mode for a in rebuild.adapters.values())
    assert any(a.bypass_mode for a in bypass.adapters.values())
    rebuild.load_tensors(bypass.save_tensors())
    for a, b in zip(hooked_outputs(bypass, models), hooked_outputs(rebuild, models)):
        close(a, b)


def test_alpha_scales_the_delta(models):
    full = randomise(make(models, "networks.lora", 4, 4, []))       # alpha = dim: scale 1
    half = make(models, "networks.lora", 4, 2, [])                    # alpha = dim/2: scale 0.5
    half.load_tensors({k: v for k, v in full.save_tensors().items() if not k.endswith(".alpha")}, strict=False)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = full._targets[name].module
    x = torch.randn(3, layer.in_features, dtype=layer.weight.dtype)
    with torch.no_grad():
        base = layer(x)
        deltas = []
        for net in (full, half):
            net.apply_to()
            deltas.append(layer(x) - base)
            net.remove()
    torch.testing.assert_close(deltas[1], deltas[0] * 0.5, rtol=1e-5, atol=1e-6)
    w = split_by_module(half.save_tensors())[name]
    assert float(w["alpha"]) == 2.0
    torch.testing.assert_close(module_delta(w, layer.weight), (w["lora_up.weight"] @ w["lora_down.weight"]) * 0.5)
    # alpha 0 means alpha = dim
    zero = make(models, "networks.lora", 4, 0, [])
    assert float(zero.save_tensors()[name + ".alpha"]) == 4.0


def test_through_lycoris_own_loader(models):
    """A LoRA / LoCon / LoHa / LoKr file loads into lycoris-lora (kohya loader, explicit preset) and acts the same."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    unet, te, ui, ti = models[:4]
    saved = {k: getattr(LycorisNetworkKohya, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE",
                                                          "UNET_TARGET_REPLACE_NAME",
                                                          "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                                                          "TEXT_ENCODER_TARGET_REPLACE_NAME")}
    # the default "full" preset wraps time_embedding twice on a diffusers UNet; this avoids it
    LycorisNetworkKohya.apply_preset({"unet_target_module": ["Transformer2DModel"], "unet_target_name": []})
    try:
        # (lycoris 4.1.3 cannot reload its own LoKr files on k×k convs: see test_networks_upstream.py)
        for case in ("lora", "locon", "loha", "lokr-both", ("lycoris.kohya", 2, 1, ["algo=lokr", "preset=attn-mlp"])):
            net = randomise(make(models, *(CASES[case] if isinstance(case, str) else case)), seed=3)
            ours = hooked_outputs(net, models)
            unet2, te2 = copy.deepcopy(unet), copy.deepcopy(te)
            holder = te2
            if not hasattr(te2, "text_model"):          # transformers >= 5.6: give lycoris the text_model level
                holder = torch.nn.Module()
                holder.text_model = te2
            lyco, _ = create_network_from_weights(1.0, None, None, holder, unet2, weights_sd=net.save_tensors())
            assert len(lyco.unet_loras) + len(lyco.text_encoder_loras) == len(net.names)
            lyco.apply_to(holder, unet2, apply_text_encoder=True, apply_unet=True)
            theirs = run_unet(unet2, ui), run_te(te2, ti)
            for a, b in zip(ours, theirs):      # lycoris keeps float32 weights: float32 precision
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetworkKohya, k, v)


@pytest.mark.parametrize("train_unet, train_te", [(True, False), (False, True)])
def test_excluded_part_gets_no_modules(models, train_unet, train_te):
    net = make(models, "networks.lora", 4, 1, ["conv_dim=2"], train_unet=train_unet, train_text_encoder=train_te)
    prefixes = {n.split("_")[1] for n in net.names}
    assert prefixes == ({"unet"} if train_unet else {"te"})
    assert all(k.startswith("lora_unet_" if train_unet else "lora_te_") for k in net.save_tensors())
    groups = net.param_groups(1e-4, 5e-5, 1e-3)
    assert [g["name"] for g in groups] == (["unet"] if train_unet else ["text_encoder"])


def test_param_groups(models):
    net = make(models, "networks.lora", 4, 1, [])
    groups = net.param_groups(None, 5e-5, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("text_encoder", 5e-5), ("unet", 1e-3)]
    n_te = sum(p.numel() for a in net.names_for("text_encoder") for p in net.adapters[a].parameters())
    assert sum(p.numel() for p in groups[0]["params"]) == n_te
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    groups = net.param_groups(2e-4, 0, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 2e-4)]
    assert not any(p.requires_grad for a in net.names_for("text_encoder") for p in net.adapters[a].parameters())
    assert all(p.requires_grad for a in net.names_for("unet") for p in net.adapters[a].parameters())
    with pytest.raises(ConfigError, match="learning rate"):
        net.param_groups(None, None, None)


def test_before_step_is_a_no_op_without_dylora(models):
    net = randomise(make(models, "networks.lora", 4, 1, []))
    before = net.save_tensors()
    net.before_step(torch.Generator().manual_seed(0))
    after = net.save_tensors()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
