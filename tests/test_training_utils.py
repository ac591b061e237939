"""Optimizers, lr schedules, noise/loss helpers and resumable state (lib_lora_train.training)."""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lib_lora_train.errors import ConfigError
from lib_lora_train.training import noise as N
from lib_lora_train.training import state as S
from lib_lora_train.training.optim import make_optimizer, parse_optimizer_args
from lib_lora_train.training.schedulers import make_scheduler, resolve_warmup_steps

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module, lr_a: float, lr_b: float) -> list[dict]:
    return [{"params": list(model[0].parameters()), "lr": lr_a, "name": "te"},
            {"params": list(model[2].parameters()), "lr": lr_b, "name": "unet"}]


def _train_step(model, optimizer, scheduler, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)  # step data from (seed, step), as the trainer does
    x = torch.randn(4, 6, generator=g)
    y = torch.randn(4, 3, generator=g)
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()


def _ddpm() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ---------------------------------------------------------------- optimizers

@pytest.mark.parametrize("name,lr,cls_path", [
    ("", 1e-3, "torch.optim.adamw.AdamW"),
    ("adamw", 1e-3, "torch.optim.adamw.AdamW"),
    ("Lion", 1e-4, "lion_pytorch.lion_pytorch.Lion"),
    ("SGDNesterov", 1e-2, "torch.optim.sgd.SGD"),
    ("Prodigy", 1.0, "prodigyopt.prodigy.Prodigy"),
    ("DAdaptAdam", 1.0, "dadaptation.dadapt_adam.DAdaptAdam"),
    ("DAdaptation", 1.0, "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    ("Adafactor", 1e-3, "transformers.optimization.Adafactor"),
])
def test_each_optimizer_builds_and_steps(name, lr, cls_path):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt, desc = make_optimizer(name, _groups(model, lr, lr), lr, None)
    assert desc.split("(")[0] == cls_path
    sched = make_scheduler("constant", opt, num_training_steps=10)
    for s in range(3):
        _train_step(model, opt, sched, s)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), f"{name} did not move any parameter"


def test_descriptions_match_sd_scripts_format():
    m = _model()
    _, desc = make_optimizer("AdamW", _groups(m, 1e-3, 1e-3), 1e-3, ["weight_decay=0.1"])
    assert desc == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    opt, desc = make_optimizer("AdamW", _groups(m, 1e-3, 1e-3), 1e-3, ["weight_decay=0.01", "betas=0.9,0.99"])
    assert desc == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[1]["weight_decay"] == 0.01
    opt, desc = make_optimizer("sgdnesterov", _groups(m, 1e-2, 1e-2), 1e-2, None)
    assert desc == "torch.optim.sgd.SGD(momentum=0.9)"
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_optimizer_args_parsing():
    assert parse_optimizer_args(None) == {}
    assert parse_optimizer_args(["decouple=True", "d_coef=2", " use_bias_correction = False "]) == \
        {"decouple": True, "d_coef": 2, "use_bias_correction": False}
    assert parse_optimizer_args(["betas=0.9,0.99"]) == {"betas": (0.9, 0.99)}
    assert parse_optimizer_args(["mode='fast'"]) == {"mode": "fast"}
    assert parse_optimizer_args({"weight_decay": 0.5}) == {"weight_decay": 0.5}
    with pytest.raises(ConfigError, match="Python literal"):
        parse_optimizer_args(["mode=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_optimizer_args(["weight_decay"])


def test_unknown_argument_and_name_get_suggestions():
    m = _model()
    with pytest.raises(ConfigError, match="did you mean 'weight_decay'"):
        make_optimizer("AdamW", _groups(m, 1e-3, 1e-3), 1e-3, ["weight_decy=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'Prodigy'"):
        make_optimizer("Prodigi", _groups(m, 1.0, 1.0), 1.0, None)
    with pytest.raises(ConfigError, match="did you mean 'AdamW8bit'"):
        make_optimizer("AdamW_8bit", _groups(m, 1e-3, 1e-3), 1e-3, None)
    with pytest.raises(ConfigError, match="did you mean 'betas'"):
        make_optimizer("Lion", _groups(m, 1e-4, 1e-4), 1e-4, ["beta=0.9,0.99"])


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed here")
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "pagedadamw8bit"])
def test_8bit_optimizers_refuse_clearly_without_bitsandbytes(name):
    with pytest.raises(ConfigError) as e:
        make_optimizer(name, _groups(_model(), 1e-3, 1e-3), 1e-3, None)
    msg = str(e.value)
    assert "bitsandbytes" in msg and "never installs" in msg and "AdamW or Lion" in msg


@pytest.mark.parametrize("name", ["DAdaptAdam", "DAdaptation", "Prodigy"])
def test_adaptive_optimizers_refuse_differing_group_lrs(name):
    m = _model()
    with pytest.raises(ConfigError, match="different learning rates"):
        make_optimizer(name, _groups(m, 1.0, 0.5), 1.0, None)
    opt, _ = make_optimizer(name, _groups(m, 1.0, 0.0), 1.0, None)  # a frozen group is fine
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.0]


def test_adafactor_rules(caplog):
    m = _model()
    groups = _groups(m, 1e-3, 2e-3)
    with caplog.at_level(logging.WARNING):
        opt, desc = make_optimizer("Adafactor", groups, 1e-3, None)
    assert desc == "transformers.optimization.Adafactor(relative_step=True)"
    assert all(g["lr"] is None for g in opt.param_groups)
    assert groups[0]["lr"] == 1e-3, "the caller's groups must not be modified"
    assert "initial lr" in caplog.text and "ignores unet_lr" in caplog.text
    # warmup_init forces relative_step back on, as in sd-scripts
    _, desc = make_optimizer("Adafactor", _groups(m, 1e-3, 1e-3), 1e-3, ["relative_step=False", "warmup_init=True"])
    assert "relative_step=True" in desc
    opt, desc = make_optimizer("Adafactor", _groups(m, 1e-3, 2e-3), 1e-3, ["relative_step=False"])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 2e-3]
    with pytest.raises(ConfigError, match="relative_step=True"):
        make_scheduler("adafactor", opt, num_training_steps=10)


# ---------------------------------------------------------------- schedulers

def _lr_curve(name, steps, *, base=0.5, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = make_scheduler(name, opt, num_training_steps=steps, **kw)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name,kw,expect", [
    ("constant", {}, lambda s, T: 1.0),
    ("constant_with_warmup", {"num_warmup_steps": 4}, lambda s, T: min(1.0, s / 4)),
    ("constant_with_warmup", {"num_warmup_steps": 0.25}, lambda s, T: min(1.0, s / 5)),  # int(0.25 * 20)
    ("linear", {"num_warmup_steps": 2}, lambda s, T: s / 2 if s < 2 else max(0.0, (T - s) / (T - 2))),
    ("cosine", {}, lambda s, T: 0.5 * (1 + math.cos(math.pi * s / T))),
    ("cosine", {"num_warmup_steps": 0.1}, lambda s, T: s / 2 if s < 2 else  # int(0.1 * 20) = 2 warmup steps
     0.5 * (1 + math.cos(math.pi * (s - 2) / 18))),
    ("cosine_with_restarts", {"num_cycles": 4}, lambda s, T: 0.0 if s >= T else
     0.5 * (1 + math.cos(math.pi * ((4 * s / T) % 1.0)))),
    ("polynomial", {"power": 2.0}, lambda s, T: ((0.5 - 1e-7) * (1 - s / T) ** 2 + 1e-7) / 0.5),
])
def test_schedule_curves_match_closed_forms(name, kw, expect):
    total = 20
    lrs = _lr_curve(name, total, **kw)
    for s in range(total + 1):
        assert lrs[s] == pytest.approx(0.5 * expect(s, total), rel=1e-12, abs=1e-15), (name, s)
    if name == "cosine_with_restarts":
        assert lrs[5] == pytest.approx(0.5) and lrs[4] < 0.1, "restart every 5 steps"


@pytest.mark.parametrize("name,kw", [("linear", {"num_warmup_steps": 3}), ("cosine", {"num_warmup_steps": 3}),
                                     ("cosine_with_restarts", {"num_warmup_steps": 2, "num_cycles": 3}),
                                     ("polynomial", {"num_warmup_steps": 2, "power": 1.5}),
                                     ("constant_with_warmup", {"num_warmup_steps": 5})])
def test_schedules_equal_the_library_versions_sd_scripts_uses(name, kw):
    from diffusers.optimization import get_scheduler
    total = 17
    ours = _lr_curve(name, total, **kw)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    lib = get_scheduler(name, opt, num_warmup_steps=kw.get("num_warmup_steps"), num_training_steps=total,
                        num_cycles=kw.get("num_cycles", 1), power=kw.get("power", 1.0))
    theirs = []
    for _ in range(total + 1):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        lib.step()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)


def test_scheduler_refusals_and_warmup_rule():
    assert resolve_warmup_steps(0.1, 15) == 1 and resolve_warmup_steps(7, 15) == 7
    assert resolve_warmup_steps(3.0, 15) == 3
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        _lr_curve("constant", 10, num_warmup_steps=2)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        _lr_curve("constant", 10, num_warmup_steps=0.5)
    with pytest.raises(ConfigError, match="not supported"):
        _lr_curve("inverse_sqrt", 10)
    with pytest.raises(ConfigError, match="unknown schedule"):
        _lr_curve("cosinus", 10)
    with pytest.raises(ConfigError, match=">= 0"):
        _lr_curve("linear", 10, num_warmup_steps=-1)
    with pytest.raises(ConfigError, match="only works with optimizer_type Adafactor"):
        _lr_curve("adafactor", 10)


def test_adafactor_relative_step_gets_its_proxy_schedule(caplog):
    m = _model()
    opt, _ = make_optimizer("Adafactor", _groups(m, 1e-3, 1e-3), 1e-3, None)
    with caplog.at_level(logging.WARNING):
        sched = make_scheduler("cosine", opt, num_training_steps=10)
    assert type(sched).__name__ == "AdafactorSchedule" and "replaced by 'adafactor'" in caplog.text
    assert sched.get_last_lr() == [1e-3, 1e-3]
    with pytest.raises(ConfigError, match="lr_warmup_steps = 0"):
        make_scheduler("adafactor", opt, num_training_steps=10, num_warmup_steps=2)


# ---------------------------------------------------------------- resume round trip

@pytest.mark.parametrize("opt_name,lr,sched_name,opt_args", [
    ("AdamW", 1e-2, "cosine_with_restarts", ["weight_decay=0.05"]),
    ("Prodigy", 1.0, "linear", None),
    ("Lion", 1e-3, "polynomial", None),
    ("Adafactor", 1e-3, "adafactor", None),
    ("DAdaptAdam", 1.0, "constant_with_warmup", None),
])
def test_resume_continues_bit_identically(tmp_path, opt_name, lr, sched_name, opt_args):
    def build():
        model = _model(seed=3)
        opt, _ = make_optimizer(opt_name, _groups(model, lr, lr), lr, opt_args)
        sched = make_scheduler(sched_name, opt, num_training_steps=8,
                               num_warmup_steps=0 if sched_name == "adafactor" else 2, num_cycles=2)
        return model, opt, sched

    model, opt, sched = build()
    for s in range(4):
        _train_step(model, opt, sched, s)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = build()
    for s in range(2):
        _train_step(model, opt, sched, s)
    S.save_train_state(tmp_path / "run-000001-state", network_tensors=model.state_dict(), optimizer=opt,
                       scheduler=sched, epoch=1, global_step=2, extra={"note": "x"})
    model, opt, sched = build()
    state = S.load_train_state(tmp_path / "run-000001-state")
    S.restore_into(state, model, opt, sched)
    assert (state.epoch, state.global_step, state.extra) == (1, 2, {"note": "x"})
    for s in range(2, 4):
        _train_step(model, opt, sched, s)
    resumed = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


# ---------------------------------------------------------------- noise, targets, weights, losses

def _latents(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.7 + 0.3


def test_noise_offset_matches_hand_computation():
    lat = _latents()
    got = N.sample_noise(lat, torch.Generator().manual_seed(5), noise_offset=0.1)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 8, 8, generator=g)
    assert torch.allclose(got, base + 0.1 * torch.randn(2, 4, 1, 1, generator=g), atol=0, rtol=0)

    got = N.sample_noise(lat, torch.Generator().manual_seed(5), noise_offset=0.1, adaptive_noise_scale=0.5,
                         noise_offset_random_strength=True)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 8, 8, generator=g)
    strength = torch.rand(1, generator=g).item() * 0.1
    offset = (strength + 0.5 * lat.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    assert torch.allclose(got, base + offset * torch.randn(2, 4, 1, 1, generator=g), atol=1e-7)
    plain = N.sample_noise(lat, torch.Generator().manual_seed(5))
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)))


def test_noise_is_deterministic_per_generator():
    lat = _latents()
    kw = dict(noise_offset=0.05, noise_offset_random_strength=True, multires_noise_iterations=6,
              multires_noise_discount=0.3)
    a = N.sample_noise(lat, torch.Generator().manual_seed(11), **kw)
    b = N.sample_noise(lat, torch.Generator().manual_seed(11), **kw)
    c = N.sample_noise(lat, torch.Generator().manual_seed(12), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == lat.shape and a.std().item() == pytest.approx(1.0, abs=1e-5)  # pyramid renormalises
    state = torch.get_rng_state()
    N.sample_noise(lat, torch.Generator().manual_seed(11), **kw)
    N.sample_timesteps(3, torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state()), "the global torch RNG must not be used"


def test_timesteps_and_ip_noise():
    t = N.sample_timesteps(500, torch.Generator().manual_seed(1), min_timestep=100, max_timestep=200)
    assert t.dtype == torch.long and int(t.min()) >= 100 and int(t.max()) < 200 and len(set(t.tolist())) > 50
    assert torch.equal(t, N.sample_timesteps(500, torch.Generator().manual_seed(1), min_timestep=100,
                                             max_timestep=200))
    assert N.sample_timesteps(3, torch.Generator(), min_timestep=7, max_timestep=7).tolist() == [7, 7, 7]
    with pytest.raises(ConfigError):
        N.sample_timesteps(3, torch.Generator(), min_timestep=9, max_timestep=7)
    noise = _latents(1)
    got = N.ip_noise(noise, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(got, noise + 0.1 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_targets_snr_and_weights_match_hand_computations():
    sch = _ddpm()
    ac = sch.alphas_cumprod
    lat, noise = _latents(2), _latents(3)
    t = torch.tensor([0, 999])
    assert N.target_for(sch, lat, noise, t, "epsilon") is noise
    v = N.target_for(sch, lat, noise, t, "v_prediction")
    hand_v = ac[t].sqrt().view(-1, 1, 1, 1) * noise - (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * lat
    assert torch.allclose(v, hand_v, atol=1e-6)
    with pytest.raises(ConfigError):
        N.target_for(sch, lat, noise, t, "sample")

    t = torch.tensor([10, 300, 900])
    snr = ac[t] / (1 - ac[t])
    assert torch.allclose(N.snr(sch, t), snr, rtol=1e-5)
    assert snr[0] > 5 > snr[2]
    eps_w = N.loss_weights_min_snr(t, sch, 5.0, "epsilon")
    assert torch.allclose(eps_w, torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-5)
    assert eps_w[2].item() == pytest.approx(1.0) and eps_w[0].item() < 0.1
    v_w = N.loss_weights_min_snr(t, sch, 5.0, "v_prediction")
    assert torch.allclose(v_w, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-5)
    assert torch.allclose(N.debiased_weights(t, sch, "epsilon"), 1 / snr.clamp(max=1000).sqrt(), rtol=1e-5)
    assert torch.allclose(N.debiased_weights(t, sch, "v_prediction"), 1 / (snr.clamp(max=1000) + 1), rtol=1e-5)
    assert torch.allclose(N.v_pred_like_noise_weights(t, sch), snr / (snr + 1), rtol=1e-5)


def test_min_snr_with_zero_terminal_snr_has_no_nan():
    sch = _ddpm()
    sch.alphas_cumprod = sch.alphas_cumprod.clone()
    sch.alphas_cumprod[-1] = 0.0
    w = N.loss_weights_min_snr(torch.tensor([999, 500]), sch, 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[0].item() == 1.0


def test_losses_per_sample_and_huber_schedules():
    pred, target = _latents(4), _latents(5)
    l2 = N.compute_loss(pred, target)
    assert l2.shape == (2,)
    assert torch.allclose(l2, F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
    assert torch.allclose(N.compute_loss(pred, target, loss_type="l1"), (pred - target).abs().mean(dim=(1, 2, 3)))
    c = torch.tensor([0.1, 0.5])
    d = pred - target
    hub = 2 * c.view(-1, 1, 1, 1) * ((d ** 2 + c.view(-1, 1, 1, 1) ** 2).sqrt() - c.view(-1, 1, 1, 1))
    assert torch.allclose(N.compute_loss(pred, target, loss_type="huber", huber_c=c), hub.mean(dim=(1, 2, 3)))
    sl1 = 2 * ((d ** 2 + 0.1 ** 2).sqrt() - 0.1)
    assert torch.allclose(N.compute_loss(pred, target, loss_type="smooth_l1", huber_c=0.1), sl1.mean(dim=(1, 2, 3)))
    with pytest.raises(ConfigError):
        N.compute_loss(pred, target, loss_type="huber")
    with pytest.raises(ConfigError):
        N.compute_loss(pred, target, loss_type="l3")
    # per-sample weights then the batch mean, as the trainer does with prior_loss_weight
    weights = torch.tensor([1.0, 0.25])
    assert (l2 * weights).mean().item() == pytest.approx((l2[0] + 0.25 * l2[1]).item() / 2)

    sch = _ddpm()
    t = torch.tensor([0, 500, 1000 - 1])
    assert torch.allclose(N.huber_threshold(t, sch, huber_schedule="constant", huber_c=0.1, huber_scale=2.0),
                          torch.full((3,), 0.2))
    expo = N.huber_threshold(t, sch, huber_schedule="exponential", huber_c=0.1, huber_scale=1.0)
    assert expo[0].item() == pytest.approx(1.0) and expo[2].item() == pytest.approx(0.1 ** (999 / 1000), rel=1e-5)
    ac = sch.alphas_cumprod[t]
    sigma = ((1 - ac) / ac).sqrt()
    assert torch.allclose(N.huber_threshold(t, sch, huber_schedule="snr", huber_c=0.1),
                          0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-5)
    with pytest.raises(ConfigError):
        N.huber_threshold(t, sch, huber_schedule="cosine")
    # the scheduled form computes the per-sample threshold itself; l2 ignores the huber arguments
    p3, t3 = _latents(6)[:1].repeat(3, 1, 1, 1), _latents(7)[:1].repeat(3, 1, 1, 1)
    c3 = N.huber_threshold(t, sch, huber_schedule="snr", huber_c=0.1)
    assert torch.equal(N.compute_loss(p3, t3, loss_type="huber", huber_c=0.1, huber_schedule="snr", timesteps=t,
                                      scheduler=sch), N.compute_loss(p3, t3, loss_type="huber", huber_c=c3))
    assert torch.equal(N.compute_loss(p3, t3, huber_c=0.1, huber_schedule="snr", timesteps=t, scheduler=sch),
                       N.compute_loss(p3, t3))


# ---------------------------------------------------------------- saved state

def _tiny_state(tmp_path, name="run-state", step=2, value=1.0):
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = make_scheduler("linear", opt, num_training_steps=10)
    return S.save_train_state(tmp_path / name, network_tensors=model.state_dict(), optimizer=opt, scheduler=sched,
                              epoch=1, global_step=step, extra={"v": value}, config_digest=S.config_digest({"a": 1}))


def test_state_round_trip_fields(tmp_path):
    path = _tiny_state(tmp_path)
    st = S.load_train_state(path)
    assert (st.epoch, st.global_step, st.extra, st.config_digest) == (1, 2, {"v": 1.0}, S.config_digest({"a": 1}))
    assert torch.equal(st.network_tensors["weight"], torch.ones(2, 3))
    info = json.loads((path / "train_state.json").read_text())
    assert info["current_step"] == 2 and info["engine_version"]
    assert sorted(os.listdir(tmp_path)) == ["run-state"]


def test_state_files_are_not_listed_as_loras_and_format_1_still_loads(tmp_path):
    """In a WebUI the state sits in models/Lora/<project>/, and A1111's, Forge's and reForge's Lora lists show every
    .safetensors / .pt / .ckpt file there (the real Forge listed 'network', 'optimizer', 'rng_state', 'scheduler').
    States saved with those names before still resume."""
    path = _tiny_state(tmp_path)
    assert not [f for f in os.listdir(path) if f.lower().endswith((".safetensors", ".pt", ".ckpt"))]
    # the same state under format 1's names
    info = json.loads((path / "train_state.json").read_text())
    old = {S.NETWORK_FILE: "network.safetensors", S.OPTIMIZER_FILE: "optimizer.pt", S.SCHEDULER_FILE: "scheduler.pt",
           S.RNG_FILE: "rng_state.pt"}
    for new_name, old_name in old.items():
        os.rename(path / new_name, path / old_name)
    info["files"] = {old[k]: v for k, v in info["files"].items()}
    info["format_version"] = 1
    (path / "train_state.json").write_text(json.dumps(info))
    st = S.load_train_state(path)
    assert st.global_step == 2 and torch.equal(st.network_tensors["weight"], torch.ones(2, 3))
    assert st.optimizer_state and st.scheduler_state is not None and st.rng_state is not None


def test_state_save_is_atomic(tmp_path, monkeypatch):
    _tiny_state(tmp_path, step=2, value=1.0)
    real_save = torch.save

    def crash_on_scheduler(obj, f, *a, **k):
        if str(f).endswith(S.SCHEDULER_FILE):
            raise RuntimeError("simulated crash")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", crash_on_scheduler)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tiny_state(tmp_path, step=4, value=2.0)
    monkeypatch.setattr(torch, "save", real_save)
    st = S.load_train_state(tmp_path / "run-state")
    assert st.global_step == 2 and torch.equal(st.network_tensors["weight"], torch.ones(2, 3))
    assert sorted(os.listdir(tmp_path)) == ["run-state"]

    # a kill between the two renames (old moved aside, new not yet in place): the complete new one is found
    real_replace = os.replace
    calls = []

    def die_on_second_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", die_on_second_replace)
    monkeypatch.setattr(S.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        _tiny_state(tmp_path, step=6, value=3.0)
    monkeypatch.undo()
    assert not (tmp_path / "run-state").exists()
    st = S.load_train_state(tmp_path / "run-state")
    assert st.global_step == 6
    _tiny_state(tmp_path, step=8, value=4.0)  # the next save cleans up the leftovers
    assert sorted(os.listdir(tmp_path)) == ["run-state"]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_garbage(tmp_path):
    with pytest.raises(ConfigError, match="no saved state"):
        S.load_train_state(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="train_state.json is missing"):
        S.load_train_state(tmp_path / "empty")
    acc = tmp_path / "acc-state"
    acc.mkdir()
    (acc / "optimizer.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="Accelerate"):
        S.load_train_state(acc)

    path = _tiny_state(tmp_path)
    (path / "train_state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        S.load_train_state(path)

    path = _tiny_state(tmp_path, name="b-state")
    data = bytearray((path / S.OPTIMIZER_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / S.OPTIMIZER_FILE).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="corrupt"):
        S.load_train_state(path)

    path = _tiny_state(tmp_path, name="c-state")
    (path / S.SCHEDULER_FILE).write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    info = json.loads((path / "train_state.json").read_text())
    info["files"][S.SCHEDULER_FILE] = S._sha256(path / S.SCHEDULER_FILE)  # checksum fine: only weights_only stops it
    (path / "train_state.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="safely"):
        S.load_train_state(path)

    path = _tiny_state(tmp_path, name="d-state")
    (path / S.NETWORK_FILE).unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        S.load_train_state(path)


def test_restore_into_mismatched_network_is_a_config_error(tmp_path):
    st = S.load_train_state(_tiny_state(tmp_path))
    other = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="does not fit the configured network"):
        S.restore_into(st, other, opt, make_scheduler("linear", opt, num_training_steps=10))


def test_find_latest_state(tmp_path):
    assert S.find_latest_state(tmp_path, "run") is None
    _tiny_state(tmp_path, name="run-000001-state", step=10)
    _tiny_state(tmp_path, name="run-step00000030-state", step=30)
    _tiny_state(tmp_path, name="run-state", step=20)
    _tiny_state(tmp_path, name="runner-000009-state", step=99)  # another output name
    _tiny_state(tmp_path, name="run-000002-state.tmp-123", step=50)  # an unfinished save
    (tmp_path / "run-000003-state").mkdir()  # garbage
    assert S.find_latest_state(tmp_path, "run").name == "run-step00000030-state"
    assert S.find_latest_state(tmp_path, "runner").name == "runner-000009-state"


def test_rng_state_capture_and_restore():
    snap = S.capture_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(1).item())
    S.restore_rng_state(snap)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == first
