"""Memory options: fp8 base weights, fused backward pass, gradient checkpointing on every encoder, SDPA,
8-bit optimizers, and the text-encoder output cache (each checked for its numerics on CPU)."""
import copy
import importlib.util

import pytest
import torch

from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.training.memory import (FP8_DTYPE, enable_checkpointing, fp8_targets, store_in_fp8,
                                            use_sdpa)
from lib_lora_train.training.optim import make_optimizer
from lib_lora_train.training.update import Updater

needs_fp8 = pytest.mark.skipif(FP8_DTYPE is None, reason="this PyTorch has no float8")


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.lin = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm(self.conv(x))
        return self.lin(h.mean(dim=(2, 3)))


def _rounded_copy(model):
    """The reference: every Linear / Conv2d weight rounded to fp8 and back, everything else untouched."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.weight.data = m.weight.data.to(FP8_DTYPE).to(torch.float32)
    return ref


@needs_fp8
def test_fp8_base_forward_equals_forward_with_fp8_rounded_weights():
    torch.manual_seed(0)
    model = Small()
    ref = _rounded_copy(model)
    assert not torch.equal(ref.lin.weight, model.lin.weight)   # the rounding is real
    n = store_in_fp8(model, torch.float32)
    assert n == 2
    assert model.conv.weight.dtype == FP8_DTYPE and model.lin.weight.element_size() == 1
    assert model.norm.weight.dtype == torch.float32
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), ref(x))


@needs_fp8
def test_fp8_base_on_a_unet_with_a_lora_trains_only_the_lora():
    from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict
    from lib_lora_train.networks import create_network, network_config_from_args
    model = load_sd_model(tiny_sd1_state_dict(seed=0))
    ref_unet = _rounded_copy(model.unet)
    store_in_fp8(model.unet, torch.float32)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10])
    cond = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, cond).sample, ref_unet(x, t, cond).sample)
    net = create_network(network_config_from_args("networks.lora", 4, 4, [], train_text_encoder=False),
                         model.unet, None)
    net.apply_to()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    model.unet(x, t, cond).sample.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.unet.parameters())
    net.remove()


def test_fp8_base_is_refused_on_a_host_model_and_needs_mixed_precision():
    cfg = config_from_dict({"fp8_base": True, "mixed_precision": "bf16"})
    with pytest.raises(ConfigError, match="loaded"):
        fp8_targets(cfg, object(), host_model=True)
    with pytest.raises(ConfigError, match="mixed_precision"):
        config_from_dict({"fp8_base_unet": True})


def _quadratic(params, target):
    return sum(((p - t) ** 2 * (i + 1)).sum() for i, (p, t) in enumerate(zip(params, target)))


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
@pytest.mark.parametrize("relative_step", [True, False])
def test_fused_backward_pass_gives_the_same_updates_as_adafactor(max_grad_norm, relative_step):
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]
    target = [torch.randn_like(p) for p in start]
    args = [f"relative_step={relative_step}"] + ([] if relative_step else ["scale_parameter=False",
                                                                           "warmup_init=False"])
    results = []
    for fused in (False, True):
        params = [p.clone().requires_grad_(True) for p in start]
        groups = [{"params": params[:2], "lr": 1e-2, "name": "a"}, {"params": params[2:], "lr": 5e-3, "name": "b"}]
        opt, _ = make_optimizer("Adafactor", groups, 1e-2, args)
        up = Updater(opt, max_grad_norm=max_grad_norm, fused=fused)
        for _ in range(3):
            if not fused and max_grad_norm:
                # what fused clipping means (as sd-scripts): each parameter's gradient on its own
                _quadratic(params, target).backward()
                for p in params:
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                up.backward(_quadratic(params, target))
                up.step()
        up.close()
        assert all(p.grad is None for p in params)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], start[0])


def test_fused_backward_pass_refusals():
    with pytest.raises(ConfigError, match="Adafactor"):
        config_from_dict({"fused_backward_pass": True})
    with pytest.raises(ConfigError, match="gradient_accumulation"):
        config_from_dict({"fused_backward_pass": True, "optimizer_type": "Adafactor",
                          "gradient_accumulation_steps": 2})
    p = torch.zeros(2, requires_grad=True)
    opt, _ = make_optimizer("AdamW", [{"params": [p]}], 1e-3)
    with pytest.raises(ConfigError, match="Adafactor"):
        Updater(opt, max_grad_norm=1.0, fused=True)


def test_gradient_checkpointing_covers_both_sdxl_text_encoders_and_keeps_gradients():
    from lib_lora_train.models import load_sd_model, tiny_sdxl_state_dict
    model = load_sd_model(tiny_sdxl_state_dict(seed=0))
    te1, te2 = model.text_encoders
    for te in (te1, te2):
        te.requires_grad_(True)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])

    def grads():
        for te in (te1, te2):
            te.zero_grad(set_to_none=True)
        out = te2(ids, output_hidden_states=True)
        (out.hidden_states[-2].square().mean() + te1(ids)[0].square().mean()).backward()
        return [p.grad.clone() for p in te2.parameters() if p.grad is not None]

    plain = grads()
    undo = enable_checkpointing(model.unet, [te1, te2])
    assert te1.is_gradient_checkpointing and te2.is_gradient_checkpointing
    assert model.unet.is_gradient_checkpointing
    ckpt = grads()
    undo()
    assert not te2.is_gradient_checkpointing and not model.unet.is_gradient_checkpointing
    assert len(plain) == len(ckpt)
    for a, b in zip(plain, ckpt):   # recomputation repeats the same float32 ops
        assert torch.allclose(a, b, rtol=0, atol=8 * torch.finfo(torch.float32).eps * max(1.0, a.abs().max()))


def test_unet_attention_runs_on_pytorch_sdpa_and_host_processors_come_back():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict
    unet = load_sd_model(tiny_sd1_state_dict(seed=0)).unet
    unet.set_attn_processor(AttnProcessor())            # a host that chose the classic processor
    undo = use_sdpa(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    undo()
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "PagedAdamW8bit"])
def test_8bit_optimizers_say_clearly_that_bitsandbytes_is_missing(name):
    config_from_dict({"optimizer_type": name})     # a valid name
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        make_optimizer(name, [{"params": [p]}], 1e-3)


# ---------------------------------------------------------------- text-encoder output cache

def _sdxl_data(root, n=2):
    from PIL import Image
    folder = root / "data" / "1_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(9)
    for i in range(n):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkz, thing {i}", encoding="utf-8")


def test_cached_text_encoder_outputs_give_the_same_training_as_uncached(tmp_path):
    from lib_lora_train.events import LOG, STEP
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.training.loop import train
    from safetensors.torch import load_file
    ckpt = str(tmp_path / "xl.safetensors")
    write_tiny_checkpoint(ckpt, seed=0, family="sdxl")
    _sdxl_data(tmp_path)
    runs = []
    for name, extra in (("plain", {}), ("cached", {"cache_text_encoder_outputs": True}),
                        ("disk", {"cache_text_encoder_outputs_to_disk": True}),
                        ("disk2", {"cache_text_encoder_outputs_to_disk": True})):
        events = []
        cfg = config_from_dict(dict(
            pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
            output_dir=str(tmp_path / "out"), output_name=name, resolution="64", network_dim=4, network_alpha=4,
            learning_rate=1e-2, max_train_steps=3, train_batch_size=2, seed=3, cache_latents=True, device="cpu",
            network_train_unet_only=True, latents_cache_dir=str(tmp_path / "cache"), **extra))
        train(cfg, sink=events.append)
        losses = [e.data["loss"] for e in events if e.kind == STEP]
        logs = [e.data["message"] for e in events if e.kind == LOG]
        runs.append((losses, load_file(str(tmp_path / "out" / f"{name}.safetensors")), logs))
    (plain, t_plain, _), (cached, t_cached, logs) = runs[0], runs[1]
    assert any("text-encoder outputs cached: 2 encoded" in m for m in logs)
    assert any("2 read from disk" in m for m in runs[3][2])        # the second disk run reuses the files
    assert len(list((tmp_path / "cache").glob("*_te.safetensors"))) == 2
    # the cache encodes both captions in one batch, training encodes them per batch of 2: float32 rounding
    # may differ in the last bits, nothing more
    tol = 64 * torch.finfo(torch.float32).eps
    for losses, tensors, _ in runs[1:]:
        assert losses == pytest.approx(plain, rel=tol, abs=tol)
        for k, v in t_plain.items():
            assert torch.allclose(tensors[k], v, rtol=1e-4, atol=1e-6), k


def test_text_encoder_cache_keys_follow_caption_and_model(tmp_path):
    from lib_lora_train.models import load_sd_model, tiny_sdxl_state_dict
    from lib_lora_train.training.te_cache import TextSource
    model = load_sd_model(tiny_sdxl_state_dict(seed=0))
    src = TextSource(model, clip_skip=None, max_token_length=None, device="cpu", cache_dir=str(tmp_path))
    src.prepare(["a cat", "a dog", "a cat"])
    assert src.encoded == 2
    again = TextSource(model, clip_skip=None, max_token_length=None, device="cpu", cache_dir=str(tmp_path))
    again.prepare(["a cat", "a dog", "a bird"])
    assert (again.disk_hits, again.encoded) == (2, 1)            # a new caption is encoded, never guessed
    out = again.encode(["a dog", "a cat"])
    fresh = src._fresh(["a dog", "a cat"])
    assert out.pooled is not None and out.hidden.shape == fresh.hidden.shape
    assert torch.allclose(out.hidden, fresh.hidden, rtol=0, atol=64 * torch.finfo(torch.float32).eps * 10)
    other = load_sd_model(tiny_sdxl_state_dict(seed=1))           # another model: nothing is reused
    third = TextSource(other, clip_skip=None, max_token_length=None, device="cpu", cache_dir=str(tmp_path))
    third.prepare(["a cat"])
    assert (third.disk_hits, third.encoded) == (0, 1)
    skip = TextSource(model, clip_skip=2, max_token_length=None, device="cpu", cache_dir=str(tmp_path))
    skip.prepare(["a cat"])
    assert skip.encoded == 1


def test_text_encoder_cache_refused_where_captions_change(tmp_path):
    from types import SimpleNamespace
    from lib_lora_train.training.te_cache import uncacheable_reasons
    base = dict(shuffle_caption=False, token_warmup_step=0, caption_tag_dropout_rate=0.0, caption_dropout_rate=0.0,
                caption_dropout_every_n_epochs=0, enable_wildcard=False, image_dir="/x/5_a")
    assert uncacheable_reasons([SimpleNamespace(**base)]) == []
    for key, value in (("shuffle_caption", True), ("token_warmup_step", 10), ("caption_tag_dropout_rate", 0.1),
                       ("caption_dropout_rate", 0.1), ("caption_dropout_every_n_epochs", 2),
                       ("enable_wildcard", True)):
        assert uncacheable_reasons([SimpleNamespace(**{**base, key: value})]) == [f"5_a: {key}"]
    # a dataset_config subset that shuffles is refused when the run starts
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.training.loop import train
    _sdxl_data(tmp_path)
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "data" / "1_zkz"}"'
                    f'\nshuffle_caption = true\n', encoding="utf-8")
    ckpt = str(tmp_path / "sd1.safetensors")
    write_tiny_checkpoint(ckpt, seed=0)
    cfg = config_from_dict(dict(pretrained_model_name_or_path=ckpt, dataset_config=str(toml), device="cpu",
                                output_dir=str(tmp_path / "o"), network_train_unet_only=True,
                                cache_text_encoder_outputs=True, max_train_steps=1))
    with pytest.raises(ConfigError, match="1_zkz: shuffle_caption"):
        train(cfg)


# ---------------------------------------------------------------- through train()

def _sd1_run(tmp_path, name, **extra):
    from PIL import Image
    from lib_lora_train.events import STEP
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.training.loop import train
    ckpt = tmp_path / "sd1.safetensors"
    if not ckpt.exists():
        write_tiny_checkpoint(str(ckpt), seed=0)
        folder = tmp_path / "data" / "1_zkz"
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(2)
        for i in range(2):
            Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
                folder / f"{i}.png")
    events = []
    cfg = config_from_dict(dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(tmp_path / "data"),
                                output_dir=str(tmp_path / "out"), output_name=name, resolution="64",
                                network_dim=4, network_alpha=4, learning_rate=1e-3, max_train_steps=2, seed=1,
                                cache_latents=True, device="cpu", **extra))
    result = train(cfg, sink=events.append)
    return result, [e.data["loss"] for e in events if e.kind == STEP]


@needs_fp8
def test_fp8_base_and_full_bf16_train_end_to_end_on_cpu(tmp_path):
    from safetensors.torch import load_file
    result, losses = _sd1_run(tmp_path, "fp8", mixed_precision="bf16", fp8_base=True)
    assert result.status == "done" and len(losses) == 2 and all(l == l for l in losses)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "fp8.safetensors"), "pt") as f:
        assert f.metadata()["ss_fp8_base"] == "True"
    result, losses = _sd1_run(tmp_path, "bf16", mixed_precision="bf16", full_bf16=True, save_precision="bf16",
                              optimizer_type="Adafactor", fused_backward_pass=True,
                              optimizer_args=["relative_step=False"], gradient_checkpointing=True)
    assert result.status == "done" and all(l == l for l in losses)
    tensors = load_file(str(tmp_path / "out" / "bf16.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_fp8_base_on_a_host_model_is_refused_before_any_work_and_changes_nothing(tmp_path):
    from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict
    from lib_lora_train.training.loop import train
    model = load_sd_model(tiny_sd1_state_dict(seed=0))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = config_from_dict(dict(train_data_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "o"),
                                mixed_precision="bf16", fp8_base=True, device="cpu", max_train_steps=1))
    with pytest.raises(ConfigError, match="already has loaded"):
        train(cfg, model=model)
    after = model.unet.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
