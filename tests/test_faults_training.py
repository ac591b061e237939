"""Faults inside a training run (in-process; the process faults are in test_faults_process.py): a full disk while
saving, a diverging loss, an exhausted GPU, a damaged or foreign state, an image changed under a run. Each ends
with a clear message, nothing partial in the output folder, earlier epochs' files intact, and a run that resumes."""
import os

import pytest
import torch

from faults_support import assert_nothing_partial, make_cfg, make_data
from lib_lora_train.errors import ConfigError, DataError, TrainingFailed
from lib_lora_train.events import START
from lib_lora_train.fsutil import FAULT_ENV
from lib_lora_train.models import write_tiny_checkpoint
from lib_lora_train.record import read_run_record
from lib_lora_train.training import loop
from lib_lora_train.training.loop import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


@pytest.fixture
def data(tmp_path):
    make_data(tmp_path)
    return tmp_path


def record(out):
    return read_run_record(os.path.join(out, "demo.run.json"))


def test_disk_full_during_an_epoch_save_keeps_earlier_files_and_resumes(ckpt, data, monkeypatch):
    out = str(data / "out")
    monkeypatch.setenv(FAULT_ENV, "enospc@write:demo-000002.safetensors")
    with pytest.raises(TrainingFailed) as err:
        train(make_cfg(ckpt, data))
    msg = str(err.value)
    assert "disk is full" in msg and "demo-000002.safetensors" in msg and "demo-000001-state" in msg, msg
    assert assert_nothing_partial(out) == ["demo-000001.safetensors"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]          # the writer removed its temp file
    rec = record(out)
    assert rec["status"] == "failed" and "disk is full" in rec["error"]
    before = (data / "out" / "demo-000001.safetensors").read_bytes()
    monkeypatch.delenv(FAULT_ENV)
    result = train(make_cfg(ckpt, data, resume=os.path.join(out, "demo-000001-state")))
    assert result.status == "done" and result.steps == 6
    assert assert_nothing_partial(out) == ["demo-000001.safetensors", "demo-000002.safetensors", "demo.safetensors"]
    assert (data / "out" / "demo-000001.safetensors").read_bytes() == before


def test_disk_full_during_a_state_save_leaves_no_half_state(ckpt, data, monkeypatch):
    out = str(data / "out")
    monkeypatch.setenv(FAULT_ENV, "enospc@state:demo-000002-state")
    with pytest.raises(TrainingFailed, match="disk is full"):
        train(make_cfg(ckpt, data))
    # the LoRA of epoch 2 was complete before its state: kept; no state folder of epoch 2, not even a temp one
    assert assert_nothing_partial(out) == ["demo-000001.safetensors", "demo-000002.safetensors"]
    assert sorted(n for n in os.listdir(out) if "state" in n) == ["demo-000001-state"]


def test_a_diverging_loss_stops_at_once_names_the_learning_rate_and_keeps_the_last_good_epoch(ckpt, data,
                                                                                              monkeypatch):
    out = str(data / "out")
    real = loop.compute_loss
    calls = []

    def exploding(*a, **kw):        # steps 1-2 (epoch 1) are fine, then the loss blows up
        calls.append(1)
        loss = real(*a, **kw)
        return loss * float("nan") if len(calls) >= 3 else loss
    monkeypatch.setattr(loop, "compute_loss", exploding)
    with pytest.raises(TrainingFailed) as err:
        train(make_cfg(ckpt, data, save_every_n_epochs=None, save_state=False, learning_rate=5e-3))
    msg = str(err.value)
    assert len(calls) == 3, "stopped at the first non-finite loss"
    assert "NaN at step 3 (epoch 2)" in msg and "learning_rate = 0.005" in msg and "AdamW" in msg, msg
    assert "demo-000001.safetensors" in msg
    assert assert_nothing_partial(out) == ["demo-000001.safetensors"]          # finite weights of epoch 1
    rec = record(out)
    assert rec["status"] == "failed" and "lower it" in rec["error"]


def test_an_absurd_learning_rate_stops_within_a_few_steps(ckpt, data):
    out = str(data / "out")
    steps = []
    with pytest.raises(TrainingFailed, match="learning_rate = 1e\\+30") as err:
        train(make_cfg(ckpt, data, learning_rate=1e30, max_grad_norm=0, max_train_epochs=20),
              sink=lambda e: steps.append(e.data["step"]) if e.kind == "step" else None)
    assert len(steps) <= 3, steps
    assert "max_grad_norm = 1.0" in str(err.value)
    assert assert_nothing_partial(out) == []                                    # nothing non-finite written


def test_out_of_gpu_memory_names_the_settings_that_reduce_memory(ckpt, data, monkeypatch):
    out = str(data / "out")
    monkeypatch.setenv(FAULT_ENV, "oom@step:3")
    with pytest.raises(TrainingFailed) as err:
        train(make_cfg(ckpt, data))
    msg = str(err.value)
    for setting in ("train_batch_size (now 2)", "resolution (now 64)", "gradient_checkpointing = true",
                    "cache_latents = true", "fp8_base = true"):
        assert setting in msg, (setting, msg)
    assert "resume = " in msg and "demo-000001-state" in msg
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert assert_nothing_partial(out) == ["demo-000001.safetensors"]
    assert record(out)["error"].startswith("out of GPU memory")


def test_truncated_state_is_refused_with_the_reason(ckpt, data):
    out = data / "out"
    train(make_cfg(ckpt, data, max_train_epochs=1, save_state_on_train_end=True))
    state = out / "demo-state"
    opt = state / "optimizer.torch"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with pytest.raises(ConfigError, match="corrupt: optimizer.torch does not match its recorded checksum"):
        train(make_cfg(ckpt, data, max_train_epochs=2, resume=str(state)))


def test_state_of_another_model_or_run_is_refused(ckpt, data, tmp_path_factory):
    out = data / "out"
    train(make_cfg(ckpt, data, max_train_epochs=1, save_state_on_train_end=True))
    state = str(out / "demo-state")
    other = tmp_path_factory.mktemp("other") / "other.safetensors"
    write_tiny_checkpoint(str(other), seed=1)
    with pytest.raises(ConfigError, match="was trained on another model"):
        train(make_cfg(str(other), data, max_train_epochs=2, resume=state))
    with pytest.raises(ConfigError, match="belongs to the run 'demo', not to 'second'"):
        train(make_cfg(ckpt, data, max_train_epochs=2, resume=state, output_name="second"))
    with pytest.raises(ConfigError, match="another network .*dim 2 -> 4"):
        train(make_cfg(ckpt, data, max_train_epochs=2, resume=state, network_dim=4))


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_an_image_deleted_or_replaced_after_the_scan_is_named(ckpt, data, change):
    """Without cached latents every step reads its images: the changed file is named, epoch 1's file kept."""
    out = str(data / "out")
    victim = data / "data" / "1_zkz" / "002.png"

    def sink(event):
        if event.kind == START:
            if change == "deleted":
                victim.unlink()
            else:
                from PIL import Image
                Image.new("RGB", (48, 80), (1, 2, 3)).save(victim)
    with pytest.raises(DataError) as err:
        train(make_cfg(ckpt, data, cache_latents=False), sink=sink)
    assert "002.png" in str(err.value)
    assert record(out)["status"] == "failed" and "002.png" in record(out)["error"]
    assert_nothing_partial(out)


def test_cached_latents_keep_a_run_going_when_an_image_changes(ckpt, data):
    """With cache_latents the images were encoded before the first step: a later change cannot affect the run."""
    victim = data / "data" / "1_zkz" / "002.png"
    result = train(make_cfg(ckpt, data, cache_latents=True, max_train_epochs=1),
                   sink=lambda e: victim.unlink() if e.kind == START else None)
    assert result.status == "done"


def test_a_truncated_or_foreign_latent_cache_file_is_never_used(ckpt, data):
    """A damaged cache file is encoded again; one from another model has another name and is never read."""
    from lib_lora_train.record import read_events

    def cache_log(out):
        return [e["message"] for e in read_events(os.path.join(out, "demo.events.jsonl"))
                if "latent cache:" in e.get("message", "")][-1]
    out = str(data / "out")
    one_step = dict(max_train_epochs=1, train_batch_size=4, save_state=False, cache_latents_to_disk=True)
    train(make_cfg(ckpt, data, **one_step))
    cache = data / "out" / ".latents"
    files = sorted(cache.iterdir())
    assert len(files) == 4
    files[0].write_bytes(files[0].read_bytes()[:100])                       # truncated
    train(make_cfg(ckpt, data, overwrite=True, **one_step))
    assert "'disk_hits': 3" in cache_log(out) and "'encoded': 1" in cache_log(out)
    other = data.parent / (data.name + "-other.safetensors")
    write_tiny_checkpoint(str(other), seed=1)
    train(make_cfg(str(other), data, overwrite=True, **one_step))
    assert "'disk_hits': 0" in cache_log(out) and "'encoded': 4" in cache_log(out)
