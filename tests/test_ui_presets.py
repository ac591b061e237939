"""The Parameters form as data: presets, field checks, form <-> sd-scripts keys (no gradio needed)."""
import pytest

from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError
from lib_lora_train.networks.config import network_config_from_args
from lib_lora_train.ui.presets import (FIELDS, FORM_KEYS, NETWORK_TYPES, apply_preset, config_to_form,
                                       default_values, extra_from_config, form_preset, form_to_config, parse_extra,
                                       preset_names)


def test_presets_in_plain_numbers():
    character = form_preset("character")
    assert character["network_dim"] == 32 and character["network_alpha"] == 16 and character["unet_lr"] == 2e-3
    assert character["clip_skip"] == 2 and character["repeats"] == 10
    assert form_preset("style")["network_dim"] == 128
    assert preset_names("sd1")[:3] == ["character", "style", "concept"] and "sdxl-8gb" not in preset_names("sd1")
    assert {"sdxl-8gb", "sdxl-12gb"} <= set(preset_names("sdxl"))
    v = apply_preset(default_values(), "style")
    assert v["network_dim"] == 128 and v["seed"] == 42          # fields outside the preset are kept
    with pytest.raises(ConfigError, match="preset"):
        apply_preset(v, "landscape")


def test_family_presets_in_the_form():
    v = default_values(family="sdxl")
    assert v["resolution"] == 1024 and v["network_alpha"] == 16 and v["presets"] == "character"
    assert default_values(family="sd2")["resolution"] == 768
    v = apply_preset(v, "sdxl-8gb", "sdxl")
    assert v["presets"] == "character+sdxl-8gb" and v["optimizer_type"] == "Adafactor" and v["text_encoder_lr"] == 0
    cfg, _ = form_to_config(v)
    assert cfg["preset"] == ["character", "sdxl-8gb"] and cfg["network_train_unet_only"] is True
    full = config_from_dict(dict(cfg, sdxl=True))                 # the preset's other options reach the run
    assert full.fp8_base and full.cache_text_encoder_outputs and full.gradient_checkpointing
    assert full.optimizer_type == "Adafactor" and full.resolution == "1024"
    v = apply_preset(v, "style", "sdxl")                          # a purpose preset replaces the purpose only
    assert v["presets"] == "style+sdxl-8gb"


def test_other_options_field():
    v = default_values()
    v["extra_options"] = "min_snr_gamma = 5\nnoise_offset = 0.05\n"
    cfg, _ = form_to_config(v)
    assert cfg["min_snr_gamma"] == 5 and cfg["noise_offset"] == 0.05
    assert parse_extra(extra_from_config({"min_snr_gamma": 5.0, "network_dim": 8})) == {"min_snr_gamma": 5.0}
    v["extra_options"] = "network_dim = 4"
    with pytest.raises(ConfigError, match="own field"):
        form_to_config(v)
    v["extra_options"] = "min_snr_gamma = five"
    with pytest.raises(ConfigError, match="Other sd-scripts options"):
        form_to_config(v)


def test_every_field_explains_itself():
    for f in FIELDS:
        assert f.label and f.info and len(f.info) < 120, f.key
    assert len(FORM_KEYS) == len(set(FORM_KEYS))


def test_defaults_take_the_hosts_resolution():
    assert default_values({"resolution": "64"})["resolution"] == 64
    assert default_values({})["resolution"] == 512 and default_values({}, family="sdxl")["resolution"] == 1024
    assert default_values({}, "style")["network_dim"] == 128


@pytest.mark.parametrize("kind", list(NETWORK_TYPES))
def test_each_network_type_is_a_valid_network_config(kind):
    v = default_values()
    v.update(network_type=kind, conv_dim=8, conv_alpha=4)
    cfg, repeats = form_to_config(v)
    assert repeats == 10
    net = network_config_from_args(cfg["network_module"], cfg["network_dim"], cfg["network_alpha"],
                                   cfg["network_args"])
    expected = {"LoRA": "lora", "LoCon": "lora", "LoHa": "loha", "LoKr": "lokr", "DyLoRA": "dylora", "IA3": "ia3"}
    assert net.algo == expected[kind]
    if kind in ("LoCon", "LoHa", "LoKr"):
        assert net.conv_dim == 8 and net.conv_alpha == 4
    config_from_dict(dict(cfg, pretrained_model_name_or_path="x.safetensors", train_data_dir="d"))


def test_form_to_config_and_back():
    v = default_values({"resolution": "64"})
    v.update(network_type="LoHa", network_dim=16, network_alpha=8, conv_dim=4, conv_alpha=2, text_encoder_lr=0,
             save_every_n_epochs=0, unet_lr=3e-4, lr_scheduler="linear", seed=7)
    cfg, _ = form_to_config(v)
    assert cfg["network_train_unet_only"] is True and "text_encoder_lr" not in cfg
    assert "save_every_n_epochs" not in cfg and cfg["resolution"] == "64"
    assert cfg["min_bucket_reso"] == 64                      # buckets work at a small training size
    back = config_to_form(cfg, default_values())
    for key in ("network_type", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "text_encoder_lr",
                "save_every_n_epochs", "unet_lr", "lr_scheduler", "seed", "resolution"):
        assert back[key] == v[key], key


def test_bad_values_name_the_field():
    v = default_values()
    v["network_dim"] = "lots"
    with pytest.raises(ConfigError, match="Network dim"):
        form_to_config(v)
    v = default_values()
    v["max_train_epochs"] = 1.5
    with pytest.raises(ConfigError, match="Epochs.*whole number"):
        form_to_config(v)
    v = default_values()
    v["optimizer_type"] = "Magic"
    with pytest.raises(ConfigError, match="Optimizer"):
        form_to_config(v)


def _ctx(tmp_path):
    from lib_lora_train.demo.toy import make_toy_dataset
    from lib_lora_train.hosts.base import BasicHost, HostPaths
    from lib_lora_train.jobs import JobManager
    from lib_lora_train.models import write_tiny_checkpoint
    from lib_lora_train.prep.preprocess import PreprocessOptions
    from lib_lora_train.prep.project import create_project, import_images
    from lib_lora_train.ui.context import UIContext
    ckpt = write_tiny_checkpoint(str(tmp_path / "models" / "tiny.safetensors"))
    host = BasicHost(HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"), [str(tmp_path / "models")]),
                     default_checkpoint=str(ckpt), config={"resolution": "64", "device": "cpu"})
    proj = create_project(str(tmp_path / "projects" / "star"), "star", trigger="zkz", purpose="character")
    import_images(proj, str(make_toy_dataset(tmp_path / "toy", n_images=2)), recursive=True, repeats=1,
                  options=PreprocessOptions(workers=1))
    return UIContext(host, JobManager(host))


def test_import_fills_the_form_and_export_writes_sd_scripts_toml(tmp_path, monkeypatch):
    import json
    import tomllib

    from lib_lora_train import presets
    monkeypatch.setattr(presets, "_registered", [])   # the user folder registered below ends with this test

    from lib_lora_train.ui import form_store
    from lib_lora_train.ui.settings_io import export_sd_scripts, import_upload, user_presets_dir
    ctx = _ctx(tmp_path)
    src = tmp_path / "preset.json"
    src.write_text(json.dumps({"LoRA_type": "LyCORIS/LoHa", "network_dim": "16", "network_alpha": "8",
                               "conv_dim": 4, "conv_alpha": 2, "max_resolution": "512,512", "optimizer": "AdamW",
                               "learning_rate": "0.0002", "unet_lr": "0.0002", "text_encoder_lr": 0, "epoch": 3,
                               "min_snr_gamma": 5, "train_data_dir": "/elsewhere", "sample_prompts": "zkz, star"}))
    values = [default_values({"resolution": "64"})[k] for k in FORM_KEYS]
    out = import_upload(ctx, "star", str(src), *values)
    assert out["network_type"] == "LoHa" and out["network_dim"] == 16 and out["conv_dim"] == 4
    assert out["text_encoder_lr"] == 0 and out["max_train_epochs"] == 3 and out["resolution"] == 512
    assert out["extra_options"].strip() == "min_snr_gamma = 5.0" and out["sample_prompts"] == "zkz, star"
    assert "kohya_ss GUI JSON" in out["import_report"] and "train_data_dir" in out["import_report"]
    assert form_store.load_form(str(tmp_path / "projects" / "star"))["network_dim"] == 16
    form = dict(zip(FORM_KEYS, values))
    form.update({k: v for k, v in out.items() if k in FORM_KEYS})
    form["resolution"] = 64
    exp = export_sd_scripts(ctx, "star", *[form[k] for k in FORM_KEYS])
    data = tomllib.loads(open(exp["export_file"], encoding="utf-8").read())
    assert data["min_snr_gamma"] == 5.0 and data["network_args"][0] == "algo=loha"
    assert data["train_data_dir"].endswith("img") and data["network_train_unet_only"] is True
    assert "train_network.py" in exp["export_text"] and "--config_file" in exp["export_text"]
    bad = tmp_path / "cut.json"
    bad.write_text('{"LoRA_type": "Stan')
    assert set(import_upload(ctx, "star", str(bad), *values)) == {"import_report"}   # the form is untouched
    folder = user_presets_dir(ctx)
    import os
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "faces.toml"), "w") as fh:
        fh.write('description = "my faces"\nnetwork_dim = 12\n')
    assert "faces" in preset_names("sd1") and form_preset("faces")["network_dim"] == 12


def test_the_form_follows_the_loaded_models_family(tmp_path):
    pytest.importorskip("gradio")
    from lib_lora_train.prep.project import open_project
    from lib_lora_train.ui import params_section
    ctx = _ctx(tmp_path)
    ctx.host.model_family = lambda: "sdxl"          # what a host with an SDXL model loaded answers
    ctx.host.base_config = lambda: {"device": "cpu"}
    view = params_section.form_view(ctx, open_project(str(tmp_path / "projects" / "star")))
    choices = view["preset"]["choices"]
    names = [c[0] if isinstance(c, (list, tuple)) else c for c in choices]
    assert "sdxl-8gb" in names and view["resolution"] == 1024 and view["network_alpha"] == 16
