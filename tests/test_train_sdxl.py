"""SDXL end to end on a tiny SDXL-shaped checkpoint: size conditioning, pooled embedding, files, resume."""
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lora_train.config import config_from_dict
from lib_lora_train.dataset.sizes import crop_ltrb, size_info
from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.events import STEP
from lib_lora_train.models import TextConditioning, encode_text, load_sd_model, write_tiny_checkpoint
from lib_lora_train.models.conditioning import SizeInfo, time_ids, unet_inputs
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def sdxl_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"
    write_tiny_checkpoint(str(path), seed=0, family="sdxl")   # its VAE has 3 levels: 4 px per latent cell
    return str(path)


@pytest.fixture(scope="module")
def sdxl(sdxl_ckpt):
    return load_sd_model(sdxl_ckpt)


class _Item:
    def __init__(self, original_size, bucket):
        self.original_size, self.bucket = original_size, bucket


def test_size_info_follows_sd_scripts_crop_rule_and_flip():
    # wider image than bucket: sd-scripts fits it inside the bucket and records the vertical margin as "top"
    assert crop_ltrb((64, 48), (300, 200)) == (0.0, 2.0, 64.0, 64 / 1.5 + 2.0)
    assert size_info(_Item((300, 200), (64, 48))) == SizeInfo((200, 300), (2, 0), (48, 64))
    # taller image: the horizontal margin is "left"; mirrored, left becomes bucket width - right
    left, top, right, _ = crop_ltrb((64, 64), (200, 300))
    assert (left, top) == (10.0, 0.0) and right == pytest.approx(10 + 64 * 2 / 3)
    assert size_info(_Item((200, 300), (64, 64)), flipped=False).crop_top_left == (0, 10)
    assert size_info(_Item((200, 300), (64, 64)), flipped=True).crop_top_left == (0, int(64 - right))
    assert size_info(_Item((200, 300), (64, 64)), flipped=True).crop_top_left == (0, 11)
    # an exact fit: no crop
    assert size_info(_Item((64, 96), (64, 96))) == SizeInfo((96, 64), (0, 0), (96, 64))


def test_unet_inputs_sdxl_time_ids_and_pooled(sdxl):
    text = encode_text(sdxl, ["a photo", "a drawing"])
    sizes = [SizeInfo((200, 300), (2, 0), (48, 64)), SizeInfo((96, 64), (0, 11), (96, 64))]
    kw = unet_inputs(sdxl, text, sizes, torch.float32)
    assert torch.equal(kw["added_cond_kwargs"]["time_ids"],
                       torch.tensor([[200., 300., 2., 0., 48., 64.], [96., 64., 0., 11., 96., 64.]]))
    assert kw["added_cond_kwargs"]["text_embeds"] is not None
    assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], text.pooled)
    assert kw["encoder_hidden_states"].shape[-1] == sdxl.unet.config.cross_attention_dim
    with pytest.raises(ModelError, match="pooled"):
        unet_inputs(sdxl, TextConditioning(hidden=text.hidden, pooled=None), sizes, torch.float32)
    with pytest.raises(ModelError, match="one size"):
        unet_inputs(sdxl, text, sizes[:1], torch.float32)


def test_sdxl_unet_output_depends_on_pooled_and_sizes(sdxl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    text = encode_text(sdxl, ["a photo"])
    base = SizeInfo((64, 64), (0, 0), (64, 64))
    with torch.no_grad():
        ref = sdxl.unet(x, t, **unet_inputs(sdxl, text, [base], torch.float32)).sample
        cropped = sdxl.unet(x, t, **unet_inputs(sdxl, text, [SizeInfo((64, 64), (8, 0), (64, 64))],
                                                     torch.float32)).sample
        other = TextConditioning(hidden=text.hidden, pooled=text.pooled + 1.0)
        pooled = sdxl.unet(x, t, **unet_inputs(sdxl, other, [base], torch.float32)).sample
    assert not torch.allclose(ref, cropped)
    assert not torch.allclose(ref, pooled)
    assert time_ids([base]).shape == (1, 6)


def _data(root, sizes):
    folder = root / "data" / "2_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    for i, (w, h) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"zkz, thing{i}", encoding="utf-8")


def _cfg(ckpt, tmp_path, **kw):
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), output_name="xl", resolution="64", enable_bucket=True,
                  min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, network_dim=4, network_alpha=4,
                  learning_rate=1e-3, max_train_epochs=2, train_batch_size=1, seed=5, cache_latents=True,
                  flip_aug=True, device="cpu", sdxl=True)
    values.update(kw)
    return config_from_dict(values)


def test_sdxl_trains_end_to_end_and_resumes_bit_identically(sdxl_ckpt, tmp_path):
    _data(tmp_path, [(64, 64), (96, 64)])
    losses = []
    cfg = _cfg(sdxl_ckpt, tmp_path, save_every_n_epochs=1, save_state=True, clip_skip=2)
    result = train(cfg, sink=lambda e: losses.append(e.data["loss"]) if e.kind == STEP else None)
    assert result.status == "done" and result.steps == 8
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    final = load_file(os.path.join(cfg.output_dir, "xl.safetensors"))
    assert any(k.startswith("lora_unet_") for k in final)
    assert any(k.startswith("lora_te1_") for k in final) and any(k.startswith("lora_te2_") for k in final)
    # resume from the state after epoch 1: the same final file, bit for bit
    resumed = _cfg(sdxl_ckpt, tmp_path, output_dir=str(tmp_path / "out2"), clip_skip=2,
                   resume=os.path.join(cfg.output_dir, "xl-000001-state"))
    train(resumed)
    again = load_file(os.path.join(resumed.output_dir, "xl.safetensors"))
    assert again.keys() == final.keys()
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_sdxl_flag_is_checked_against_the_checkpoint(tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    write_tiny_checkpoint(str(sd1), seed=0)
    _data(tmp_path, [(64, 64)])
    with pytest.raises(ConfigError, match="sdxl = true says the checkpoint is SDXL, but the loaded model is sd1"):
        train(_cfg(str(sd1), tmp_path))


def test_sdxl_text_encoder_only_and_text_encoder_lr_list(sdxl_ckpt, tmp_path):
    _data(tmp_path, [(64, 64)])
    # networks.lora trains both encoders at one rate (sd-scripts uses the first value): two values must agree
    with pytest.raises(ConfigError, match="first value"):
        train(_cfg(sdxl_ckpt, tmp_path, network_train_text_encoder_only=True, text_encoder_lr=[1e-3, 5e-4],
                   max_train_epochs=1, flip_aug=False, output_dir=str(tmp_path / "refused")))
    steps = []
    cfg = _cfg(sdxl_ckpt, tmp_path, network_train_text_encoder_only=True, text_encoder_lr=[1e-3, 1e-3],
               max_train_epochs=1, flip_aug=False)
    train(cfg, sink=lambda e: steps.append(e.data) if e.kind == STEP else None)
    lrs = steps[0]["lr"]
    assert lrs and set(lrs.values()) == {1e-3} and not any("unet" in k for k in lrs), lrs
    final = load_file(os.path.join(cfg.output_dir, "xl.safetensors"))
    assert not any(k.startswith("lora_unet_") for k in final)
    assert any(k.startswith("lora_te1_") for k in final) and any(k.startswith("lora_te2_") for k in final)


def test_sdxl_block_weight_training_from_a_config_and_v_parameterization_metadata(sdxl_ckpt, tmp_path):
    """sd-scripts' 23 SDXL slots from a run's network_args reach the network (checked at submit as well), and
    a v-prediction SDXL run keeps sd-scripts' ss_base_model_version (no "_v" suffix for SDXL)."""
    from safetensors import safe_open

    from lib_lora_train.jobs import preflight

    _data(tmp_path, [(64, 64)])
    dims = ["0"] + ["4"] * 21 + ["0"]           # 23 values: time/label embedding and out have no LoRA
    cfg = _cfg(sdxl_ckpt, tmp_path, max_train_epochs=1, flip_aug=False, network_train_unet_only=True,
               v_parameterization=True,
               network_args=[f"block_dims={','.join(dims)}", f"block_alphas={','.join(['2'] * 23)}"])
    preflight(cfg)                                # 23 values are SDXL's count: accepted before loading anything
    result = train(cfg)
    assert result.status == "done"
    with safe_open(result.outputs[-1], framework="pt") as fh:
        meta = fh.metadata()
        alphas = {float(fh.get_tensor(k)) for k in fh.keys() if k.endswith(".alpha")}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.prediction_type"] == "v"
    assert alphas == {2.0}
    with pytest.raises(ConfigError):              # an SD 1.x-length list is refused for an SDXL run
        preflight(_cfg(sdxl_ckpt, tmp_path, network_args=[f"block_dims={','.join(['4'] * 25)}"]))
