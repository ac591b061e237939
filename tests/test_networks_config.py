"""network_module / network_dim / network_alpha / network_args parsing (sd-scripts defaults, clear errors)."""
import pytest

from lib_lora_train.errors import ConfigError
from lib_lora_train.networks import network_config_from_args


def test_sd_scripts_defaults_for_networks_lora():
    cfg = network_config_from_args("networks.lora", None, None, None)
    assert (cfg.algo, cfg.dim, cfg.alpha, cfg.conv_dim, cfg.preset) == ("lora", 4, 1.0, None, "lierla")
    assert cfg.variant == "LoRA-LierLa"
    assert cfg.dropout is None and cfg.rank_dropout is None and cfg.module_dropout is None


def test_conv_dim_turns_lora_into_c3lier_with_conv_alpha_default_1():
    cfg = network_config_from_args("networks.lora", 16, 8, ["conv_dim=4"])
    assert (cfg.conv_dim, cfg.conv_alpha, cfg.preset, cfg.variant) == (4, 1.0, "c3lier", "LoRA-C3Lier")
    cfg = network_config_from_args("networks.lora", 16, 8, {"conv_dim": 4, "conv_alpha": 2})
    assert (cfg.conv_dim, cfg.conv_alpha) == (4, 2.0)
    assert cfg.network_args == {"conv_dim": "4", "conv_alpha": "2"}


def test_dropouts_are_parsed():
    cfg = network_config_from_args("networks.lora", 4, 1, ["rank_dropout=0.1", "module_dropout=0.2"],
                                   network_dropout=0.3)
    assert (cfg.dropout, cfg.rank_dropout, cfg.module_dropout) == (0.3, 0.1, 0.2)
    with pytest.raises(ConfigError, match="rank_dropout"):
        network_config_from_args("networks.lora", 4, 1, ["rank_dropout=1.5"])


def test_lycoris_defaults_conv_from_network_dim_and_alpha():
    cfg = network_config_from_args("lycoris.kohya", 8, 2, ["algo=locon"])
    assert (cfg.algo, cfg.preset, cfg.conv_dim, cfg.conv_alpha) == ("lora", "full", 8, 2.0)
    cfg = network_config_from_args("lycoris.kohya", 8, 2, ["algo=loha", "conv_dim=4", "conv_alpha=1",
                                                          "preset=attn-mlp", "use_tucker=true"])
    assert (cfg.algo, cfg.preset, cfg.conv_dim, cfg.conv_alpha, cfg.use_tucker) == ("loha", "attn-mlp", 4, 1.0, True)
    cfg = network_config_from_args("lycoris.kohya", 8, 2, ["algo=lokr", "factor=8", "decompose_both=True"])
    assert (cfg.factor, cfg.decompose_both) == (8, True)
    assert network_config_from_args("lycoris.kohya", 4, 1, ["algo=ia3"]).preset == "ia3"


def test_lycoris_dropout_comes_from_network_args_or_network_dropout():
    assert network_config_from_args("lycoris.kohya", 4, 1, [], network_dropout=0.1).dropout == 0.1
    assert network_config_from_args("lycoris.kohya", 4, 1, ["dropout=0.2"], network_dropout=0.1).dropout == 0.2


def test_dylora_unit_and_conv():
    cfg = network_config_from_args("networks.dylora", 8, 4, ["unit=2", "conv_dim=8"])
    assert (cfg.algo, cfg.unit, cfg.conv_dim, cfg.conv_alpha, cfg.preset) == ("dylora", 2, 8, 4.0, "c3lier")
    cfg = network_config_from_args("lycoris.kohya", 8, 4, ["algo=dylora"])
    assert (cfg.algo, cfg.unit, cfg.network_module) == ("dylora", 4, "lycoris.kohya")
    with pytest.raises(ConfigError, match="multiple of unit"):
        network_config_from_args("networks.dylora", 6, 4, ["unit=4"])
    with pytest.raises(ConfigError, match="conv_dim"):
        network_config_from_args("networks.dylora", 8, 4, ["conv_dim=4"])
    with pytest.raises(ConfigError, match="conv_alpha"):
        network_config_from_args("networks.dylora", 8, 4, ["conv_dim=8", "conv_alpha=1"])


@pytest.mark.parametrize("args, pattern", [
    (["conv_dimm=4"], "conv_dimm.*did you mean 'conv_dim'"),
    (["rank_dropuot=0.1"], "did you mean 'rank_dropout'"),
    (["algo=loha"], "lycoris.kohya"),
    (["dropout=0.1"], "network_dropout"),
    (["block_dims=2,2,2"], "block_dims: 3 values given, expected 25"),
    (["down_lr_weight=1,1,1"], "down_lr_weight: 3 values given, expected 12"),
    (["loraplus_lr_ratio=16"], "loraplus_lr_ratio.*not implemented"),
    (["conv_dim=four"], "conv_dim.*integer"),
    (["conv_alpha=2"], "conv_alpha needs conv_dim"),
    (["novalue"], "key=value"),
])
def test_bad_network_args_for_networks_lora(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        network_config_from_args("networks.lora", 4, 1, args)


@pytest.mark.parametrize("args, pattern", [
    (["algo=glora"], "algo='glora' is not supported"),
    (["algo=lora", "preset=ful"], "preset='ful'.*did you mean 'full'"),
    (["dora_wd=True"], "dora_wd=True is not supported"),
    (["train_norm=true"], "train_norm"),
    (["use_tucker=maybe"], "true or false"),
    (["algo=loha", "dropout=0.1"], "neuron dropout"),
    (["unit=4"], "unknown key 'unit'"),
    (["loraplus_unet_lr_ratio=4"], "not implemented"),
])
def test_bad_network_args_for_lycoris(args, pattern):
    with pytest.raises(ConfigError, match=pattern):
        network_config_from_args("lycoris.kohya", 4, 1, args)


def test_default_off_lycoris_options_are_accepted():
    cfg = network_config_from_args("lycoris.kohya", 4, 1, ["train_norm=False", "dora_wd=false"])
    assert cfg.algo == "lora"


def test_unknown_module_and_nothing_to_train():
    with pytest.raises(ConfigError, match="networks.oft"):
        network_config_from_args("networks.oft", 4, 1, None)
    with pytest.raises(ConfigError, match="nothing to train"):
        network_config_from_args("networks.lora", 4, 1, None, train_unet=False, train_text_encoder=False)
