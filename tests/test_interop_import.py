"""Import of lora-scripts train.ps1 / train.sh, kohya_ss GUI JSON and sd-scripts TOML (own small fixtures in
each tool's format), the report of every field, and bad input."""
import json
import os

import pytest

from lib_lora_train.cli import main
from lib_lora_train.config import config_from_dict
from lib_lora_train.interop import import_settings

PS1 = r'''# LoRA train script
$pretrained_model = "./sd-models/base.safetensors" # base model | 底模路径
$model_type = "sd1.5" # sd1.5 sd2.0 sdxl flux
$parameterization = 0
$train_data_dir = "./train/zkz"
$reg_data_dir = ""
$network_module = "lycoris.kohya"
$network_weights = ""
$network_dim = 16
$network_alpha = 8
$resolution = "512,512"
$batch_size = 2
$max_train_epoches = 6
$save_every_n_epochs = 2
$train_unet_only = 1
$train_text_encoder_only = 0
$stop_text_encoder_training = 40
$noise_offset = 0.05
$keep_tokens = 1
$min_snr_gamma = 0
$lr = "1e-4"
$unet_lr = "2e-4"
$text_encoder_lr = "1e-5"
$lr_scheduler = "cosine_with_restarts"
$lr_warmup_steps = 0
$lr_restart_cycles = 2
$optimizer_type = "AdamW"
$output_name = "zkz"
$save_model_as = "safetensors"
$clip_skip = 2
$multi_gpu = 0
$lowram = 0
$algo = "loha"
$conv_dim = 4
$conv_alpha = 2
$dropout = "0"
$unused_thing = 5
# ============= DO NOT MODIFY CONTENTS BELOW | 请勿修改下方内容 =====================
$ext_args = [System.Collections.ArrayList]::new()
$trainer_file = "./scripts/stable/train_network.py"
if ($model_type -eq "sd1.5") { [void]$ext_args.Add("--clip_skip=$clip_skip") }
python -m accelerate.commands.launch $launch_args --num_cpu_threads_per_process=4 $trainer_file `
  --enable_bucket `
  --pretrained_model_name_or_path=$pretrained_model `
  --train_data_dir=$train_data_dir `
  --output_dir="./output" `
  --logging_dir="./logs" `
  --resolution=$resolution `
  --network_module=$network_module `
  --max_train_epochs=$max_train_epoches `
  --learning_rate=$lr `
  --unet_lr=$unet_lr `
  --text_encoder_lr=$text_encoder_lr `
  --lr_scheduler=$lr_scheduler `
  --lr_warmup_steps=$lr_warmup_steps `
  --lr_scheduler_num_cycles=$lr_restart_cycles `
  --network_dim=$network_dim `
  --network_alpha=$network_alpha `
  --output_name=$output_name `
  --train_batch_size=$batch_size `
  --save_every_n_epochs=$save_every_n_epochs `
  --mixed_precision="fp16" `
  --seed="1337" `
  --cache_latents `
  --caption_extension=".txt" `
  --save_model_as=$save_model_as `
  --keep_tokens=$keep_tokens `
  --xformers --shuffle_caption $ext_args
'''

SH = '''#!/bin/bash
pretrained_model="./sd-models/base.safetensors" # base model
model_type="sd1.5"
train_data_dir="./train/zkz"
network_module="networks.lora"
network_dim=32
network_alpha=32
resolution="512,512"
batch_size=1
max_train_epoches=10
clip_skip=2
lr="1e-4"
# ============= DO NOT MODIFY CONTENTS BELOW =====================
extArgs=()
if [ $model_type == "sd1.5" ]; then
  ext_args+=("--clip_skip=$clip_skip")
fi
python -m accelerate.commands.launch --num_cpu_threads_per_process=4 "./scripts/stable/train_network.py" \\
  --pretrained_model_name_or_path=$pretrained_model \\
  --train_data_dir=$train_data_dir \\
  --resolution=$resolution \\
  --network_module=$network_module \\
  --network_dim=$network_dim \\
  --network_alpha=$network_alpha \\
  --max_train_epochs=$max_train_epoches \\
  --train_batch_size=$batch_size \\
  --learning_rate=$lr \\
  --xformers --shuffle_caption ${extArgs[@]}
'''

KOHYA = {
    "LoRA_type": "Kohya LoCon", "conv_dim": 8, "conv_alpha": "4", "network_dim": "16", "network_alpha": "8",
    "block_dims": "2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2", "block_alphas": "", "down_lr_weight": "",
    "mid_lr_weight": "", "up_lr_weight": "", "block_lr_zero_threshold": "", "conv_block_dims": "",
    "conv_block_alphas": "", "rank_dropout": 0, "module_dropout": "0.1",
    "epoch": "4", "max_train_epochs": "", "max_train_steps": "", "lr_warmup": "10", "lr_warmup_steps": "",
    "learning_rate": "0.0001", "unet_lr": "0.0001", "text_encoder_lr": "0", "optimizer": "AdamW",
    "optimizer_args": "\"weight_decay=0.05\"", "lr_scheduler": "cosine", "lr_scheduler_num_cycles": "",
    "max_resolution": "512,512", "train_batch_size": "2", "seed": "", "clip_skip": "2", "sdxl": False,
    "noise_offset_type": "Multires", "noise_offset": "0.1", "multires_noise_iterations": "6",
    "multires_noise_discount": 0.3, "stop_text_encoder_training_pct": 20, "xformers": "xformers",
    "num_cpu_threads_per_process": 2, "additional_parameters": "--max_grad_norm=0.5 --network_args \"rank_dropout=0.05\"",
    "sample_prompts": "zkz, smiling --w 512 --h 512", "caption_extension": ".txt", "cache_latents": True,
    "model_list": "custom", "scale_weight_norms": 0, "save_every_n_epochs": 2,
}

SD_TOML = '''[model_arguments]
pretrained_model_name_or_path = "base.safetensors"
clip_skip = 2

[dataset_arguments]
dataset_config = "data.toml"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4

[training_arguments]
max_train_epochs = 3
unet_lr = 1e-4
xformers = true
'''

DATASET = '''[general]
resolution = 512
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 4
'''


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _entry(rep, field):
    hits = [e for e in rep.entries if e.field == field]
    assert hits, f"{field} not in the report"
    return hits[0]


def test_ps1_variables_derived_flags_and_known_bugs(tmp_path):
    res = import_settings(_write(tmp_path, "train.ps1", PS1))
    rep, cfg = res.report, res.config
    assert rep.format == "lora-scripts train.ps1" and rep.can_start, rep.text()
    assert cfg["network_train_unet_only"] is True
    assert cfg["network_args"] == ["conv_dim=4", "conv_alpha=2", "algo=loha"]    # dropout=0 left out
    assert cfg["unet_lr"] == 2e-4 and cfg["text_encoder_lr"] == 1e-5 and cfg["clip_skip"] == 2
    assert cfg["lr_scheduler_num_cycles"] == 2 and cfg["max_train_epochs"] == 6 and cfg["seed"] == 1337
    assert cfg["pretrained_model_name_or_path"] == os.path.join(str(tmp_path), "sd-models", "base.safetensors")
    stop = _entry(rep, "stop_text_encoder_training")
    assert stop.status == "unsupported" and "unrecognized arguments" in stop.why and not stop.blocking
    assert _entry(rep, "unused_thing").status == "ignored"
    assert _entry(rep, "(fixed in the script) --xformers").status == "ignored"
    # every variable of the script is in the report
    fields = {e.field for e in rep.entries}
    for line in PS1.split("# =====")[0].splitlines():
        if line.startswith("$"):
            assert line[1:].split("=")[0].strip() in fields, line
    config_from_dict(cfg)


def test_ps1_model_types(tmp_path):
    sdxl = import_settings(_write(tmp_path, "a.ps1", PS1.replace('"sd1.5" #', '"sdxl" #')))
    assert sdxl.report.family == "sdxl" and "clip_skip" not in sdxl.config
    assert _entry(sdxl.report, "clip_skip").status == "ignored"
    flux = import_settings(_write(tmp_path, "b.ps1", PS1.replace('"sd1.5" #', '"flux" #')))
    assert not flux.report.can_start and any("flux" in r for r in flux.report.reasons())


def test_sh_ext_args_bug_is_translated(tmp_path):
    res = import_settings(_write(tmp_path, "train.sh", SH))
    e = _entry(res.report, "clip_skip")
    assert e.status == "changed" and "ext_args" in e.why and res.config["clip_skip"] == 2
    assert res.report.can_start


def test_kohya_json_string_numbers_lora_type_blocks_and_extras(tmp_path):
    res = import_settings(_write(tmp_path, "preset.json", json.dumps(KOHYA)))
    rep, cfg = res.report, res.config
    assert rep.format == "kohya_ss GUI JSON" and rep.can_start, rep.text()
    assert cfg["network_module"] == "networks.lora" and cfg["network_dim"] == 16 and cfg["network_alpha"] == 8.0
    assert cfg["network_args"][:2] == ["conv_dim=8", "conv_alpha=4"]
    assert "block_dims=" + KOHYA["block_dims"] in cfg["network_args"] and "module_dropout=0.1" in cfg["network_args"]
    assert "rank_dropout=0.05" in cfg["network_args"]                  # from additional_parameters
    assert cfg["max_grad_norm"] == 0.5
    assert cfg["max_train_epochs"] == 4 and _entry(rep, "epoch").status == "changed"
    assert cfg["lr_warmup_steps"] == pytest.approx(0.1)                # 10 percent -> a fraction
    assert cfg["network_train_unet_only"] is True                      # text_encoder_lr 0
    assert cfg["lr_scheduler_num_cycles"] == 4                         # "" -> the epoch count
    assert cfg["seed"] == 42 and _entry(rep, "seed").status == "changed"
    assert cfg["multires_noise_iterations"] == 6 and "noise_offset" not in cfg   # Multires picks the kind
    assert cfg["optimizer_type"] == "AdamW" and cfg["optimizer_args"] == ["weight_decay=0.05"]
    assert res.extra_files["sample_prompts.txt"].startswith("zkz, smiling")
    assert _entry(rep, "stop_text_encoder_training_pct").status == "ignored"
    # every field of the JSON is in the report
    fields = {e.field.split(" ")[0] for e in rep.entries}
    assert set(KOHYA) <= fields, set(KOHYA) - fields
    config_from_dict(cfg)


@pytest.mark.parametrize("lora_type,module,algo", [("Standard", "networks.lora", None),
                                                   ("LyCORIS/LoCon", "lycoris.kohya", "locon"),
                                                   ("LyCORIS/LoHa", "lycoris.kohya", "loha"),
                                                   ("LyCORIS/LoKr", "lycoris.kohya", "lokr"),
                                                   ("Kohya DyLoRA", "networks.dylora", None)])
def test_kohya_lora_types(tmp_path, lora_type, module, algo):
    data = {"LoRA_type": lora_type, "network_dim": 8, "network_alpha": 8, "conv_dim": 8, "conv_alpha": 1,
            "unit": 4, "max_resolution": "512,512", "optimizer": "AdamW", "learning_rate": 1e-4, "epoch": 2,
            "factor": -1, "LyCORIS_preset": "full", "use_cp": False, "train_on_input": True}
    res = import_settings(_write(tmp_path, "x.json", json.dumps(data)))
    assert res.config["network_module"] == module, res.report.text()
    if algo:
        assert f"algo={algo}" in res.config["network_args"]
    assert res.report.can_start, res.report.text()


def test_kohya_unsupported_types_and_families(tmp_path):
    fa = import_settings(_write(tmp_path, "fa.json", json.dumps({"LoRA_type": "LoRA-FA", "network_dim": 8,
                                                                   "max_resolution": "512,512", "epoch": 1,
                                                                   "learning_rate": 1e-4})))
    assert not fa.report.can_start and "LoRA_type" in fa.report.reasons()[0]
    flux = import_settings(_write(tmp_path, "flux.json", json.dumps({"LoRA_type": "Flux1", "flux1_checkbox": True,
                                                                      "t5xxl": "t5.safetensors", "epoch": 1,
                                                                      "learning_rate": 1e-4})))
    assert not flux.report.can_start and flux.report.family == "FLUX.1"
    assert _entry(flux.report, "t5xxl").status == "unsupported"


def test_sd_scripts_toml_sectioned_with_dataset_config(tmp_path):
    _write(tmp_path, "data.toml", DATASET)
    (tmp_path / "img").mkdir()
    res = import_settings(_write(tmp_path, "cfg.toml", SD_TOML))
    rep, cfg = res.report, res.config
    assert rep.format == "sd-scripts TOML" and rep.can_start, rep.text()
    assert cfg["dataset_config"] == str(tmp_path / "data.toml")
    assert cfg["caption_extension"] == ".caption" and cfg["learning_rate"] == 2e-6   # sd-scripts' defaults
    assert _entry(rep, "[training_arguments] xformers").status == "ignored"
    flat = import_settings(_write(tmp_path, "flat.toml", "network_dim = 4\nmax_train_epochs = 2\n"))
    assert flat.report.can_start and flat.config["network_dim"] == 4


def test_lora_scripts_toml_lr_restart_cycles(tmp_path):
    text = "[optimizer]\nlr_scheduler = \"cosine_with_restarts\"\nlr_restart_cycles = 3\n[training]\nmax_train_epochs = 2\n"
    res = import_settings(_write(tmp_path, "lora.toml", text))
    e = _entry(res.report, "[optimizer] lr_restart_cycles")
    assert e.status == "changed" and res.config["lr_scheduler_num_cycles"] == 3 and "silently" in e.why


# ---------------------------------------------------------------- bad input


def test_truncated_json(tmp_path):
    text = json.dumps(KOHYA)[:200]
    res = import_settings(_write(tmp_path, "cut.json", text))
    assert not res.report.can_start and "ends early" in res.report.reasons()[0]


def test_toml_typo_names_the_closest_key(tmp_path):
    res = import_settings(_write(tmp_path, "typo.toml", "[network]\nnetwork_dmi = 8\nnetwork_alpha = 4\n"))
    assert not res.report.can_start
    assert "did you mean 'network_dim'" in " ".join(res.report.reasons())


def test_ps1_syntax_not_handled_names_the_line(tmp_path):
    bad = PS1.replace('$network_dim = 16', '$network_dim = [math]::Pow(2, 4)')
    res = import_settings(_write(tmp_path, "bad.ps1", bad))
    reason = res.report.reasons()[0]
    assert "line 9:" in reason and "[math]::Pow" in reason


@pytest.mark.parametrize("name,content,words", [
    ("onetrainer.json", json.dumps({"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15",
                                    "concepts": []}), "OneTrainer"),
    ("job.yaml", "job: extension\nconfig:\n  name: my_lora\n", "not valid TOML"),
    ("model.safetensors", "\x00\x01binary", "binary"),
    ("data.toml", DATASET, "dataset_config"),
])
def test_files_of_other_tools(tmp_path, name, content, words):
    res = import_settings(_write(tmp_path, name, content))
    assert not res.report.can_start and words in res.report.text()


def test_cli_exit_codes_and_nothing_written_over(tmp_path, capsys):
    src = _write(tmp_path, "p.json", json.dumps(KOHYA))
    out = tmp_path / "run.toml"
    assert main(["import", src, "--out", str(out)]) == 0
    first = out.read_text()
    assert 'sample_prompts = "run.prompts.txt"' in first and (tmp_path / "run.prompts.txt").exists()
    assert main(["import", src, "--out", str(out)]) == 2                  # refuses to replace
    assert "already exist" in capsys.readouterr().err
    bad = _write(tmp_path, "cut.json", json.dumps(KOHYA)[:100])
    assert main(["import", bad, "--out", str(out), "--force"]) == 2       # bad input writes nothing
    assert out.read_text() == first
    assert main(["import", src, "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    assert main(["import", src, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["can_start"] and rep["counts"]["carried"] > 10
    # the written TOML is a run config of this engine
    from lib_lora_train.config import load_config
    cfg = load_config(str(out))
    assert cfg.network_dim == 16 and cfg.sample_prompts == str(tmp_path / "run.prompts.txt")


def test_kohya_json_of_an_early_release(tmp_path):
    """Early 2023 files: no LoRA_type, text numbers, use_8bit_adam, an empty caption extension, a Hub id."""
    old = {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "max_resolution": "512,512",
           "learning_rate": "0.00003333", "lr_warmup": "0", "train_batch_size": 8, "epoch": "1",
           "save_every_n_epochs": "1", "mixed_precision": "bf16", "seed": "1234", "caption_extension": "",
           "use_8bit_adam": True, "xformers": True, "text_encoder_lr": "0.000016666", "unet_lr": "0.00003333",
           "network_dim": 128, "gradient_accumulation_steps": 1.0, "max_train_epochs": "", "clip_skip": "1"}
    res = import_settings(_write(tmp_path, "old.json", json.dumps(old)))
    cfg, rep = res.config, res.report
    assert rep.can_start, rep.text()
    assert cfg["optimizer_type"] == "AdamW8bit" and cfg["caption_extension"] == ".caption"
    assert cfg["learning_rate"] == pytest.approx(3.333e-5) and cfg["gradient_accumulation_steps"] == 1
    assert cfg["network_module"] == "networks.lora" and cfg["max_train_epochs"] == 1
    assert any("Hugging Face" in n for n in rep.notes)
