"""SD 2.x checkpoints: OpenCLIP ViT-H -> a transformers CLIPTextModel without the last layer (sd-scripts'
conversion), shared tensors, v-prediction marker and override, full-size shapes on the meta device, clip_skip."""
from __future__ import annotations

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.models import (diffusers_to_ldm, encode_text, load_sd_model, split_ldm, tiny_sd2_state_dict,
                                   tokenize, write_tiny_checkpoint)
from lib_lora_train.models.convert import require_complete, unet_ldm_to_diffusers, vae_ldm_to_diffusers
from lib_lora_train.models.detect import detect_checkpoint, detect_family
from lib_lora_train.models.infer import sd1_architecture
from lib_lora_train.models.openclip import openclip_to_transformers
from openclip_reference import layer_norm, openclip_text

BOS, EOS = 49406, 49407
TE = "cond_stage_model.model."




@pytest.fixture(scope="module")
def sd():
    return tiny_sd2_state_dict(seed=0)


@pytest.fixture(scope="module")
def model(sd):
    return load_sd_model(sd)


def test_loads_as_sd2_512(model):
    from transformers import CLIPTextModel

    info = model.info
    assert (info.family, info.v2, info.prediction_type, info.base_model_version) == ("sd2", True, "epsilon", "sd_v2")
    assert info.native_resolution == 512 and info.latent_scale == pytest.approx(0.18215)
    assert info.architecture == "stable-diffusion-v2-512/lora" and info.implementation == "diffusers"
    assert type(model.text_encoder) is CLIPTextModel and model.text_encoder_2 is None
    assert model.text_encoders == [model.text_encoder] and model.tokenizers == [model.tokenizer]
    te_cfg = model.text_encoder.config
    assert te_cfg.num_hidden_layers == 2 and te_cfg.hidden_act == "gelu"   # 3 in the file, the last dropped
    assert model.unet.config.use_linear_projection and model.unet.config.sample_size == 64
    dropped = [k for k in info.extra["ldm_extra_keys"] if k.startswith(TE)]
    assert TE + "transformer.resblocks.2.attn.in_proj_weight" in dropped and TE + "text_projection" in dropped
    assert not any(".resblocks.1." in k for k in dropped)
    assert model.noise_scheduler.config.prediction_type == "epsilon"


def test_v_prediction_from_the_marker_or_the_override(tmp_path, sd):
    marked = load_sd_model(tiny_sd2_state_dict(seed=0, v_pred=True))
    override = load_sd_model(sd, overrides={"prediction_type": "v_prediction"})
    for m in (marked, override):
        info = m.info
        assert (info.prediction_type, info.base_model_version, info.native_resolution) == (
            "v_prediction", "sd_v2_v", 768)
        assert info.architecture == "stable-diffusion-v2-768-v/lora"
        assert m.noise_scheduler.config.prediction_type == "v_prediction" and m.unet.config.sample_size == 96
    assert marked.info.extra["prediction_source"] == "marker"
    path = write_tiny_checkpoint(tmp_path / "v.safetensors", seed=0, family="sd2", v_pred=True)
    assert detect_checkpoint(path) == ("sd2", "v_prediction")
    assert detect_checkpoint(write_tiny_checkpoint(tmp_path / "e.safetensors", family="sd2")) == ("sd2", "epsilon")
    assert load_sd_model(path).info.prediction_type == "v_prediction"


def test_v_prediction_probe_for_unmarked_full_size_files(sd, monkeypatch):
    from types import SimpleNamespace

    from lib_lora_train.models import loader

    class FakeUNet(torch.nn.Module):   # a stand-in with the output a v / epsilon model gives at t = 999
        def __init__(self, shift):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.shift = shift
            self.config = SimpleNamespace(in_channels=4, cross_attention_dim=1024)

        def forward(self, x, t, encoder_hidden_states):
            assert int(t) == 999 and encoder_hidden_states.shape == (1, 2, 1024)
            return SimpleNamespace(sample=x + self.shift)

    assert loader.sd2_v_prediction_probe(FakeUNet(-1.5)) is True
    assert loader.sd2_v_prediction_probe(FakeUNet(0.1)) is False
    sd2_21 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, in_channels=4)
    assert loader.is_a1111_sd2_unet(sd2_21) and not loader.is_a1111_sd2_unet({**sd2_21, "cross_attention_dim": 768})
    assert load_sd_model(sd).info.extra["prediction_source"] == "default"   # tiny shapes: no probe
    monkeypatch.setattr(loader, "is_a1111_sd2_unet", lambda cfg: True)
    monkeypatch.setattr(loader, "sd2_v_prediction_probe", lambda unet: True)
    probed = load_sd_model(sd)
    assert (probed.info.prediction_type, probed.info.extra["prediction_source"], probed.info.native_resolution,
            probed.unet.config.sample_size) == ("v_prediction", "probe", 768, 96)
    told = load_sd_model(sd, overrides={"prediction_type": "epsilon"})   # an explicit setting is not second-guessed
    assert (told.info.prediction_type, told.info.extra["prediction_source"]) == ("epsilon", "override")


def test_modules_share_the_given_tensors_including_qkv_views(sd, model):
    storages = {t.untyped_storage().data_ptr() for t in sd.values()}
    for module in (model.unet, model.vae, model.text_encoder):
        assert all(p.untyped_storage().data_ptr() in storages for p in module.parameters())
    fused = sd[TE + "transformer.resblocks.0.attn.in_proj_weight"]
    width = fused.shape[1]
    layers = model.text_encoder.get_submodule("text_model.encoder.layers" if hasattr(
        model.text_encoder, "text_model") else "encoder.layers")
    attn = layers[0].self_attn
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert proj.weight.data_ptr() == fused[i * width:(i + 1) * width].data_ptr()


def test_ldm_diffusers_round_trip_is_exact(sd):
    parts = require_complete(split_ldm(sd), "sd2")
    te, unused = openclip_to_transformers(parts.open_clip, drop_last_layer=True, with_projection=False, label="te")
    extra = {**parts.other, **{TE + k: t for k, t in unused.items()}}
    back = diffusers_to_ldm(unet_ldm_to_diffusers(parts.unet), vae_ldm_to_diffusers(parts.vae), te, family="sd2",
                            extra=extra)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], t) for k, t in sd.items())


@pytest.fixture(scope="module")
def wide():
    sd = tiny_sd2_state_dict(seed=3, text_hidden=128, text_intermediate=256, text_layers=4)   # 2 heads of 64
    return sd, load_sd_model(sd, dtype=torch.float64)


def test_vit_h_conversion_matches_a_float64_openclip_reference(wide):
    sd, model = wide
    assert model.text_encoder.config.num_attention_heads == 2 and model.text_encoder.config.num_hidden_layers == 3
    captions = ["a photo of a cat", "a watercolor of a lighthouse at dusk, soft light"]
    ids = tokenize(model, captions)[:, 0]
    ref = openclip_text(sd, TE, ids, heads=2)
    out = model.text_encoder(ids, output_hidden_states=True, return_dict=True)
    tol = 1e-9 * max(float(ref["layers"][-1].abs().max()), 1.0)   # float64 both sides
    for i in range(3):
        assert torch.allclose(out.hidden_states[i + 1], ref["layers"][i], atol=tol, rtol=0), i
    penultimate = layer_norm(ref["layers"][-2], *ref["ln_final"])   # ldm FrozenOpenCLIPEmbedder "penultimate"
    assert torch.allclose(encode_text(model, captions).hidden, penultimate, atol=tol, rtol=0)
    skip2 = layer_norm(ref["layers"][-3], *ref["ln_final"])
    assert torch.allclose(encode_text(model, captions, clip_skip=2).hidden, skip2, atol=tol, rtol=0)


def test_tokenizer_pads_with_zero_and_chunks_like_sd_scripts(model):
    ids = tokenize(model, ["a photo of a cat"])
    assert ids[0, 0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS] and set(ids[0, 0, 7:].tolist()) == {0}
    long = tokenize(model, [" ".join(["cat"] * 80)], max_token_length=150)
    assert long.shape == (1, 2, 77) and long[0, 0, -1] == EOS and long[0, 1, 6] == EOS
    assert tokenize(model, ["cat"], max_token_length=225)[0, 2, :3].tolist() == [BOS, EOS, 0]
    cond = encode_text(model, ["cat"], max_token_length=225)
    assert cond.hidden.shape == (1, 227, 32) and cond.pooled is None


def test_an_empty_piece_keeps_its_eos_state_as_in_sd_scripts(model):
    # sd-scripts' v2 "empty piece" fix-up compares a token id with the string "<|endoftext|>", which is never
    # equal, so the EOS state of an empty piece stays where it is; the same here
    ids = tokenize(model, ["cat"], max_token_length=150)
    assert ids[0, 1, 1] == EOS
    joined = encode_text(model, ["cat"], max_token_length=150).hidden
    per_piece = model.text_encoder(ids[0])[0]   # [2 pieces, 77, C]
    tol = 1e-6 * float(per_piece.abs().max())
    assert torch.allclose(joined[0, 76], per_piece[1, 1], atol=tol, rtol=0)
    assert not torch.allclose(joined[0, 76], per_piece[1, 2], atol=tol, rtol=0)


def test_clip_skip_is_checked_against_the_converted_layer_count(model):
    with pytest.raises(ConfigError, match="from 1 to 2"):
        encode_text(model, ["a cat"], clip_skip=3)


# ---------------------------------------------------------------- full size, on the meta device

def test_full_size_sd2_on_meta():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():   # stabilityai/stable-diffusion-2-1 unet/config.json values
        unet = UNet2DConditionModel(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        vit_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, hidden_act="gelu"))
    strip = (lambda m: {k: v for k, v in m.state_dict().items() if not k.endswith("position_ids")})
    sd = diffusers_to_ldm(strip(unet), strip(vae), strip(vit_h), family="sd2")
    assert tuple(sd[TE + "transformer.resblocks.23.attn.in_proj_weight"].shape) == (3072, 1024)
    assert tuple(sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape) == (320, 320)   # linear
    assert detect_family(sd) == "sd2"
    parts = split_ldm(sd)
    te, unused = openclip_to_transformers(parts.open_clip, drop_last_layer=True, with_projection=False, label="te")
    assert len(unused) == 12   # resblock 23: ln_1, in_proj, out_proj, ln_2, c_fc, c_proj (weight + bias)
    arch = sd1_architecture(unet_ldm_to_diffusers(parts.unet), vae_ldm_to_diffusers(parts.vae), te, family="sd2")
    assert tuple(arch.unet["attention_head_dim"]) == (5, 10, 20, 20)
    assert arch.unet["cross_attention_dim"] == 1024 and arch.unet["use_linear_projection"] is True
    t = arch.text
    assert (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"],
            t["hidden_act"], t["pad_token_id"]) == (1024, 23, 16, 4096, "gelu", 0)
