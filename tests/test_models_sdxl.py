"""SDXL base-architecture checkpoints: sgm layout -> diffusers / transformers, shared tensors, full-size shapes on
the meta device, module names both ways, OpenCLIP bigG against a float64 reference, text conditioning."""
from __future__ import annotations

import warnings

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.models import (diffusers_to_ldm, encode_text, load_sd_model, split_ldm, tiny_sdxl_state_dict,
                                   tokenize_all, write_tiny_checkpoint)
from lib_lora_train.models.convert import (UNET_PREFIX, require_complete, unet_ldm_to_diffusers, unet_module_names,
                                           vae_ldm_to_diffusers)
from lib_lora_train.models.detect import detect_checkpoint, detect_family
from lib_lora_train.models.infer import sd1_architecture
from lib_lora_train.models.openclip import openclip_to_transformers
from lib_lora_train.models.text import SDXL_CLIP_SKIP_NOTE, encode_text_tokens
from openclip_reference import openclip_text

BOS, EOS = 49406, 49407
TE2 = "conditioner.embedders.1.model."




@pytest.fixture(scope="module")
def sd():
    return tiny_sdxl_state_dict(seed=0)


@pytest.fixture(scope="module")
def model(sd):
    return load_sd_model(sd)


def _unet_out(model, cond, time_ids=None):
    g = torch.Generator().manual_seed(1)
    b = cond.hidden.shape[0]
    latents = torch.randn(b, 4, 16, 16, generator=g)
    if time_ids is None:
        time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * b)
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500] * b), encoder_hidden_states=cond.hidden,
                          added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample


# ---------------------------------------------------------------- loading

def test_loads_as_sdxl_with_two_text_encoders(model):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    info = model.info
    assert (info.family, info.v2, info.prediction_type, info.base_model_version) == (
        "sdxl", False, "epsilon", "sdxl_base_v1-0")
    assert info.native_resolution == 1024 and info.latent_scale == pytest.approx(0.13025)
    assert model.vae.config.scaling_factor == pytest.approx(0.13025)
    assert info.architecture == "stable-diffusion-xl-v1-base/lora"
    assert info.implementation == "https://github.com/Stability-AI/generative-models"
    assert type(model.text_encoder) is CLIPTextModel and type(model.text_encoder_2) is CLIPTextModelWithProjection
    assert model.text_encoders == [model.text_encoder, model.text_encoder_2]
    assert model.tokenizers == [model.tokenizer, model.tokenizer_2]
    cfg = model.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert (cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) == (8, 32 + 6 * 8)
    assert cfg.cross_attention_dim == 32 + 64 and cfg.use_linear_projection
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert model.text_encoder_2.config.hidden_act == "gelu" and model.text_encoder.config.hidden_act == "quick_gelu"
    assert model.text_encoder_2.config.num_hidden_layers == 3   # bigG keeps every layer
    for m in (model.unet, model.vae, *model.text_encoders):
        assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_v_prediction_sdxl_from_its_markers(sd):
    marked = load_sd_model({**sd, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})   # as NoobAI-XL v-pred files
    info = marked.info
    assert (info.family, info.prediction_type, info.base_model_version, info.native_resolution) == (
        "sdxl", "v_prediction", "sdxl_base_v1-0", 1024)
    assert info.extra["markers"] == ["v_pred", "ztsnr"] and info.extra["prediction_source"] == "marker"
    assert marked.noise_scheduler.config.prediction_type == "v_prediction"
    assert detect_checkpoint({**sd, "v_pred": torch.zeros(0)}) == ("sdxl", "v_prediction")


def test_from_file_equals_from_dict(tmp_path, model):
    path = write_tiny_checkpoint(tmp_path / "xl.safetensors", seed=0, family="sdxl")
    assert detect_checkpoint(path) == ("sdxl", "epsilon")
    loaded = load_sd_model(path)
    assert loaded.info.family == "sdxl" and loaded.info.name == "xl.safetensors"
    for a, b in zip((loaded.unet, loaded.vae, *loaded.text_encoders), (model.unet, model.vae, *model.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_modules_share_the_given_tensors_including_qkv_views(sd, model):
    storages = {t.untyped_storage().data_ptr() for t in sd.values()}
    for module in (model.unet, model.vae, *model.text_encoders):
        params = list(module.parameters())
        assert params and all(p.untyped_storage().data_ptr() in storages for p in params)
    layer = model.text_encoder_2.text_model.encoder.layers[1].self_attn
    fused = sd[TE2 + "transformer.resblocks.1.attn.in_proj_weight"]
    width = fused.shape[1]
    for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
        assert proj.weight.data_ptr() == fused[i * width:(i + 1) * width].data_ptr()   # a view, no copy
        assert torch.equal(proj.weight, fused[i * width:(i + 1) * width])
    bias = sd[TE2 + "transformer.resblocks.1.attn.in_proj_bias"]
    assert layer.v_proj.bias.data_ptr() == bias[2 * width:].data_ptr()
    proj = sd[TE2 + "text_projection"]
    assert model.text_encoder_2.text_projection.weight.data_ptr() == proj.data_ptr()
    assert torch.equal(model.text_encoder_2.text_projection.weight, proj.t())


def test_half_precision_load_copies(sd):
    half = load_sd_model(sd, dtype=torch.float16)
    assert {p.dtype for m in (half.unet, *half.text_encoders) for p in m.parameters()} == {torch.float16}
    fused = sd[TE2 + "transformer.resblocks.0.attn.in_proj_weight"]
    q = half.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, fused[:fused.shape[1]].half())


def test_sgm_diffusers_round_trip_is_exact(sd):
    sd = {**sd, "model_ema.decay": torch.tensor(0.9999)}
    parts = require_complete(split_ldm(sd), "sdxl")
    unet = unet_ldm_to_diffusers(parts.unet)
    assert "add_embedding.linear_1.weight" in unet and "add_embedding.linear_2.bias" in unet
    te2, unused = openclip_to_transformers(parts.open_clip, drop_last_layer=False, with_projection=True, label="te2")
    assert not unused
    back = diffusers_to_ldm(unet, vae_ldm_to_diffusers(parts.vae), parts.text_encoder, family="sdxl", te2_sd=te2,
                            extra={**parts.other, **parts.ema})
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].shape == t.shape and torch.equal(back[k], t), k


def test_conversion_agrees_with_diffusers_own_converter(sd, model):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    ref = single_file.convert_ldm_unet_checkpoint(dict(sd), dict(model.unet.config))
    mine = unet_ldm_to_diffusers(split_ldm(sd).unet)
    assert set(mine) == set(ref)
    assert all(torch.equal(mine[k], ref[k]) for k in mine)


# ---------------------------------------------------------------- full size, on the meta device

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)   # stabilityai/stable-diffusion-xl-base-1.0 unet


@pytest.fixture(scope="module")
def full_size():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280, hidden_act="gelu"))
    strip = (lambda m: {k: v for k, v in m.state_dict().items() if not k.endswith("position_ids")})
    sd = diffusers_to_ldm(strip(unet), strip(vae), strip(te1), family="sdxl", te2_sd=strip(te2))
    return unet, sd


def test_full_size_sgm_names_and_inferred_config(full_size):
    unet, sd = full_size
    assert all(t.is_meta for t in sd.values())
    expect = {"label_emb.0.0.weight": (1280, 2816), "label_emb.0.2.weight": (1280, 1280),
              "time_embed.0.weight": (1280, 320), "input_blocks.3.0.op.weight": (320, 320, 3, 3),
              "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
              "input_blocks.4.1.proj_in.weight": (640, 640),
              "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
              "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
              "middle_block.1.transformer_blocks.9.attn1.to_out.0.weight": (1280, 1280),
              "middle_block.2.emb_layers.1.weight": (1280, 1280), "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
              "output_blocks.5.2.conv.weight": (640, 640, 3, 3), "output_blocks.8.0.skip_connection.weight":
              (320, 640, 1, 1), "output_blocks.0.1.transformer_blocks.9.norm3.weight": (1280,),
              "out.2.weight": (4, 320, 3, 3)}
    for k, shape in expect.items():
        assert tuple(sd[UNET_PREFIX + k].shape) == shape, k
    for absent in ("input_blocks.9.0.in_layers.0.weight", "output_blocks.8.1.proj_in.weight",
                   "input_blocks.1.1.proj_in.weight"):
        assert UNET_PREFIX + absent not in sd
    assert tuple(sd[TE2 + "transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    assert tuple(sd[TE2 + "text_projection"].shape) == (1280, 1280)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in sd
    assert detect_family(sd) == "sdxl"

    parts = split_ldm(sd)
    te2, _ = openclip_to_transformers(parts.open_clip, drop_last_layer=False, with_projection=True, label="te2")
    arch = sd1_architecture(unet_ldm_to_diffusers(parts.unet), vae_ldm_to_diffusers(parts.vae), parts.text_encoder,
                            family="sdxl", te2=te2)
    u = arch.unet
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                "up_block_types", "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "sample_size"):
        assert u[key] == SDXL_UNET[key], key
    assert tuple(u["attention_head_dim"]) == (5, 10, 20)
    assert tuple(u["transformer_layers_per_block"])[1:] == (2, 10)   # level 0 has no attention: entry unused
    t2 = arch.text_2
    assert (t2["hidden_size"], t2["num_hidden_layers"], t2["num_attention_heads"], t2["intermediate_size"],
            t2["projection_dim"], t2["hidden_act"]) == (1280, 32, 20, 5120, 1280, "gelu")
    assert (arch.text["hidden_size"], arch.text["num_hidden_layers"], arch.text["num_attention_heads"]) == (768, 12, 12)
    assert arch.vae["scaling_factor"] == pytest.approx(0.13025)


def test_full_size_agrees_with_diffusers_converter_on_meta(full_size):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    unet, sd = full_size
    ref = single_file.convert_ldm_unet_checkpoint(dict(sd), dict(unet.config))
    assert set(ref) == set(unet.state_dict())


def _check_module_map(unet):
    names = unet_module_names(unet)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert layers and set(layers) <= set(names)
    assert len(set(names.values())) == len(names)   # one ldm name per module
    ldm_keys = {names[n] + ".weight": n for n in layers}
    back = unet_ldm_to_diffusers({k: k for k in ldm_keys})   # and back from the ldm names alone
    assert {back_key: ldm for back_key, ldm in back.items()} == {n + ".weight": k for k, n in ldm_keys.items()}
    return names


def test_module_names_both_ways_on_a_tiny_sdxl_unet(model):
    names = _check_module_map(model.unet)
    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"   # as full size: 2 resnets and a downsampler before
    assert names["add_embedding.linear_1"] == "label_emb.0.0"


def test_a_partial_unet_key_set_is_refused_not_misnumbered(model):
    from lib_lora_train.errors import ModelError
    from lib_lora_train.models.convert import unet_diffusers_to_ldm

    attn_only = {n + ".weight": n for n, m in model.unet.named_modules()
                 if isinstance(m, torch.nn.Linear) and "attentions" in n}
    with pytest.raises(ModelError, match="not a whole UNet"):
        unet_diffusers_to_ldm(attn_only)


def test_module_names_both_ways_on_full_size_sdxl(full_size):
    unet, _ = full_size
    names = _check_module_map(unet)
    expect = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
              "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
              "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj":
              "input_blocks.8.1.transformer_blocks.9.ff.net.0.proj",
              "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
              "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.4.0.emb_layers.1",
              "down_blocks.1.resnets.0.conv2": "input_blocks.4.0.out_layers.3",
              "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
              "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
              "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
              "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
              "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
              "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
              "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
              "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_v":
              "output_blocks.2.1.transformer_blocks.9.attn2.to_v",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_out": "out.2"}
    for d, l in expect.items():
        assert names[d] == l, d
    attn_linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attentions" in n]
    assert len(attn_linears) == 722   # sd-scripts' SDXL LierLa UNet module count (proj_in/out + 10 per block)


# ---------------------------------------------------------------- text

def test_tokenizers_pad_as_sd_scripts(model):
    ids1, ids2 = tokenize_all(model, ["a photo of a cat"])
    assert ids1.shape == ids2.shape == (1, 1, 77)
    body = [320, 1125, 539, 320, 2368]
    assert ids1[0, 0, :7].tolist() == [BOS, *body, EOS] and set(ids1[0, 0, 7:].tolist()) == {EOS}
    assert ids2[0, 0, :7].tolist() == [BOS, *body, EOS] and set(ids2[0, 0, 7:].tolist()) == {0}
    assert model.tokenizer_2.pad_token == "!" and model.tokenizer.pad_token == "<|endoftext|>"


def test_long_captions_are_chunked_per_tokenizer(model):
    words = " ".join(["cat"] * 80)   # 80 tokens: the first piece is full, the second holds 5 words
    ids1, ids2 = tokenize_all(model, [words], max_token_length=150)
    assert ids1.shape == ids2.shape == (1, 2, 77)
    assert ids1[0, 0, -1] == EOS and ids2[0, 0, -1] == EOS        # a full piece ends with EOS (te2: fixed up)
    assert ids2[0, 1, 6] == EOS and set(ids2[0, 1, 7:].tolist()) == {0}
    empty1, empty2 = tokenize_all(model, ["cat"], max_token_length=150)
    assert empty2[0, 1, :3].tolist() == [BOS, EOS, 0]   # an empty piece starts BOS EOS, as sd-scripts makes it
    assert empty1[0, 1, :3].tolist() == [BOS, EOS, EOS]


@pytest.fixture(scope="module")
def wide_sd():
    # 2 heads of width 64 in the bigG tower, so the reference checks the head split too
    return tiny_sdxl_state_dict(seed=4, text_hidden_2=128, text_intermediate_2=256, projection_dim=48)


def test_bigg_matches_a_float64_openclip_reference(wide_sd):
    model = load_sd_model(wide_sd, dtype=torch.float64)
    assert model.text_encoder_2.config.num_attention_heads == 2
    ids = tokenize_all(model, ["a photo of a cat", "an oil painting of a red house by the sea"])[1][:, 0]
    ref = openclip_text(wide_sd, TE2, ids, heads=2)
    out = model.text_encoder_2(ids, output_hidden_states=True, return_dict=True)
    scale = max(float(ref["final"].abs().max()), 1.0)
    tol = 1e-9 * scale   # float64 against float64: only summation order differs
    for i, h in enumerate(ref["layers"]):
        assert torch.allclose(out.hidden_states[i + 1], h, atol=tol, rtol=0), i
    assert torch.allclose(out.last_hidden_state, ref["final"], atol=tol, rtol=0)
    cond = encode_text(model, ["a photo of a cat", "an oil painting of a red house by the sea"])
    assert torch.allclose(cond.pooled, ref["pooled"], atol=tol, rtol=0)
    assert torch.allclose(cond.hidden[..., 32:], ref["layers"][-2], atol=tol, rtol=0)   # te2 layer -2, no norm


def test_encode_text_is_te1_and_te2_penultimate_layers_plus_pooled(model):
    captions = ["a photo of a cat", "dog"]
    cond = encode_text(model, captions)
    assert cond.hidden.shape == (2, 77, 96) and cond.pooled.shape == (2, 32)
    ids1, ids2 = tokenize_all(model, captions)
    h1 = model.text_encoder(ids1[:, 0], output_hidden_states=True).hidden_states[-2]
    out2 = model.text_encoder_2(ids2[:, 0], output_hidden_states=True)
    assert torch.equal(cond.hidden[..., :32], h1) and torch.equal(cond.hidden[..., 32:], out2.hidden_states[-2])
    tol = 1e-5 * float(cond.pooled.abs().max())
    assert torch.allclose(cond.pooled, out2.text_embeds, atol=tol, rtol=0)   # first EOS = transformers' pooling
    assert not torch.allclose(_unet_out(model, cond)[0], _unet_out(model, cond)[1], atol=1e-4)


def test_long_captions_take_pooled_from_the_first_piece(model):
    caption = " ".join(["red cat"] * 50)   # 100 tokens: two pieces
    cond = encode_text(model, [caption], max_token_length=150)
    assert cond.hidden.shape == (1, 152, 96)
    ids1, ids2 = tokenize_all(model, [caption], max_token_length=150)
    first = encode_text_tokens(model, [ids1[:, :1], ids2[:, :1]])
    tol = 1e-6 * float(first.pooled.abs().max())
    assert torch.allclose(cond.pooled, first.pooled, atol=tol, rtol=0)
    assert torch.allclose(cond.hidden[:, :76], first.hidden[:, :76], atol=1e-6 * float(first.hidden.abs().max()))


def test_clip_skip_is_ignored_with_a_warning(model):
    plain = encode_text(model, ["a cat"])
    with pytest.warns(UserWarning, match="clip_skip is ignored for SDXL"):
        skipped = encode_text(model, ["a cat"], clip_skip=2)
    assert torch.equal(plain.hidden, skipped.hidden) and torch.equal(plain.pooled, skipped.pooled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_text(model, ["a cat"], clip_skip=1)
    assert "sd-scripts" in SDXL_CLIP_SKIP_NOTE
    with pytest.raises(ConfigError, match="both text encoders"):
        encode_text_tokens(model, tokenize_all(model, ["a"])[0])


def test_size_conditioning_and_pooled_change_the_unet_output(model):
    cond = encode_text(model, ["a cat"])
    base = _unet_out(model, cond)
    other_size = _unet_out(model, cond, torch.tensor([[64.0, 96.0, 8.0, 0.0, 128.0, 128.0]]))
    assert not torch.allclose(base, other_size, atol=1e-5)


def test_gradients_reach_both_text_encoders(model):
    te2_w = model.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight
    te1_w = model.text_encoder.text_model.encoder.layers[0].mlp.fc1.weight if hasattr(
        model.text_encoder, "text_model") else model.text_encoder.encoder.layers[0].mlp.fc1.weight
    for w in (te1_w, te2_w):
        w.requires_grad_(True)
    try:
        cond = encode_text(model, ["a cat"])
        (cond.hidden.sum() + cond.pooled.sum()).backward()
        assert te1_w.grad is not None and te2_w.grad is not None and te2_w.grad.abs().sum() > 0
    finally:
        for w in (te1_w, te2_w):
            w.requires_grad_(False)
            w.grad = None
