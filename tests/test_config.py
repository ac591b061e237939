"""The config edge: sd-scripts names, TOML + flags, and a named error for every bad input."""
import pytest

from lib_lora_train.config import (TrainConfig, config_from_dict, load_config, parse_cli_overrides,
                                   parse_resolution)
from lib_lora_train.errors import ConfigError


def test_toml_sections_are_flattened_and_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "run.toml").write_text(
        '[model]\npretrained_model_name_or_path = "base.safetensors"\n'
        '[network]\nnetwork_dim = 32\nnetwork_alpha = 16\nnetwork_args = ["conv_dim=8", "conv_alpha=4"]\n'
        '[data]\ntrain_data_dir = "data"\nresolution = "512,768"\n'
        '[optim]\nlearning_rate = 1e-4\nunet_lr = 2e-4\ntext_encoder_lr = 5e-5\nclip_skip = 2\n')
    cfg = load_config(tmp_path / "run.toml")
    assert cfg.network_dim == 32 and cfg.network_alpha == 16.0
    assert cfg.network_args == ["conv_dim=8", "conv_alpha=4"]
    assert cfg.resolution_wh == (512, 768)
    assert cfg.unet_lr == 2e-4 and cfg.text_encoder_lr == 5e-5 and cfg.clip_skip == 2
    assert cfg.pretrained_model_name_or_path == str(tmp_path / "base.safetensors")
    assert cfg.train_data_dir == str(tmp_path / "data")


def test_cli_flags_override_the_file_and_take_lists(tmp_path):
    (tmp_path / "run.toml").write_text('network_dim = 4\noutput_name = "a"\n')
    flags = parse_cli_overrides(["--network_dim", "16", "--network_args", "conv_dim=4", "conv_alpha=1",
                                 "--shuffle_caption", "--output_name=b"])
    cfg = load_config(tmp_path / "run.toml", flags)
    assert cfg.network_dim == 16 and cfg.output_name == "b" and cfg.shuffle_caption is True
    assert cfg.network_args == ["conv_dim=4", "conv_alpha=1"]


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown option 'network_dimm'.*did you mean 'network_dim'"):
        config_from_dict({"network_dimm": 8})


def test_unimplemented_sd_scripts_option_is_an_error_saying_so():
    with pytest.raises(ConfigError, match="'deepspeed' is an sd-scripts option this engine does not implement"):
        config_from_dict({"deepspeed": True})
    with pytest.raises(ConfigError, match="does not implement.*external VAE"):
        config_from_dict({"vae": "x.safetensors"})


def test_backward_compatible_spelling_is_accepted():
    assert config_from_dict({"caption_extention": ".caption"}).caption_extension == ".caption"


@pytest.mark.parametrize("values, message", [
    ({"network_dim": "abc"}, "network_dim: expected int"),
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"mixed_precision": "fp8"}, "mixed_precision: expected no, fp16 or bf16"),
    ({"optimizer_type": "adamww"}, "did you mean 'AdamW'"),
    ({"lr_scheduler": "cosin"}, "did you mean 'cosine'"),
    ({"network_module": "networks.loha"}, "network_module: expected one of"),
    ({"resolution": "500"}, "multiple of 8"),
    ({"resolution": "a,b,c"}, "resolution: expected N or W,H"),
    ({"clip_skip": 0}, "clip_skip: expected 1..12"),
    ({"max_token_length": 100}, "max_token_length: expected 75, 150 or 225"),
    ({"save_model_as": "ckpt"}, "only 'safetensors'"),
    ({"v2": True, "sdxl": True}, "v2 and sdxl cannot both be set"),
    ({"fp8_base": True}, "fp8_base / fp8_base_unet need mixed_precision"),
    ({"cache_text_encoder_outputs": True}, "needs network_train_unet_only"),
    ({"cache_text_encoder_outputs_to_disk": True, "network_train_unet_only": True, "caption_dropout_rate": 0.1},
     "caption_dropout_rate change it"),
    ({"text_encoder_lr": [1e-4, 1e-4, 1e-4]}, "at most two values"),
    ({"text_encoder_lr": "fast"}, "expected a number or a list"),
    ({"network_train_unet_only": True, "network_train_text_encoder_only": True}, "cannot both be set"),
    ({"cache_latents": True, "random_crop": True}, "random_crop cannot be used with cache_latents"),
    ({"output_name": "a/b"}, "output_name: must be a plain file name"),
    ({"train_batch_size": 0}, "train_batch_size must be at least 1"),
    ({"full_fp16": True}, "full_fp16 needs mixed_precision"),
    ({"shuffle_caption": "maybe"}, "shuffle_caption: expected bool"),
    ({"bucket_reso_steps": 60}, "divisible by 8"),
])
def test_bad_values_have_named_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("network_dim = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_cli_flag_parsing_errors():
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_cli_overrides(["network_dim", "4"])
    with pytest.raises(ConfigError, match="takes one value"):
        parse_cli_overrides(["--network_dim", "4", "8"])


def test_resolution_forms_and_defaults():
    assert parse_resolution("512") == (512, 512)
    assert parse_resolution([512, 640]) == (512, 640)
    assert parse_resolution("768x512") == (768, 512)
    cfg = TrainConfig()
    assert cfg.caption_extension == ".txt" and cfg.network_module == "networks.lora"
    assert cfg.seed_value == 42 and config_from_dict({"seed": 7}).seed_value == 7
    assert config_from_dict({"seed": "None"}).seed is None
