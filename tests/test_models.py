"""models/: checkpoint reading and writing, ldm <-> diffusers conversion, config inference, loading."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.models import (diffusers_to_ldm, encode_prompts, ensure_hashes, file_hashes, ldm_to_diffusers,
                                   load_sd_model, save_checkpoint, split_ldm, tiny_sd1_state_dict,
                                   write_tiny_checkpoint)
from lib_lora_train.models.ckpt import read_checkpoint, read_safetensors_metadata
from lib_lora_train.models.convert import TE_PREFIX, te_for_model, te_to_text_model_layout
from lib_lora_train.models.infer import detect_family, sd1_architecture

SMALL = dict(unet_channels=(32, 64), vae_channels=(32, 32), unet_layers=1, transformer_depth=2, text_layers=1)
LINEAR = dict(unet_channels=(32, 64, 64), unet_attention=(False, True, True), use_linear_projection=True)




@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_sd1_state_dict(seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    return load_sd_model(tiny_sd)


def _same_model(a, b):
    """Equal weights in every module, and the same UNet output (up to float rounding: tensors read from a file
    are aligned differently in memory, which can change the CPU kernels' summation order)."""
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.allclose(_unet_out(a), _unet_out(b), rtol=1e-5, atol=1e-6)


def _unet_out(model, prompts=("a photo of a cat",), clip_skip=None):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(prompts), 4, 16, 16, generator=g)
    with torch.no_grad():
        ctx = encode_prompts(model, list(prompts), clip_skip=clip_skip)
        return model.unet(latents, torch.tensor([500] * len(prompts)), encoder_hidden_states=ctx).sample


# ---------------------------------------------------------------- conversion

@pytest.mark.parametrize("sizes", [{}, SMALL, LINEAR], ids=["sd1-tiny", "2-levels-depth2", "linear-proj"])
def test_ldm_diffusers_round_trip_is_exact(sizes):
    sd = tiny_sd1_state_dict(seed=3, **sizes)
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    unet, vae, te = ldm_to_diffusers(sd)
    assert not any(k.startswith(("model.", "first_stage_model.", "cond_stage_model.")) for k in [*unet, *vae, *te])
    assert all(k.startswith("text_model.") for k in te)
    assert vae["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2   # 1x1 conv -> Linear
    parts = split_ldm(sd)
    assert set(parts.ema) == {"model_ema.decay"} and "alphas_cumprod" in parts.other
    back = diffusers_to_ldm(unet, vae, te, extra={**parts.other, **parts.ema})
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].shape == t.shape and back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_legacy_text_encoder_layout_is_accepted(tiny_sd, tiny_model):
    legacy = {(TE_PREFIX + k[len(TE_PREFIX + "text_model."):] if k.startswith(TE_PREFIX) else k): t
              for k, t in tiny_sd.items()}
    assert not any(k.startswith(TE_PREFIX + "text_model.") for k in legacy)
    unet, vae, te = ldm_to_diffusers(legacy)
    assert te.keys() == ldm_to_diffusers(tiny_sd)[2].keys()
    assert diffusers_to_ldm(unet, vae, te, legacy_te_layout=True).keys() == legacy.keys()
    _same_model(load_sd_model(legacy), tiny_model)


def test_position_ids_are_optional_and_never_trusted(tiny_sd, tiny_model):
    pos_key = TE_PREFIX + "text_model.embeddings.position_ids"
    without = {k: t for k, t in tiny_sd.items() if k != pos_key}
    _same_model(load_sd_model(without), tiny_model)
    damaged = {**tiny_sd, pos_key: torch.arange(77).float().unsqueeze(0) * 0.999}   # as in some merged files
    _same_model(load_sd_model(damaged), tiny_model)


def test_incomplete_checkpoint_is_refused(tiny_sd):
    no_vae = {k: t for k, t in tiny_sd.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="no VAE"):
        load_sd_model(no_vae)


def test_conversion_agrees_with_diffusers_own_converter():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    sd = tiny_sd1_state_dict(seed=1, **LINEAR)
    model = load_sd_model(sd)
    unet, vae, _ = ldm_to_diffusers(sd)
    ref_unet = single_file.convert_ldm_unet_checkpoint(dict(sd), dict(model.unet.config))
    ref_vae = single_file.convert_ldm_vae_checkpoint(dict(sd), dict(model.vae.config))
    for mine, ref in ((unet, ref_unet), (vae, ref_vae)):
        assert set(mine) == set(ref)
        for k in mine:
            assert mine[k].shape == ref[k].shape and torch.equal(mine[k], ref[k]), k


def test_text_encoder_keys_follow_the_instantiated_model():
    te = {"text_model.embeddings.token_embedding.weight": torch.zeros(3), "text_model.final_layer_norm.bias":
          torch.ones(2)}
    nested = te_for_model(te, ["text_model.embeddings.token_embedding.weight"])    # transformers < 5.6
    flat = te_for_model(te, ["embeddings.token_embedding.weight"])                 # transformers >= 5.6
    assert set(nested) == set(te)
    assert set(flat) == {"embeddings.token_embedding.weight", "final_layer_norm.bias"}
    assert flat["final_layer_norm.bias"] is te["text_model.final_layer_norm.bias"]
    assert te_to_text_model_layout(flat).keys() == te.keys()


def test_loaded_text_encoder_converts_back_to_ldm(tiny_sd, tiny_model):
    # whatever layout this transformers version gives the CLIPTextModel, its weights go back to ldm keys
    own = {k: v for k, v in tiny_model.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    unet, vae, _ = ldm_to_diffusers(tiny_sd)
    ldm = diffusers_to_ldm(unet, vae, own)
    te_keys = {k for k in tiny_sd if k.startswith(TE_PREFIX) and not k.endswith("position_ids")}
    assert {k for k in ldm if k.startswith(TE_PREFIX)} == te_keys
    assert all(torch.equal(ldm[k], tiny_sd[k]) for k in te_keys)


# ---------------------------------------------------------------- loading

def test_load_from_file_equals_load_from_dict(tmp_path, tiny_sd, tiny_model):
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors", seed=0)
    from_file = load_sd_model(path)
    _same_model(from_file, tiny_model)
    assert from_file.info.name == "tiny.safetensors" and from_file.info.path == str(path)
    data = path.read_bytes()
    assert from_file.info.legacy_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert from_file.info.sha256 is None   # the full hash is computed only on request
    assert ensure_hashes(from_file.info).sha256 == hashlib.sha256(data).hexdigest()
    assert read_safetensors_metadata(path)["lib_lora_train.tiny_seed"] == "0"
    info = tiny_model.info
    assert (info.family, info.base_model_version, info.v2, info.prediction_type) == ("sd1", "sd_v1", False,
                                                                                      "epsilon")
    assert info.latent_scale == pytest.approx(0.18215) and info.name == "model" and info.path is None


def test_modules_share_the_given_tensors_when_dtype_matches(tiny_sd, tiny_model):
    given = {t.data_ptr() for t in tiny_sd.values()}
    for module in (tiny_model.unet, tiny_model.vae, tiny_model.text_encoder):
        params = list(module.parameters())
        assert params and all(p.data_ptr() in given for p in params)
        assert not module.training and not any(p.requires_grad for p in params)
    half = load_sd_model(tiny_sd, dtype=torch.float16)
    for module in (half.unet, half.vae, half.text_encoder):
        assert all(p.dtype == torch.float16 and p.data_ptr() not in given for p in module.parameters())
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert torch.equal(half.unet.conv_in.weight, tiny_model.unet.conv_in.weight.half())


def test_one_dtype_per_module_when_the_file_mixes_them(tiny_sd):
    mixed = {k: (t.half() if k.startswith("first_stage_model.") else t) for k, t in tiny_sd.items()}
    mixed["model.diffusion_model.out.2.bias"] = mixed["model.diffusion_model.out.2.bias"].half()
    model = load_sd_model(mixed)
    assert {p.dtype for p in model.vae.parameters()} == {torch.float16}
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}


def test_unet_output_depends_on_the_prompt(tiny_model):
    out = _unet_out(tiny_model, ("a photo of a cat", "a red car"))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_ckpt_with_state_dict_loads(tmp_path, tiny_sd, tiny_model):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": dict(tiny_sd), "global_step": 470000, "epoch": 6}, path)
    assert read_checkpoint(path).keys() == tiny_sd.keys()
    _same_model(load_sd_model(path), tiny_model)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):   # unpickling calls open(marker, "w"): a stand-in for any code execution
        return (open, (self.marker, "w"))


def test_malicious_ckpt_is_refused_and_its_payload_does_not_run(tmp_path, tiny_sd):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(ModelError, match="safetensors") as err:
        load_sd_model(path)
    assert "refuses" in str(err.value)
    assert not marker.exists()
    # the file really carries the payload: a plain unpickler runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_lora_file_is_refused_clearly():
    # every other refusal (SD3, FLUX, refiner, inpainting, diffusers layout, ...): tests/test_models_detect.py
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(ModelError, match="LoRA"):
        load_sd_model(sd)


def test_overrides(tiny_sd, tiny_model):
    model = load_sd_model(tiny_sd, overrides={"num_heads": 4, "prediction_type": "v_prediction",
                                              "latent_scale": 0.13})
    attn = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.heads == 4
    assert tiny_model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    assert not torch.allclose(_unet_out(model), _unet_out(tiny_model))   # heads change the computation
    assert model.info.prediction_type == "v_prediction" and model.info.base_model_version == "sd_v1_v"
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    assert model.info.latent_scale == 0.13 and model.vae.config.scaling_factor == 0.13
    with pytest.raises(ConfigError, match="num_heads"):
        load_sd_model(tiny_sd, overrides={"num_head": 4})
    with pytest.raises(ModelError, match="not divisible by 3 heads"):
        load_sd_model(tiny_sd, overrides={"num_heads": 3})


def test_noise_scheduler_follows_sd1_or_the_checkpoint(tiny_sd, tiny_model):
    sched = tiny_model.noise_scheduler
    cfg = sched.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.clip_sample, cfg.prediction_type) == (
        1000, "scaled_linear", False, "epsilon")
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sched.betas.double(), expected, rtol=1e-5)
    sd1_alphas = torch.cumprod(1 - expected, 0)
    for stored in (sd1_alphas.float(), sd1_alphas.half()):   # SD1's own schedule, even stored in fp16
        model = load_sd_model({**tiny_sd, "alphas_cumprod": stored})
        assert model.info.extra["schedule"] == "sd1"
    linear = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    model = load_sd_model({**tiny_sd, "betas": linear.float(), "alphas_cumprod": torch.cumprod(1 - linear, 0)})
    assert model.info.extra["schedule"] == "checkpoint"
    assert torch.allclose(model.noise_scheduler.alphas_cumprod.double(), torch.cumprod(1 - linear, 0), rtol=1e-5)
    assert {"betas", "alphas_cumprod"} <= set(model.info.extra["ldm_extra_keys"])


# ---------------------------------------------------------------- config inference

def test_inferred_configs_of_scaled_down_models():
    sd = tiny_sd1_state_dict(seed=0, **SMALL)
    unet, vae, te = ldm_to_diffusers(sd)
    arch = sd1_architecture(unet, vae, te)
    assert arch.unet["block_out_channels"] == (32, 64) and arch.unet["layers_per_block"] == 1
    assert arch.unet["down_block_types"] == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert arch.unet["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D")
    assert arch.unet["transformer_layers_per_block"] == 2 and arch.unet["cross_attention_dim"] == 32
    assert arch.unet["use_linear_projection"] is False
    assert arch.vae["block_out_channels"] == (32, 32) and arch.vae["layers_per_block"] == 1
    assert arch.text["num_hidden_layers"] == 1 and arch.text["hidden_size"] == 32
    assert arch.text["num_attention_heads"] == 1
    lin = sd1_architecture(*ldm_to_diffusers(tiny_sd1_state_dict(seed=0, **LINEAR)))
    assert lin.unet["use_linear_projection"] is True
    assert lin.unet["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")


def _sd15_on_meta():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(   # SD1.5 (runwayml v1-5 unet/config.json values)
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    te_sd = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    return diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te_sd)


def test_inferred_configs_of_full_size_sd15_on_meta():
    sd = _sd15_on_meta()
    assert all(t.is_meta for t in sd.values())
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd and "model.diffusion_model.out.2.weight" in sd
    assert detect_family(sd) == "sd1"
    arch = sd1_architecture(*ldm_to_diffusers(sd))
    u, v, t = arch.unet, arch.vae, arch.text
    assert u["block_out_channels"] == (320, 640, 1280, 1280) and u["layers_per_block"] == 2
    assert u["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert u["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (u["cross_attention_dim"], u["attention_head_dim"], u["transformer_layers_per_block"]) == (768, 8, 1)
    assert (u["in_channels"], u["out_channels"], u["sample_size"], u["use_linear_projection"]) == (4, 4, 64, False)
    assert "time_embedding_dim" not in u
    assert v["block_out_channels"] == (128, 256, 512, 512) and v["layers_per_block"] == 2
    assert (v["latent_channels"], v["scaling_factor"], v["sample_size"]) == (4, 0.18215, 512)
    assert (t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["num_attention_heads"]) == (
        768, 12, 3072, 12)
    assert (t["vocab_size"], t["max_position_embeddings"], t["hidden_act"]) == (49408, 77, "quick_gelu")


# ---------------------------------------------------------------- files

def test_save_checkpoint_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.safetensors"
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"a": base.reshape(3, 4), "b": base[:6], "c": torch.randn(300_000)}   # a and b share storage
    save_checkpoint(path, tensors, {"k": "v"})
    assert read_safetensors_metadata(path) == {"k": "v"}
    back = read_checkpoint(path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ModelError, match="exists"):
        save_checkpoint(path, {"a": torch.zeros(1)})
    save_checkpoint(path, {"a": torch.zeros(1)}, overwrite=True)
    assert set(read_checkpoint(path)) == {"a"}
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]   # no temp files left behind
    with pytest.raises(ModelError, match="strings"):
        save_checkpoint(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, {"n": 1})


def test_file_hashes(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(0x100000 + 0x20000)
    path.write_bytes(data)
    h = file_hashes(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest()
    assert h.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_tiny_checkpoint_is_deterministic_per_seed():
    a, b, c = tiny_sd1_state_dict(seed=5, **SMALL), tiny_sd1_state_dict(seed=5, **SMALL), \
        tiny_sd1_state_dict(seed=6, **SMALL)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.diffusion_model.out.2.weight"], c["model.diffusion_model.out.2.weight"])
    assert a["model.diffusion_model.out.2.weight"].abs().sum() > 0   # output conv is not zero-initialised
    with pytest.raises(ModelError, match="norm_groups"):
        tiny_sd1_state_dict(unet_channels=(32, 48))

