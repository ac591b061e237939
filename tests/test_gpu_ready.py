"""The speed options (README "Speed options (GPU)"), each checked on the CPU for its numbers: the loss read one
micro-batch late (async_loss) logs the same losses in the same order and stops a diverged run at the same step;
torch.compile with the "eager" backend and the optimizer kernels give the same weights; channels-last
convolutions stay within float32's rounding of a float64 reference; host->device copies are no-ops on the CPU;
the attention flags behave like sd-scripts' (xformers refused when it is not installed). No GPU was used here."""
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from faults_support import make_cfg, make_data
from numerics import U32, as_float64, assert_within, float32_reference
from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError, TrainingFailed
from lib_lora_train.events import LOG, SAVED, STEP
from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict, write_tiny_checkpoint
from lib_lora_train.training import speed
from lib_lora_train.training.guards import LossGuard
from lib_lora_train.training.loop import train
from lib_lora_train.training.optim import make_optimizer
from lib_lora_train.training.step_log import StepLog
from lib_lora_train.transfer import to_device

# 4 images, batch 2: 2 steps an epoch, 2 epochs, a file after the first; small enough to run several times
RUN = dict(max_train_epochs=2, save_state=False, cache_latents=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_data(root)
    return root


def _run(ckpt, root, name, **kw):
    events = []
    cfg = make_cfg(ckpt, root, output_name=name, **{**RUN, **kw})
    train(cfg, sink=events.append)
    final = load_file(os.path.join(cfg.output_dir, f"{name}.safetensors"))
    return events, final


def _log(events):
    """What a user sees of a run, in order: each step's loss and averages, each saved file."""
    out = []
    for e in events:
        if e.kind == STEP:
            out.append((STEP, e.data["step"], e.data["epoch"], e.data["loss"], e.data["avg_loss"],
                        tuple(e.data["lr"].items())))
        elif e.kind in (SAVED, "epoch"):
            name = os.path.basename(e.data.get("path", ""))
            out.append((e.kind, e.data["step"], e.data.get("avg_loss"), name.lstrip("abcdefghijklmnopqrstuvwxyz")))
    return out


@pytest.fixture(scope="module")
def plain(ckpt, data):
    return _run(ckpt, data, "plain", async_loss=False)


# ------------------------------------------------------------------ loss read one step late

def test_async_loss_logs_the_same_losses_events_and_weights(ckpt, data, plain):
    events, final = _run(ckpt, data, "late", async_loss=True)
    assert [x for x in _log(events)] == [x for x in _log(plain[0])]
    assert len([e for e in events if e.kind == STEP]) == 4
    assert final.keys() == plain[1].keys()
    assert all(torch.equal(final[k], plain[1][k]) for k in final)


class _Net:
    def __init__(self, finite=True):
        self.p = torch.nn.Parameter(torch.tensor([1.0 if finite else math.nan]))

    def parameters(self):
        return [self.p]


def _feed(lag, losses, patience=1, finite=True):
    """Push `losses` through a StepLog (one micro-batch a step); returns (STEP events, error text, pushes made)."""
    cfg = config_from_dict({})
    emitted = []
    log = StepLog(emitted.append, LossGuard(cfg, patience=patience), _Net(finite), lambda: None, lag=lag)
    pushed = 0
    try:
        for i, value in enumerate(losses):
            meta = log.add(torch.tensor(value), i + 1, 1)
            pushed += 1
            log.end_step(meta, {"step": i + 1, "loss": None, "avg_loss": None})
        log.flush()
    except TrainingFailed as exc:
        return emitted, str(exc), pushed
    return emitted, None, pushed


@pytest.mark.parametrize("patience,finite", [(1, True), (3, True), (3, False)])
def test_async_loss_guard_stops_at_the_same_step_one_push_later_at_most(patience, finite):
    losses = [0.5, 0.25, math.nan, math.inf, math.nan, 0.125, 0.1]
    sync_events, sync_err, sync_pushed = _feed(0, losses, patience, finite)
    late_events, late_err, late_pushed = _feed(1, losses, patience, finite)
    assert sync_err is not None and late_err == sync_err          # same step named, same advice
    assert sync_pushed <= late_pushed <= sync_pushed + 1
    assert [repr(e.data) for e in late_events] == [repr(e.data) for e in sync_events]   # NaN-safe comparison
    assert [e.data["loss"] for e in sync_events][:2] == [0.5, 0.25]


def test_async_loss_without_a_failure_emits_every_step_in_order_after_flush():
    events, err, _ = _feed(1, [0.5, 0.25, 0.125])
    assert err is None
    assert [(e.data["step"], e.data["loss"]) for e in events] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert events[-1].data["avg_loss"] == (0.5 + 0.25 + 0.125) / 3
    assert list(events[0].data) == ["step", "loss", "avg_loss"]     # the keys keep their order


def test_an_absurd_learning_rate_stops_within_a_few_steps_with_async_loss(ckpt, data):
    steps = []
    with pytest.raises(TrainingFailed, match="learning_rate = 1e\\+30"):
        train(make_cfg(ckpt, data, output_name="absurd", learning_rate=1e30, max_grad_norm=0, max_train_epochs=20,
                       async_loss=True, save_state=False),
              sink=lambda e: steps.append(e.data["step"]) if e.kind == STEP else None)
    assert len(steps) <= 3, steps


# ------------------------------------------------------------------ torch.compile

def _tiny_unet_with_lora():
    from lib_lora_train.networks import create_network, network_config_from_args
    model = load_sd_model(tiny_sd1_state_dict(seed=0))
    torch.manual_seed(3)
    net = create_network(network_config_from_args("networks.lora", 4, 2, [], train_text_encoder=False),
                         model.unet, None)
    net.apply_to()
    for p in net.parameters():
        p.data.normal_(0, 0.05)        # lora_up starts at zero: give the adapters a real effect
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    return model, net, x, torch.tensor([10, 500]), cond


def _grads(forward, net, x, t, cond):
    for p in net.parameters():
        p.grad = None
    out = forward(x, t, cond).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


class _Small(torch.nn.Module):
    """A conv / norm / attention-free stand-in with an adapter-like trainable branch (the real UNet is compiled
    in the full run below, which takes minutes to trace on this CPU)."""
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False)
        self.norm = torch.nn.GroupNorm(4, 8).requires_grad_(False)
        self.down = torch.nn.Linear(8, 2, bias=False)
        self.up = torch.nn.Linear(2, 8, bias=False)

    def forward(self, x, t, cond):
        h = self.norm(self.conv(x)).mean(dim=(2, 3))
        h = h + self.up(self.down(h)) * 0.5 + cond.mean(dim=1)[:, :8] * t[:, None]
        return type("Out", (), {"sample": h})()


def test_compile_with_the_eager_backend_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    small = _Small()
    net = torch.nn.ModuleList([small.down, small.up])
    g = torch.Generator().manual_seed(1)
    x, cond, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g), torch.tensor([0.1, 0.7])
    cfg = config_from_dict({"torch_compile": True, "dynamo_backend": "eager"})
    compiled = speed.compile_unet(small, cfg, torch.device("cpu"))
    assert compiled is not small
    out0, g0 = _grads(small, net, x, t, cond)
    out1, g1 = _grads(compiled, net, x, t, cond)
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert speed.compile_unet(small, config_from_dict({}), torch.device("cpu")) is small


def test_compile_backends_are_checked_before_anything_is_compiled(monkeypatch):
    with pytest.raises(ConfigError, match="dynamo_backend 'ofi' is not available"):
        speed.check_compile_backend("ofi", torch.device("cpu"))
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        speed.check_compile_backend("inductor", torch.device("cpu"))
    real_find_spec = speed.importlib.util.find_spec
    monkeypatch.setattr(speed.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs the triton package"):
        speed.check_compile_backend("inductor", torch.device("cuda"))
    with pytest.raises(ConfigError, match="dynamo_backend: expected one of.*did you mean 'inductor'"):
        config_from_dict({"torch_compile": True, "dynamo_backend": "inductr"})


def test_a_run_with_compile_eager_trains_the_same_lora(ckpt, data, plain):
    events, final = _run(ckpt, data, "compiled", async_loss=False, torch_compile=True, dynamo_backend="eager")
    assert any("torch.compile" in e.data.get("message", "") for e in events if e.kind == LOG)
    assert [x for x in _log(events)] == [x for x in _log(plain[0])]
    assert all(torch.equal(final[k], plain[1][k]) for k in final)


def test_a_run_with_channels_last_foreach_and_no_pinning_goes_through(ckpt, data, plain):
    # the numbers of each option are checked below, on their own; here: the options reach the run and it ends
    events, final = _run(ckpt, data, "layout", channels_last=True, optimizer_kernel="foreach", pin_memory=False)
    steps = [e for e in events if e.kind == STEP]
    assert [e.data["step"] for e in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(e.data["loss"]) for e in steps)
    assert final.keys() == plain[1].keys() and all(bool(torch.isfinite(t).all()) for t in final.values())


# ------------------------------------------------------------------ channels-last

def test_channels_last_changes_only_the_layout_and_stays_within_float32_rounding():
    model, net, x, t, cond = _tiny_unet_with_lora()
    net.remove()                       # the base alone: its float64 copy is the reference
    unet = model.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}

    def run_with(channels_last):
        def run(u):
            xi = x.to(next(u.parameters()).dtype).requires_grad_(True)
            out = u(speed.as_channels_last(xi, channels_last), t, cond.to(xi.dtype)).sample
            (gx,) = torch.autograd.grad(out.square().mean(), xi)
            return [out.detach(), gx]
        return run

    ref, bounds = float32_reference(run_with(False), as_float64([unet]))
    plain_out = run_with(False)(unet)
    undo = speed.use_channels_last([unet])
    convs = [p for p in unet.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    cl_out = run_with(True)(unet)
    for got_plain, got_cl, r, b, what in zip(plain_out, cl_out, ref, bounds, ("output", "input gradient")):
        assert_within(got_plain, r, b, f"contiguous {what}")
        assert_within(got_cl, r, b, f"channels_last {what}")
    undo()
    assert all(p.is_contiguous() for p in convs)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())   # the same values back


# ------------------------------------------------------------------ optimizer kernels

def _adamw_run(kernel, dtype, grads, init, lr, wd, moves=None):
    p = torch.nn.Parameter(init.to(dtype).clone())
    opt, desc = make_optimizer("AdamW", [{"params": [p]}], lr, [f"weight_decay={wd}"], kernel=kernel)
    for g in grads:
        p.grad = g.to(dtype)
        before = p.detach().clone()
        opt.step()
        if moves is not None:
            moves.append(float((p.detach() - before).abs().max()))
    return p.detach(), desc, opt


def test_optimizer_kernels_give_the_same_update_within_float32_rounding():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(257, generator=g, dtype=torch.float64)
    grads = [torch.randn(257, generator=g, dtype=torch.float64) * 10 ** (-k % 3) for k in range(6)]
    lr, wd = 1e-2, 0.1
    moves = []
    ref, _, _ = _adamw_run("for_loop", torch.float64, grads, init, lr, wd, moves)
    # Each step rounds p*(1-lr*wd) and p - step: about u*|p| each; the step lr*m/(sqrt(v)+eps) carries about
    # (8 + 4t)*u relative error at step t (m and v gain a rounding a step; sqrt, +eps, /, *lr one each).
    # The float64 run gives |p| and the size of each step; the errors of the steps add up.
    top = float(init.abs().max()) + sum(moves)
    bound = sum(2 * U32 * top + (8 + 4 * t) * U32 * m for t, m in enumerate(moves))
    descs = set()
    for kernel in ("for_loop", "foreach", "fused", "auto"):
        got, desc, opt = _adamw_run(kernel, torch.float32, grads, init, lr, wd)
        assert_within(got, ref, bound, kernel)
        descs.add(desc)
    assert descs == {"torch.optim.adamw.AdamW(weight_decay=0.1)"}      # ss_optimizer as sd-scripts writes it
    auto, _, opt = _adamw_run("auto", torch.float32, grads, init, lr, wd)
    loop, _, _ = _adamw_run("for_loop", torch.float32, grads, init, lr, wd)
    assert torch.equal(auto, loop)                  # on the CPU auto keeps PyTorch's default: no number changes
    assert not opt.defaults.get("fused") and not opt.defaults.get("foreach")


def test_optimizer_kernel_choices_are_checked():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="has no fused implementation"):
        make_optimizer("Adafactor", [{"params": p}], 1e-3, ["relative_step=False"], kernel="fused")
    opt, _ = make_optimizer("AdamW", [{"params": p}], 1e-3, ["foreach=False"], kernel="fused")
    assert opt.defaults["foreach"] is False and not opt.defaults.get("fused")    # the user's own argument wins
    with pytest.raises(ConfigError, match="optimizer_kernel: expected one of"):
        config_from_dict({"optimizer_kernel": "fast"})


# ------------------------------------------------------------------ copies and attention

def test_host_to_device_copies_are_plain_on_the_cpu(monkeypatch):
    t = torch.arange(6, dtype=torch.float32)

    def no_pinning(self):
        raise AssertionError("pinned memory used for a CPU destination")
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    assert to_device(t, torch.device("cpu")) is t
    half = to_device(t, "cpu", torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, t.to(torch.float16))


def test_attention_flags_behave_like_sd_scripts(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0
    import importlib.util as iu
    if iu.find_spec("xformers") is None:
        with pytest.raises(ConfigError, match="xformers package is not installed"):
            config_from_dict({"xformers": True})
    with pytest.raises(ConfigError, match="set only one"):
        config_from_dict({"sdpa": True, "mem_eff_attn": True})
    model = load_sd_model(tiny_sd1_state_dict(seed=0))
    unet = model.unet
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())   # SDPA is the default
    said = []
    undo = speed.select_attention(unet, config_from_dict({"mem_eff_attn": True}), said.append)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values()) and said
    undo()
    cfg = config_from_dict({})
    cfg.xformers = True                   # as if validated where xformers is installed
    real_find_spec = iu.find_spec
    monkeypatch.setattr(speed.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a))
    from diffusers.models.attention_processor import XFormersAttnProcessor
    undo = speed.select_attention(unet, cfg)
    assert all(isinstance(p, XFormersAttnProcessor) for p in unet.attn_processors.values())
    undo()
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
