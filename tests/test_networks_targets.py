"""Which layers are adapted, with sd-scripts names, on tiny models and on full-size SD1.5 built on meta."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_lora_train.networks import PRESETS, find_targets
from tiny_diffusers import sd15_text_encoder_meta, sd15_unet_meta, tiny_text_encoder, tiny_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet(), tiny_text_encoder()


@pytest.fixture(scope="module")
def sd15():
    return sd15_unet_meta(), sd15_text_encoder_meta()


def names(root, part, preset):
    return [t.name for t in find_targets(root, part, preset)]


def expected_te_names(layers):
    out = []
    for i in range(layers):
        p = f"lora_te_text_model_encoder_layers_{i}_"
        out += [p + "self_attn_k_proj", p + "self_attn_v_proj", p + "self_attn_q_proj", p + "self_attn_out_proj",
                p + "mlp_fc1", p + "mlp_fc2"]
    return out


def transformer_prefixes():
    """The 16 Transformer2DModels of SD1 (same paths in the tiny UNet)."""
    out = [f"lora_unet_down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
    out += ["lora_unet_mid_block_attentions_0"]
    out += [f"lora_unet_up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)]
    return out


TRANSFORMER_LAYERS = ["proj_in", "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k",
                      "transformer_blocks_0_attn1_to_v", "transformer_blocks_0_attn1_to_out_0",
                      "transformer_blocks_0_attn2_to_q", "transformer_blocks_0_attn2_to_k",
                      "transformer_blocks_0_attn2_to_v", "transformer_blocks_0_attn2_to_out_0",
                      "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2", "proj_out"]


def test_lierla_names_tiny(tiny):
    unet, te = tiny
    assert names(te, "text_encoder", "lierla") == expected_te_names(2)
    got = names(unet, "unet", "lierla")
    assert sorted(got) == sorted(f"{p}_{n}" for p in transformer_prefixes() for n in TRANSFORMER_LAYERS)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in got
    # 1x1 convs get network_dim like linears; 3x3 convs are skipped
    kinds = {t.name: (type(t.module).__name__, t.kxk) for t in find_targets(unet, "unet", "lierla")}
    assert kinds["lora_unet_down_blocks_0_attentions_0_proj_in"] == ("Conv2d", False)
    assert not any(k for _, k in kinds.values())


def test_c3lier_adds_resnets_and_samplers_tiny(tiny):
    unet, _ = tiny
    extra = set(names(unet, "unet", "c3lier")) - set(names(unet, "unet", "lierla"))
    for n in ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_resnets_0_conv2",
              "lora_unet_down_blocks_0_resnets_0_time_emb_proj", "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
              "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
              "lora_unet_mid_block_resnets_1_conv2"]:
        assert n in extra
    assert not any("conv_in" in n or "time_embedding" in n for n in extra)


def test_full_sd15_lierla_counts(sd15):
    unet, te = sd15
    assert len(names(te, "text_encoder", "lierla")) == 72
    assert names(te, "text_encoder", "lierla") == expected_te_names(12)
    unet_names = names(unet, "unet", "lierla")
    assert len(unet_names) == 192 == len(set(unet_names))


def test_full_sd15_preset_counts(sd15):
    unet, te = sd15
    # C3Lier: 192 + 22 resnets x (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 down- + 3 upsamplers
    assert len(names(unet, "unet", "c3lier")) == 278
    full = names(unet, "unet", "full")
    assert len(full) == 282 == len(set(full))        # + conv_in, conv_out, time_embedding.linear_1/2, once each
    assert full.count("lora_unet_time_embedding_linear_1") == 1
    assert len(names(unet, "unet", "full-lin")) == 192 + 22 + 14 + 2
    assert len(names(unet, "unet", "attn-mlp")) == 192
    assert len(names(unet, "unet", "attn-only")) == 16 * 8
    assert len(names(te, "text_encoder", "attn-only")) == 12 * 4
    assert len(names(unet, "unet", "unet-convblock-only")) == 278 - 192 + 2
    assert names(te, "text_encoder", "unet-only") == []
    ia3 = find_targets(unet, "unet", "ia3")
    assert len(ia3) == 16 * 5
    assert {t.name.split("transformer_blocks_0_")[1] for t in ia3} == {"attn1_to_k", "attn1_to_v", "attn2_to_k",
                                                                       "attn2_to_v", "ff_net_2"}
    assert all(t.on_input == t.name.endswith("ff_net_2") for t in ia3)
    te_ia3 = find_targets(te, "text_encoder", "ia3")
    assert len(te_ia3) == 36 and all(t.on_input == t.name.endswith("mlp_fc2") for t in te_ia3)


def test_every_preset_finds_only_adaptable_layers(sd15):
    unet, te = sd15
    for preset in PRESETS:
        for part, root in (("unet", unet), ("text_encoder", te)):
            for t in find_targets(root, part, preset):
                assert isinstance(t.module, (torch.nn.Linear, torch.nn.Conv2d))
                assert t.kxk == (isinstance(t.module, torch.nn.Conv2d) and t.module.kernel_size != (1, 1))
                if t.kxk:
                    assert PRESETS[preset]["conv"]


def test_te_names_start_with_text_model_whatever_the_nesting(tiny):
    _, te = tiny
    inner = te.text_model if hasattr(te, "text_model") else te        # transformers < 5.6 nests, later flat
    flat = torch.nn.Module()
    flat.encoder = inner.encoder
    assert names(flat, "text_encoder", "lierla") == expected_te_names(2)
    holder = torch.nn.Module()
    holder.text_model = inner
    assert names(holder, "text_encoder", "lierla") == expected_te_names(2)


SCRIPT = """
import sys, json
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
from tiny_diffusers import tiny_text_encoder
from lib_lora_train.networks import find_targets
print(json.dumps([t.name for t in find_targets(tiny_text_encoder(), 'text_encoder', 'full')]))
"""


def test_te_names_identical_in_the_webui_environment(tiny):
    """transformers 4.30 (WebUI) nests CLIPTextModel under text_model, 5.6+ does not: the names must not differ.

    Run from the main environment only (one subprocess is enough to compare the two).
    """
    python = ROOT / ".venv-webui" / "bin" / "python"
    if Path(sys.prefix).name == ".venv-webui" or not python.exists():
        pytest.skip("compared from the main environment")
    out = subprocess.run([str(python), "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    _, te = tiny
    assert names(te, "text_encoder", "full") == theirs == expected_te_names(2)
