"""The tool subcommands take sd-scripts' flag names and print JSON results."""
import argparse
import json

import pytest

from lib_lora_train.errors import ConfigError
from lib_lora_train.models import save_checkpoint
from lib_lora_train.networks import read_network_file, save_network_file
from lib_lora_train.tools.cli import register
from test_tools_support import base_model, random_network, tiny_sd


@pytest.fixture(scope="module")
def parser():
    p = argparse.ArgumentParser(prog="lib_lora_train")
    register(p.add_subparsers(dest="command", required=True))
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save_checkpoint(d / "base.safetensors", tiny_sd())
    for name, seed in (("a", 51), ("b", 52)):
        net = random_network(base_model(), "networks.lora", 4, 2, ["conv_dim=2"], seed=seed)
        save_network_file(d / f"{name}.safetensors", net.save_tensors(), {"modelspec.title": name.upper()})
    return d


def run(parser, capsys, *argv):
    args = parser.parse_args([str(a) for a in argv])
    assert args.func(args, []) == 0
    return json.loads(capsys.readouterr().out)


def test_merge_into_a_checkpoint_and_extract_it_back(parser, files, capsys):
    out = run(parser, capsys, "merge", "--sd_model", files / "base.safetensors", "--models", files / "a.safetensors",
              files / "b.safetensors", "--ratios", "1", "0.5", "--lbws", "ALL", "1," * 16 + "1",
              "--save_to", files / "merged.safetensors", "--save_precision", "fp16", "--json", "--quiet")
    assert out["path"].endswith("merged.safetensors") and len(out["sha256"]) == 64
    assert out["merged"] == {"a.safetensors": 289, "b.safetensors": 289}
    out = run(parser, capsys, "extract", "--model_org", files / "base.safetensors", "--model_tuned",
              files / "merged.safetensors", "--dim", "8", "--conv_dim", "4", "--clamp_quantile", "0.99",
              "--min_diff", "0.01", "--save_to", files / "extracted.safetensors", "--json", "--quiet")
    assert out["summary"]["modules"] == 289 and out["summary"]["text_encoder"] == "extracted"
    assert len(out["modules"]) == 289 and "fro_retained" in out["modules"][0]


def test_merge_lora_resize_and_inspect(parser, files, capsys):
    out = run(parser, capsys, "merge-lora", "--models", files / "a.safetensors", files / "b.safetensors",
              "--ratios", "0.5", "0.5", "--new_rank", "8", "--new_conv_rank", "4", "--save_to",
              files / "ml.safetensors", "--json", "--quiet")
    assert out["summary"]["rank_max"] == 8 and out["sshs_model_hash"]
    run(parser, capsys, "merge", "--models", files / "a.safetensors", files / "b.safetensors", "--concat",
        "--save_to", files / "concat.safetensors", "--json", "--quiet")          # merge without --sd_model
    assert read_network_file(files / "concat.safetensors")[0][
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 8
    out = run(parser, capsys, "resize", "--model", files / "ml.safetensors", "--new_rank", "4",
              "--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "--save_to", files / "rs.safetensors",
              "--save_precision", "fp16", "--json", "--quiet")
    assert 1 <= out["summary"]["new_rank_min"] <= out["summary"]["new_rank_max"] <= 4
    out = run(parser, capsys, "inspect", files / "rs.safetensors", "--json", "--summary")
    assert out["hash"]["status"] == "ok" and out["network_dim"] == "Dynamic" and "modules" not in out
    out = run(parser, capsys, "inspect", files / "rs.safetensors", "--set_title", "Mine", "--set_trigger_words",
              "zkz", "--save_to", files / "titled.safetensors", "--json")
    assert out["metadata"]["modelspec.title"] == "Mine"
    assert read_network_file(files / "titled.safetensors")[1]["modelspec.trigger_phrase"] == "zkz"
    args = parser.parse_args(["inspect", str(files / "titled.safetensors"), "--modules"])
    assert args.func(args, []) == 0
    text = capsys.readouterr().out
    assert "trigger:     zkz" in text and "hash:        ok" in text and "lora_unet_mid_block" in text


def test_bad_requests_raise_config_errors(parser, files):
    for argv, pattern in (
            (["merge-lora", "--models", files / "a.safetensors", "--save_to", files / "x.safetensors"], "new_rank"),
            (["merge", "--sd_model", files / "base.safetensors", "--models", files / "a.safetensors", "--ratios",
              "1", "2", "--save_to", files / "y.safetensors"], "ratios"),
            (["resize", "--model", files / "a.safetensors", "--dynamic_method", "sv_ratio", "--save_to",
              files / "z.safetensors"], "dynamic_param"),
            (["extract", "--model_org", files / "base.safetensors", "--model_tuned", files / "base.safetensors",
              "--sdxl", "--save_to", files / "w.safetensors"], r"--sdxl was given but .* is an SD 1\.x checkpoint"),
            (["inspect", files / "a.safetensors", "--set_title", "x"], "in_place")):
        args = parser.parse_args([str(a) for a in argv])
        with pytest.raises(ConfigError, match=pattern):
            args.func(args, [])
