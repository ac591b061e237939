"""File tensors (keys, shapes, dtypes), loading them back, DyLoRA chunk training and dropout semantics."""
import math

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import create_network, network_config_from_args
from lib_lora_train.networks.delta import split_by_module
from tiny_diffusers import one_thread, tiny_text_encoder, tiny_unet


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_text_encoder()


def make(models, module, dim, alpha, args, **kw):
    return create_network(network_config_from_args(module, dim, alpha, args, **kw), *models)


def randomise(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def layer_shape(net, name):
    m = net._targets[name].module
    if isinstance(m, torch.nn.Linear):
        return m.out_features, m.in_features, None
    return m.out_channels, m.in_channels, tuple(m.kernel_size)


@pytest.mark.parametrize("module, args", [("networks.lora", ["conv_dim=3", "conv_alpha=1.5"]),
                                          ("networks.dylora", ["unit=2", "conv_dim=4"])])
def test_lora_file_keys_and_shapes_are_sd_scripts(models, module, args):
    net = make(models, module, 4, 2, args)
    tensors = net.save_tensors(torch.float16)
    assert set(tensors) == {f"{n}.{k}" for n in net.names for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, w in split_by_module(tensors).items():
        out_dim, in_dim, kernel = layer_shape(net, name)
        r = 3 if module == "networks.lora" and kernel not in (None, (1, 1)) else 4
        if kernel is None:
            assert w["lora_down.weight"].shape == (r, in_dim) and w["lora_up.weight"].shape == (out_dim, r)
        else:
            assert w["lora_down.weight"].shape == (r, in_dim, *kernel)
            assert w["lora_up.weight"].shape == (out_dim, r, 1, 1)
        assert w["alpha"].dim() == 0 and w["alpha"].dtype == torch.float16
        assert float(w["alpha"]) == (1.5 if r == 3 else 2.0)
        assert all(t.dtype == torch.float16 and t.is_contiguous() for t in w.values())
    # lora_up starts at zero (the network starts as the base model), lora_down does not
    assert all(not tensors[f"{n}.lora_up.weight"].any() for n in net.names)
    assert all(tensors[f"{n}.lora_down.weight"].any() for n in net.names)


def test_lycoris_file_keys(models):
    keys = lambda net: {k.split(".", 1)[1] for k in net.save_tensors()}      # noqa: E731
    assert keys(make(models, "lycoris.kohya", 4, 1, ["algo=loha", "preset=attn-mlp"])) == {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert keys(make(models, "lycoris.kohya", 4, 1, ["algo=loha", "use_tucker=true", "preset=unet-convblock-only"])
                ) >= {"hada_t1", "hada_t2"}
    assert keys(make(models, "lycoris.kohya", 2, 1, ["algo=lokr", "preset=attn-mlp"])) == {
        "lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
    ia3 = make(models, "lycoris.kohya", 4, 1, ["algo=ia3"])
    assert keys(ia3) == {"weight", "on_input"}
    t = ia3.save_tensors(torch.float16)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc2"
    assert t[name + ".on_input"].item() == 1 and t[name + ".weight"].shape == (64,)     # fc2 in_features
    assert t["lora_te_text_model_encoder_layers_0_self_attn_k_proj.on_input"].item() == 0
    # use_scalar adds a trainable scalar but no file key: it is folded into the saved weights
    scalar = make(models, "lycoris.kohya", 4, 1, ["algo=lora", "use_scalar=true", "preset=attn-mlp"])
    assert keys(scalar) == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_load_tensors_round_trip_and_errors(models):
    src = randomise(make(models, "networks.lora", 4, 2, ["conv_dim=2"]))
    dst = make(models, "networks.lora", 4, 2, ["conv_dim=2"])
    saved = src.save_tensors()
    dst.load_tensors(saved)
    assert all(torch.equal(v, dst.save_tensors()[k]) for k, v in list(saved.items())[:40])
    # fp16 file: alphas fit at file precision, weights arrive rounded
    dst.load_tensors(src.save_tensors(torch.float16))
    torch.testing.assert_close(dst.save_tensors()[next(iter(saved))], next(iter(saved.values())), rtol=1e-3,
                               atol=1e-3)

    fresh = make(models, "networks.lora", 4, 2, ["conv_dim=2"])
    before = fresh.save_tensors()

    def unchanged():
        after = fresh.save_tensors()
        return all(torch.equal(v, after[k]) for k, v in before.items())

    other_dim = make(models, "networks.lora", 8, 2, ["conv_dim=2"]).save_tensors()
    with pytest.raises(ConfigError, match="shape mismatches"):
        fresh.load_tensors(other_dim)
    with pytest.raises(ConfigError, match="shape mismatches"):
        fresh.load_tensors(other_dim, strict=False)
    missing = dict(list(saved.items())[3:])
    with pytest.raises(ConfigError, match="3 missing keys"):
        fresh.load_tensors(missing)
    with pytest.raises(ConfigError, match="unexpected keys.*lora_unet_foo"):
        fresh.load_tensors({**saved, "lora_unet_foo.alpha": torch.tensor(1.0)})
    other_alpha = make(models, "networks.lora", 4, 1, ["conv_dim=2"]).save_tensors()
    with pytest.raises(ConfigError, match="different alpha"):
        fresh.load_tensors(other_alpha)
    assert unchanged()
    # non-strict: present layers load, the file's alpha is taken over
    fresh.load_tensors({**missing, "lora_unet_foo.alpha": torch.tensor(1.0)}, strict=False)
    after = fresh.save_tensors()
    assert all(torch.equal(after[k], v) for k, v in missing.items())
    fresh.load_tensors(other_alpha, strict=False)
    name = fresh.names[0]
    assert float(fresh.save_tensors()[name + ".alpha"]) == 1.0 and fresh.adapters[name].scale == 1.0 / 4


def test_load_tensors_lycoris_and_dylora(models):
    for module, args in [("lycoris.kohya", ["algo=loha", "preset=attn-mlp"]),
                         ("lycoris.kohya", ["algo=lokr", "preset=attn-mlp", "use_scalar=true"]),
                         ("lycoris.kohya", ["algo=ia3"]), ("networks.dylora", ["unit=2"])]:
        src = randomise(make(models, module, 2, 1, args))
        dst = make(models, module, 2, 1, args)
        dst.load_tensors(src.save_tensors())
        a, b = src.save_tensors(), dst.save_tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- DyLoRA
def dylora_layer(models, dim=6, unit=2, alpha=3.0):
    net = randomise(make(models, "networks.dylora", dim, alpha, [f"unit={unit}"]))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return net, name, net.adapters[name], net._targets[name].module


def test_dylora_trains_only_the_picked_chunk(models):
    net, name, ad, layer = dylora_layer(models)
    net.train()
    groups = net.param_groups(1e-3, 1e-3, 1e-3)
    seen = set()
    for step in range(6):
        net.before_step(torch.Generator().manual_seed(step))
        b = ad.chunk_start
        seen.add(b)
        assert all(a.chunk_start == b for a in net.adapters.values())    # one chunk for the whole network
        net.zero_grad(set_to_none=True)
        net.apply_to()
        x = torch.randn(2, 5, layer.in_features)
        layer(x).square().sum().backward()
        net.remove()
        for i, (d, u) in enumerate(zip(ad.down_chunks, ad.up_chunks)):
            if i == b // 2:
                assert d.grad is not None and d.grad.abs().sum() > 0 and u.grad.abs().sum() > 0
            else:
                assert d.grad is None and u.grad is None
    assert len(seen) > 1 and seen <= {0, 2, 4}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_dylora_training_forward_uses_ranks_up_to_the_chunk_with_sqrt_scale(models):
    net, name, ad, layer = dylora_layer(models)
    x = torch.randn(3, layer.in_features)
    down, up = ad.full_weights()
    net.apply_to()
    try:
        with torch.no_grad():
            base = ad.org_forward(x)
            net.train()
            for b in (0, 2, 4):
                ad.set_chunk(b)
                r = b + 2
                expect = base + (x @ down[:r].t() @ up[:, :r].t()) * (3.0 / 6) * math.sqrt(6 / r)
                torch.testing.assert_close(layer(x), expect)
            # ranks beyond the chunk are unused: changing them changes nothing
            ad.set_chunk(2)
            y = layer(x)
            ad.down_chunks[2].add_(1.0)
            torch.testing.assert_close(layer(x), y)
            ad.down_chunks[0].add_(1.0)          # ranks below the chunk are used
            assert not torch.allclose(layer(x), y)
            # eval: full rank, scale alpha/dim: the file read as a plain LoRA; equals training at the last chunk
            down, up = ad.full_weights()
            net.eval()
            full = layer(x)
            torch.testing.assert_close(full, base + (x @ down.t() @ up.t()) * 0.5)
            net.train()
            ad.set_chunk(4)
            torch.testing.assert_close(layer(x), full)
    finally:
        net.remove()


def test_dylora_frozen_part_stays_frozen(models):
    net = make(models, "networks.dylora", 4, 1, ["unit=2"])
    net.param_groups(1e-3, 0, None)
    net.before_step(torch.Generator().manual_seed(1))
    te = net.names_for("text_encoder")
    assert not any(p.requires_grad for n in te for p in net.adapters[n].parameters())
    assert any(p.requires_grad for n in net.names_for("unet") for p in net.adapters[n].parameters())


# ---------------------------------------------------------------------------------------------------- dropout
def lora_layer(models, args, network_dropout=None):
    net = randomise(make(models, "networks.lora", 4, 2, args, network_dropout=network_dropout))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return net, net.adapters[name], net._targets[name].module


def test_rank_dropout_is_sd_scripts_semantics(models):
    net, ad, layer = lora_layer(models, ["rank_dropout=0.5"])
    x = torch.randn(3, 5, layer.in_features)
    down, up = ad.lora_down.weight, ad.lora_up.weight
    net.apply_to()
    try:
        with torch.no_grad():
            base = ad.org_forward(x)
            eval_out = layer(x)       # eval mode: no dropout
            torch.testing.assert_close(eval_out, base + x @ down.t() @ up.t() * 0.5)
            net.train()
            torch.manual_seed(7)
            out = layer(x)
            torch.manual_seed(7)
            mask = (torch.rand(3, 4) > 0.5).unsqueeze(1)      # per sample and rank, drawn from torch's RNG
            expect = base + ((x @ down.t()) * mask) @ up.t() * (0.5 / (1 - 0.5))
            torch.testing.assert_close(out, expect)
    finally:
        net.remove()


def test_neuron_and_module_dropout(models):
    net, ad, layer = lora_layer(models, [], network_dropout=0.5)
    x = torch.randn(3, 5, layer.in_features)
    down, up = ad.lora_down.weight, ad.lora_up.weight
    net.apply_to()
    try:
        with torch.no_grad():
            base = ad.org_forward(x)
            net.train()
            torch.manual_seed(3)
            out = layer(x)
            torch.manual_seed(3)
            expect = base + torch.nn.functional.dropout(x @ down.t(), p=0.5) @ up.t() * 0.5
            torch.testing.assert_close(out, expect)
    finally:
        net.remove()
    net, ad, layer = lora_layer(models, ["module_dropout=0.5"])
    net.apply_to()
    try:
        with torch.no_grad():
            base = ad.org_forward(x)
            net.train()
            skipped = 0
            for seed in range(20):
                torch.manual_seed(seed)
                skip = bool(torch.rand(1) < 0.5)
                torch.manual_seed(seed)
                out = layer(x)
                assert torch.equal(out, base) == skip
                skipped += skip
            assert 0 < skipped < 20
    finally:
        net.remove()
