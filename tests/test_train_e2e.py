"""End to end on a tiny SD1-shaped checkpoint: files, metadata, record, steps, resume, interrupt, exit codes."""
import json
import os
import threading

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lib_lora_train.cli import main as cli_main
from lib_lora_train.config import config_from_dict
from lib_lora_train.errors import ConfigError, DataError, Interrupted
from lib_lora_train.events import STEP
from lib_lora_train.models import write_tiny_checkpoint
from lib_lora_train.record import read_events, read_run_record
from lib_lora_train.training.data_setup import plan_for_config
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def make_folder(root, name, n, size=(64, 64), caption=True, seed=0):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        w, h = size if not isinstance(size, list) else size[i % len(size)]
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        if caption:
            (folder / f"{i:03d}.txt").write_text(f"zkz, tag{i % 3}, thing", encoding="utf-8")
    return folder


def base_cfg(ckpt, tmp_path, **kw):
    values = dict(pretrained_model_name_or_path=ckpt, train_data_dir=str(tmp_path / "data"),
                  output_dir=str(tmp_path / "out"), output_name="demo", resolution="64", network_dim=4,
                  network_alpha=2, learning_rate=1e-3, max_train_epochs=2, train_batch_size=2, seed=1,
                  cache_latents=True, device="cpu")
    values.update(kw)
    return config_from_dict(values)


def test_train_writes_sd_scripts_files_metadata_and_record(ckpt, tmp_path):
    make_folder(tmp_path / "data", "3_zkz", 4)
    cfg = base_cfg(ckpt, tmp_path, save_every_n_epochs=1, clip_skip=2, save_precision="fp16")
    result = train(cfg)
    assert result.status == "done"
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert files == ["demo-000001.safetensors", "demo.safetensors"]
    tensors = load_file(out / "demo.safetensors")
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape[0] == 4
    assert tensors[f"{q}.alpha"].dim() == 0 and float(tensors[f"{q}.alpha"]) == 2.0
    assert tensors[f"{q}.alpha"].dtype == torch.float16
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    with safe_open(out / "demo.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False" and meta["ss_clip_skip"] == "2" and meta["ss_epoch"] == "2"
    assert meta["ss_num_train_images"] == "12" and meta["ss_output_name"] == "demo"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_zkz": {"n_repeats": 3, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"])["3_zkz"]["zkz"] == 4
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == "tiny.safetensors" and len(meta["ss_new_sd_model_hash"]) == 64
    # sshs_model_hash is the WebUI's addnet hash: sha256 of everything after the header
    raw = (out / "demo.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    import hashlib
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    rec = read_run_record(str(out / "demo.run.json"))
    assert rec["status"] == "done" and rec["steps"]["total_steps"] == 12
    assert "12" in rec["steps"]["formula"]
    assert [o["kind"] for o in rec["outputs"]] == ["epoch", "final"]
    assert rec["config"]["network_dim"] == 4 and rec["dataset"]["num_train_images"] == 12
    events = read_events(str(out / "demo.events.jsonl"))
    assert sum(e["kind"] == STEP for e in events) == 12
    assert all("loss" in e for e in events if e["kind"] == STEP)


def test_existing_outputs_are_never_overwritten_silently(ckpt, tmp_path):
    make_folder(tmp_path / "data", "1_zkz", 2)
    train(base_cfg(ckpt, tmp_path, max_train_epochs=1))
    before = (tmp_path / "out" / "demo.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds files of a run named 'demo'"):
        train(base_cfg(ckpt, tmp_path, max_train_epochs=1))
    assert (tmp_path / "out" / "demo.safetensors").read_bytes() == before


@pytest.mark.parametrize("layout, extra", [
    ({"data": [("2_a", 3, (64, 64))]}, {"train_batch_size": 1}),
    ({"data": [("3_a", 5, (64, 64)), ("1_b", 2, (64, 64))]}, {"train_batch_size": 2}),
    ({"data": [("2_a", 4, [(64, 64), (128, 64), (64, 128)])]},
     {"enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 64,
      "resolution": "64", "train_batch_size": 2}),
    ({"data": [("2_a", 3, (64, 64))], "reg": [("1_c", 5, (64, 64))]},
     {"train_batch_size": 2, "gradient_accumulation_steps": 2}),
    ({"data": [("1_a", 5, (64, 64))]}, {"gradient_accumulation_steps": 3, "max_train_epochs": None,
                                         "max_train_steps": 5}),
])
def test_steps_function_equals_optimizer_steps_taken(ckpt, tmp_path, layout, extra):
    for i, (name, n, size) in enumerate(layout["data"]):
        make_folder(tmp_path / "data", name, n, size=size, seed=i)
    reg = None
    for i, (name, n, size) in enumerate(layout.get("reg", [])):
        reg = str(tmp_path / "reg")
        make_folder(tmp_path / "reg", name, n, size=size, seed=10 + i)
    cfg = base_cfg(ckpt, tmp_path, reg_data_dir=reg, network_train_unet_only=True, **extra)
    plan = plan_for_config(cfg)
    steps = []
    train(cfg, sink=lambda e: steps.append(e) if e.kind == STEP else None)
    assert len(steps) == plan.total_steps
    assert steps[-1].data["step"] == plan.total_steps


def _final_tensors(out_dir, name="demo"):
    return load_file(os.path.join(out_dir, f"{name}.safetensors"))


def test_resume_is_bit_identical(ckpt, tmp_path):
    make_folder(tmp_path / "data", "2_zkz", 3)
    common = dict(max_train_epochs=4, network_dropout=0.1, shuffle_caption=True, caption_tag_dropout_rate=0.2,
                  flip_aug=True, noise_offset=0.05, save_precision="float")
    train(base_cfg(ckpt, tmp_path, output_dir=str(tmp_path / "once"), **common))
    # 2 epochs with a saved state, then resume for the remaining 2
    first = base_cfg(ckpt, tmp_path, output_dir=str(tmp_path / "split"), save_every_n_epochs=2, save_state=True,
                     **common)
    stop = threading.Event()
    # stop right after epoch 2 was saved
    def sink(e):
        if e.kind == "state_saved":
            stop.set()
    with pytest.raises(Interrupted):
        train(first, sink=sink, stop=stop)
    state = tmp_path / "split" / "demo-000002-state"
    assert state.is_dir()
    resumed = base_cfg(ckpt, tmp_path, output_dir=str(tmp_path / "split"), resume=str(state), **common)
    train(resumed)
    a, b = _final_tensors(tmp_path / "once"), _final_tensors(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_mid_epoch_leaves_resumable_state_and_last_epoch_file(ckpt, tmp_path):
    make_folder(tmp_path / "data", "4_zkz", 2)
    cfg = base_cfg(ckpt, tmp_path, max_train_epochs=3, train_batch_size=1)
    stop = threading.Event()
    def sink(e):
        if e.kind == STEP and e.data["step"] == 11:   # 8 steps per epoch: mid epoch 2
            stop.set()
    with pytest.raises(Interrupted, match="resume with"):
        train(cfg, sink=sink, stop=stop)
    out = tmp_path / "out"
    assert (out / "demo-state" / "train_state.json").exists()
    assert (out / "demo-000001.safetensors").exists()   # the last completed epoch
    rec = read_run_record(str(out / "demo.run.json"))
    assert rec["status"] == "interrupted" and rec["resume_state"].endswith("demo-state")
    steps = []
    train(base_cfg(ckpt, tmp_path, max_train_epochs=3, train_batch_size=1, resume=str(out / "demo-state")),
          sink=lambda e: steps.append(e.data["step"]) if e.kind == STEP else None)
    assert steps[0] == 12 and steps[-1] == 24
    assert read_run_record(str(out / "demo.run.json"))["status"] == "done"


def test_bad_inputs_give_named_errors_and_exit_codes(ckpt, tmp_path, capsys):
    # images lying directly in train_data_dir: the most common folder mistake
    make_folder(tmp_path, "data", 2)
    with pytest.raises(DataError, match="lie directly in .* move them into a new folder"):
        train(base_cfg(ckpt, tmp_path))
    assert cli_main(["train", "--pretrained_model_name_or_path", ckpt, "--train_data_dir",
                     str(tmp_path / "data"), "--output_dir", str(tmp_path / "o")]) == 2
    assert cli_main(["train", "--network_dimm", "4"]) == 2
    assert "did you mean 'network_dim'" in capsys.readouterr().err
    assert cli_main(["train", "--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"),
                     "--train_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o2")]) == 2


def test_cli_trains_and_steps_command(ckpt, tmp_path, capsys):
    make_folder(tmp_path / "data", "2_zkz", 2)
    (tmp_path / "run.toml").write_text(
        f'pretrained_model_name_or_path = "{ckpt}"\ntrain_data_dir = "data"\noutput_dir = "out"\n'
        f'output_name = "cli"\nresolution = 64\nnetwork_dim = 2\nmax_train_epochs = 1\ndevice = "cpu"\n'
        f'network_train_unet_only = true\n')
    assert cli_main(["steps", "--config", str(tmp_path / "run.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_steps"] == 4
    assert cli_main(["train", "--config", str(tmp_path / "run.toml"), "--no-bar"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "done" and printed["outputs"][0].endswith("cli.safetensors")
    assert not any(k.startswith("lora_te") for k in load_file(printed["outputs"][0]))


def test_previews_during_training_are_saved_and_recorded(ckpt, tmp_path):
    make_folder(tmp_path / "data", "1_zkz", 2)
    (tmp_path / "prompts.txt").write_text("# previews\nzkz, thing --w 64 --h 64 --s 2 --d 5\n"
                                          "tag1 --n tag2 --w 64 --h 64 --s 2 --d 6 --ss euler_a\n")
    cfg = base_cfg(ckpt, tmp_path, sample_prompts=str(tmp_path / "prompts.txt"), sample_every_n_epochs=1,
                   sample_at_first=True)
    result = train(cfg)
    rec = read_run_record(result.record_path)
    assert [s["epoch"] for s in rec["samples"]] == [0, 1, 2]
    paths = [p for s in rec["samples"] for p in s["paths"]]
    assert len(paths) == 6 and all(os.path.exists(p) for p in paths)
    assert os.path.basename(paths[2]).startswith("demo_e000001_00_") and paths[2].endswith("_5.png")
    with Image.open(paths[3]) as im:
        assert im.size == (64, 64) and "tag1" in im.info["parameters"]
    with pytest.raises(ConfigError, match="unknown sampler"):
        train(base_cfg(ckpt, tmp_path, output_dir=str(tmp_path / "o2"), sample_prompts=str(tmp_path / "prompts.txt"),
                       sample_every_n_epochs=1, sample_sampler="nope"))
