"""kill -9 of a real training process (python -m lib_lora_train train) during latent caching, during a LoRA save
and during a state save, one after the other on the same run. The fault hook (LORA_TRAIN_FAULT, read only in
fsutil.fault_point) makes the process SIGKILL itself at exactly that point, so nothing depends on timing. After
each kill: nothing partial under a real name, earlier files byte-identical, the record says what happened and
offers the state to resume; the resumed run ends with the same LoRA as a run that was never interrupted."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from faults_support import assert_nothing_partial, config_values, make_cfg, make_data
from lib_lora_train.fsutil import FAULT_ENV
from lib_lora_train.models import write_tiny_checkpoint
from lib_lora_train.record import read_events, read_run_record
from lib_lora_train.training.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_cli(tmp, values: dict, fault: str | None):
    path = tmp / "run.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items() if v is not None),
                    encoding="utf-8")
    # the same thread count as this process (conftest.py): the end compares bit for bit with a run made here
    threads = str(torch.get_num_threads())
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "lib_lora_train", "train", "--config", str(path), "--no-bar"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp))


def hidden_temps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp") or ".tmp-" in n)


def test_kill_9_during_caching_lora_save_and_state_save_then_resume(ckpt, tmp_path):
    make_data(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "out" / ".latents"
    values = config_values(ckpt, tmp_path, cache_latents_to_disk=True)
    rec_path = str(out / "demo.run.json")

    # 1. killed while writing the 3rd of 4 latent cache files
    p = run_cli(tmp_path, values, "kill@write:*_sd1.safetensors#3")
    assert p.returncode == -9, p.stderr[-2000:]
    assert len([n for n in os.listdir(cache) if n.endswith(".safetensors")]) == 2 and hidden_temps(cache)
    assert assert_nothing_partial(out) == []
    rec = read_run_record(rec_path)
    assert rec["status"] == "failed" and rec["crashed"] and "killed or crashed" in rec["error"]
    assert "No state was saved" in rec["error"]

    # 2. started again: the two complete cache files are reused; killed while writing epoch 2's LoRA
    p = run_cli(tmp_path, dict(values, overwrite=True), "kill@write:demo-000002.safetensors")
    assert p.returncode == -9, p.stderr[-2000:]
    assert not hidden_temps(cache), "the killed writer's temp file is removed at the next start"
    logs = [e.get("message", "") for e in read_events(str(out / "demo.events.jsonl"))]
    assert any("'disk_hits': 2" in m and "'encoded': 2" in m for m in logs), logs
    assert assert_nothing_partial(out) == ["demo-000001.safetensors"]
    epoch1 = (out / "demo-000001.safetensors").read_bytes()
    rec = read_run_record(rec_path)
    assert rec["status"] == "interrupted" and rec["resume_state"] == str(out / "demo-000001-state")
    assert "Resume with resume" in rec["error"]

    # 3. resumed from that state; killed in the middle of the state save of epoch 2
    p = run_cli(tmp_path, dict(values, resume=rec["resume_state"]), "kill@state:demo-000002-state")
    assert p.returncode == -9, p.stderr[-2000:]
    assert assert_nothing_partial(out) == ["demo-000001.safetensors", "demo-000002.safetensors"]
    assert (out / "demo-000001.safetensors").read_bytes() == epoch1
    assert not (out / "demo-000002-state").exists()
    assert [n for n in hidden_temps(out) if n.startswith("demo-000002-state.tmp-")]   # the half-written state
    rec = read_run_record(rec_path)
    assert rec["status"] == "interrupted" and rec["resume_state"] == str(out / "demo-000001-state")

    # 4. resumed again, no fault: done, every file complete, no leftovers
    p = run_cli(tmp_path, dict(values, resume=rec["resume_state"]), None)
    assert p.returncode == 0, p.stderr[-2000:]
    assert assert_nothing_partial(out) == ["demo-000001.safetensors", "demo-000002.safetensors", "demo.safetensors"]
    assert (out / "demo-000001.safetensors").read_bytes() == epoch1
    assert not hidden_temps(out) and not hidden_temps(cache)
    rec = read_run_record(rec_path)
    assert rec["status"] == "done" and not rec.get("crashed") and rec["step"] == 6

    # the same LoRA as a run that was never interrupted (resume is bit-identical on CPU)
    ref = tmp_path / "ref"
    make_data(ref)
    train(make_cfg(ckpt, ref, cache_latents_to_disk=True))
    got, want = load_file(out / "demo.safetensors"), load_file(ref / "out" / "demo.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
