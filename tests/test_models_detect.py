"""Family detection from keys and shapes (safetensors header only) and the refusals, each naming what is
supported."""
from __future__ import annotations

import pytest
import torch

from lib_lora_train.errors import ModelError
from lib_lora_train.models import (SUPPORTED, detect_checkpoint, ldm_to_diffusers, load_sd_model, save_checkpoint,
                                   tiny_sd1_state_dict, tiny_sdxl_state_dict)
from lib_lora_train.models.detect import read_header_shapes

SMALL = dict(unet_channels=(32, 64), vae_channels=(32, 32), unet_layers=1, text_layers=1)


def _refiner(xl):
    """An SDXL refiner's layout: only the bigG embedder, as conditioner.embedders.0.model.*."""
    out = {k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.0.")}
    return {k.replace("conditioner.embedders.1.model.", "conditioner.embedders.0.model."): v for k, v in out.items()}


def _cases():
    sd1 = tiny_sd1_state_dict(seed=0, **SMALL)
    xl = tiny_sdxl_state_dict(seed=0, unet_layers=1)
    z = torch.zeros(2, 2)
    return {
        "refiner": (_refiner(xl), "SDXL refiner"),
        "sd3": ({**sd1, "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": z}, "Stable Diffusion 3"),
        "flux": ({"double_blocks.0.img_attn.qkv.weight": z, "img_in.weight": z}, "FLUX"),
        "flux-prefixed": ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": z}, "FLUX"),
        "inpainting": (tiny_sd1_state_dict(seed=0, in_channels=9, **SMALL), "inpainting"),
        "pix2pix": (tiny_sd1_state_dict(seed=0, in_channels=8, **SMALL), "instruct-pix2pix"),
        "sdxl-inpainting": ({**xl, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
                            "inpainting"),
        "unclip": ({**sd1, "embedder.model.ln_final.weight": torch.zeros(1024)}, "unCLIP"),
        "depth": ({**sd1, "depth_model.model.pretrained.act_postprocess3.0.project.0.bias": z}, "depth"),
        "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z}, "LoRA"),
        "lycoris": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": z}, "LoRA"),
        "diffusers": (ldm_to_diffusers(sd1)[0], "diffusers"),
        "unknown": ({"foo.weight": z}, "not a Stable Diffusion checkpoint"),
        "unet-only": ({k: v for k, v in sd1.items() if k.startswith("model.")}, "no text encoder"),
        "sdxl-half": ({k: v for k, v in xl.items() if not k.startswith("conditioner.embedders.1.")},
                      "conditioner.embedders.1.model"),
    }


@pytest.fixture(scope="module")
def cases():
    return _cases()


@pytest.mark.parametrize("kind", ["refiner", "sd3", "flux", "flux-prefixed", "inpainting", "pix2pix",
                                  "sdxl-inpainting", "unclip", "depth", "lora", "lycoris", "diffusers", "unknown",
                                  "unet-only", "sdxl-half"])
def test_refusals_say_what_the_file_is_and_what_is_supported(cases, kind):
    sd, what = cases[kind]
    with pytest.raises(ModelError) as err:
        load_sd_model(sd)
    assert what in str(err.value) and SUPPORTED in str(err.value)
    with pytest.raises(ModelError, match=what):
        detect_checkpoint(sd)
    assert "SDXL base-architecture (SDXL, Pony, Illustrious, NoobAI)" in SUPPORTED


def test_a_folder_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError, match="folder"):
        detect_checkpoint(tmp_path)


def test_detection_reads_only_the_safetensors_header(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_checkpoint(path, tiny_sdxl_state_dict(seed=1, unet_layers=1))
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:8 + header_len + 16])   # tensor data gone: any tensor read would fail
    assert detect_checkpoint(cut) == ("sdxl", "epsilon")
    shapes = read_header_shapes(cut)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"].shape == (4 * 32, 32 + 6 * 8)
    with pytest.raises(ModelError, match="safetensors"):
        load_sd_model(cut)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelError, match="header"):
        detect_checkpoint(bad)


def test_sd1_is_still_sd1(tmp_path):
    path = save_checkpoint(tmp_path / "one.safetensors", tiny_sd1_state_dict(seed=0, **SMALL))
    assert detect_checkpoint(path) == ("sd1", "epsilon")
    assert detect_checkpoint({**tiny_sd1_state_dict(seed=0, **SMALL), "v_pred": torch.zeros(0)}) == (
        "sd1", "v_prediction")
