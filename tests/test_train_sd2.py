"""SD 2.x: v-prediction targets, zero terminal SNR, the v2 flag, and training end to end on a tiny SD2 model."""
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.events import STEP
from lib_lora_train.models import load_sd_model, tiny_sd2_state_dict, write_tiny_checkpoint
from lib_lora_train.training.loop import train
from lib_lora_train.training.noise import (loss_weights_min_snr, snr, target_for, with_zero_terminal_snr,
                                           zero_terminal_snr_betas)


@pytest.fixture(scope="module")
def v_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2") / "tiny_sd2_v.safetensors"
    write_tiny_checkpoint(str(path), seed=0, family="sd2", v_pred=True)
    return str(path)


def test_v_prediction_target_is_the_velocity_float64_reference():
    model = load_sd_model(tiny_sd2_state_dict(seed=0, v_pred=True))
    assert model.info.family == "sd2" and model.info.prediction_type == "v_prediction"
    sched = model.noise_scheduler
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = sched.alphas_cumprod.to(torch.float64)[t].view(-1, 1, 1, 1)
    want = ac.sqrt() * noise.double() - (1 - ac).sqrt() * lat.double()
    got = target_for(sched, lat, noise, t, "v_prediction")
    assert torch.allclose(got.double(), want, rtol=0, atol=16 * torch.finfo(torch.float32).eps * 4)
    assert torch.equal(target_for(sched, lat, noise, t, "epsilon"), noise)


def test_zero_terminal_snr_schedule():
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    before = sched.alphas_cumprod.clone()
    zt = with_zero_terminal_snr(sched)
    assert float(zt.alphas_cumprod[-1]) == 0.0                    # no signal at the last step
    assert float(zt.alphas_cumprod[0]) == pytest.approx(float(before[0]), rel=1e-6)
    assert bool((zt.alphas_cumprod[1:] < zt.alphas_cumprod[:-1]).all())
    assert torch.equal(sched.alphas_cumprod, before)               # the model's own scheduler is untouched
    assert float(snr(zt, torch.tensor([999]))) == 0.0
    # diffusers' implementation of the same algorithm, run in float64, agrees to float32 rounding
    ref = rescale_zero_terminal_snr(sched.betas.clone().double())
    ours = zero_terminal_snr_betas(sched.betas)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    # min-SNR weights stay finite at t = T for v-prediction
    w = loss_weights_min_snr(torch.tensor([0, 999]), zt, 5.0, "v_prediction")
    assert torch.isfinite(w).all() and float(w[1]) == 0.0


def _data(root):
    folder = root / "data" / "2_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        arr = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("zkz, thing", encoding="utf-8")


def _cfg(ckpt, tmp_path, **kw):
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), output_name="v2", resolution="64", network_dim=4,
                  network_alpha=4, learning_rate=1e-3, max_train_steps=3, seed=2, cache_latents=True, device="cpu")
    values.update(kw)
    return config_from_dict(values)


def test_sd2_v_model_trains_with_zero_terminal_snr(v_ckpt, tmp_path):
    _data(tmp_path)
    losses = []
    cfg = _cfg(v_ckpt, tmp_path, v2=True, zero_terminal_snr=True, min_snr_gamma=5.0, clip_skip=2)
    result = train(cfg, sink=lambda e: losses.append(e.data["loss"]) if e.kind == STEP else None)
    assert result.status == "done" and len(losses) == 3 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    with safe_open(os.path.join(cfg.output_dir, "v2.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_zero_terminal_snr"] == "True"
    assert any(k.startswith("lora_te_") for k in keys)


def test_zero_terminal_snr_needs_v_prediction_and_v2_is_checked(tmp_path):
    eps = tmp_path / "eps.safetensors"
    write_tiny_checkpoint(str(eps), seed=0, family="sd2")
    _data(tmp_path)
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction"):
        train(_cfg(str(eps), tmp_path, zero_terminal_snr=True))
    sd1 = tmp_path / "sd1.safetensors"
    write_tiny_checkpoint(str(sd1), seed=0)
    with pytest.raises(ConfigError, match="v2 = true says the checkpoint is SD 2.x"):
        train(_cfg(str(sd1), tmp_path, v2=True, output_dir=str(tmp_path / "o2")))
