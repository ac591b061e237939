"""Export of a run (record or run TOML) to sd-scripts: TOML + command, and the round trip import -> export."""
import json
import os
import shlex
import subprocess
import tomllib

import pytest

from lib_lora_train.cli import main
from lib_lora_train.interop import import_settings
from lib_lora_train.interop.export import export_run
from lib_lora_train.interop.sdnames import SD_SCRIPTS_OPTIONS

RUN = '''pretrained_model_name_or_path = "base.safetensors"
train_data_dir = "train"
network_module = "lycoris.kohya"
network_dim = 8
network_args = ["algo=loha", "conv_dim=4"]
max_train_epochs = 3
sample_prompts = "prompts.txt"
device = "cpu"
overwrite = true
'''


def test_export_toml_and_command(tmp_path):
    (tmp_path / "run.toml").write_text(RUN)
    exp = export_run(str(tmp_path / "run.toml"))
    assert exp.script == "train_network.py" and exp.family == "sd1"
    data = tomllib.loads(exp.toml())
    assert set(data) <= SD_SCRIPTS_OPTIONS
    # options whose sd-scripts default differs are written out
    assert data["caption_extension"] == ".txt" and data["learning_rate"] == 1e-4 and data["seed"] == 42
    assert data["network_alpha"] == 1.0 and data["network_args"] == ["algo=loha", "conv_dim=4"]
    assert data["sample_sampler"] == "dpmsolver++" and "Karras" in exp.toml()
    assert data["pretrained_model_name_or_path"] == str(tmp_path / "base.safetensors")
    assert "device" in exp.left_out and "overwrite" in exp.left_out and "not in sd-scripts: device" in exp.toml()
    cmd = shlex.split(exp.command())
    assert cmd[:2] == ["accelerate", "launch"] and "train_network.py" in cmd
    i = cmd.index("--network_args")
    assert cmd[i + 1:i + 3] == ["algo=loha", "conv_dim=4"]
    assert "--config_file" in exp.command("x.toml")


def test_export_from_run_record_uses_its_family(tmp_path):
    rec = {"config": {"pretrained_model_name_or_path": "/m/xl.safetensors", "train_data_dir": "/d",
                      "network_dim": 16, "network_alpha": 8, "cache_text_encoder_outputs": True,
                      "network_train_unet_only": True,
                      "max_train_epochs": 2, "output_name": "zkz"},
           "model": {"family": "sdxl"}}
    path = tmp_path / "zkz.run.json"
    path.write_text(json.dumps(rec))
    exp = export_run(str(path))
    assert exp.script == "sdxl_train_network.py"
    assert tomllib.loads(exp.toml())["cache_text_encoder_outputs"] is True


def test_export_cli_refuses_to_replace(tmp_path, capsys):
    (tmp_path / "run.toml").write_text(RUN)
    out = tmp_path / "sd.toml"
    assert main(["export", str(tmp_path / "run.toml"), "--sd-scripts-toml", str(out), "--command"]) == 0
    assert "--config_file" in capsys.readouterr().out and out.exists()
    assert main(["export", str(tmp_path / "run.toml"), "--sd-scripts-toml", str(out)]) == 2


def test_round_trip_keeps_the_options(tmp_path):
    kohya = {"LoRA_type": "LyCORIS/LoCon", "network_dim": "32", "network_alpha": "16", "conv_dim": 8,
             "conv_alpha": 4, "max_resolution": "768,768", "optimizer": "Prodigy", "learning_rate": "1",
             "unet_lr": 1, "text_encoder_lr": 1, "epoch": 5, "min_snr_gamma": 5, "seed": "7",
             "mixed_precision": "bf16", "caption_extension": ".txt", "LyCORIS_preset": "full"}
    src = tmp_path / "k.json"
    src.write_text(json.dumps(kohya))
    res = import_settings(str(src))
    assert res.report.can_start, res.report.text()
    run = tmp_path / "run.toml"
    run.write_text(res.toml())
    data = tomllib.loads(export_run(str(run)).toml())
    for key in ("network_dim", "network_alpha", "optimizer_type", "max_train_epochs", "min_snr_gamma", "seed",
                "mixed_precision", "resolution"):
        assert key in data, key
    assert data["network_args"][:2] == ["algo=locon", "preset=full"] and data["optimizer_type"] == "Prodigy"
    assert data["resolution"] == "768,768" and data["max_train_epochs"] == 5


# sd-scripts checked out beside the project, in its own venv (never vendored): both paths from the environment
SD_SCRIPTS = os.environ.get("LORA_TRAIN_SD_SCRIPTS", "")
SD_PYTHON = os.environ.get("LORA_TRAIN_SD_SCRIPTS_PYTHON", "")


@pytest.mark.skipif(not (os.path.isfile(os.path.join(SD_SCRIPTS, "train_network.py")) and os.path.exists(SD_PYTHON)),
                    reason="set LORA_TRAIN_SD_SCRIPTS (an sd-scripts checkout) and LORA_TRAIN_SD_SCRIPTS_PYTHON (its venv python)")
def test_sd_scripts_own_parser_accepts_the_export(tmp_path):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    from interop_check import CHECKER
    (tmp_path / "run.toml").write_text(RUN)
    exp = export_run(str(tmp_path / "run.toml"))
    sd_toml = tmp_path / "sd.toml"
    sd_toml.write_text(exp.toml())
    flags = shlex.split(exp.command().split(exp.script, 1)[1])
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"script": exp.script, "toml": str(sd_toml), "flags": flags}]))
    out = subprocess.run([SD_PYTHON, "-c", CHECKER, SD_SCRIPTS, str(jobs)],
                         cwd=SD_SCRIPTS, capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])[0]
    assert result["problems"] == [] and result["keys"] >= 10


def test_export_never_points_sd_scripts_at_this_runs_files(tmp_path):
    """sd-scripts replaces NAME.safetensors without asking: the export sends it to a subfolder of output_dir."""
    (tmp_path / "run.toml").write_text(RUN + 'output_dir = "out"\noutput_name = "zkz"\n')
    exp = export_run(str(tmp_path / "run.toml"))
    data = tomllib.loads(exp.toml())
    assert data["output_name"] == "zkz"
    assert os.path.normpath(data["output_dir"]) == os.path.join(str(tmp_path), "out", "sd-scripts")
    assert "never writes over" in exp.toml()
