"""Real multi-process runs on the CPU (gloo): torchrun and accelerate launch start two processes of
`python -m lib_lora_train train`, on the tiny demo model and 8 toy images, a handful of steps.

- both processes end with bit-identical weights (the record keeps each one's digest);
- the result equals one process with twice the batch: SGD (linear in the gradients) so that the only difference
  is float rounding — the loss mean over 4 samples vs the mean of two means of 2, and batched kernels of another
  size — bounded by a few ulps of the weights per step;
- steps per epoch are half those of one process with the same batch; the formula says "/ 2 processes";
- a killed process: the other stops at once (gloo sees the closed connection; the timeout is the bound) with a
  clear message, rank 0 keeps a state, the last completed save is intact and resumes on 1 process.
Timeouts here only detect hangs and are generous.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_lora_train.record import read_events, read_run_record

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = ROOT / "lib_lora_train" / "demo" / "tiny_base.safetensors"
HANG = 600     # seconds: only a hang takes this long


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LORA_TRAIN_FAULT")}
    # the test process's thread count (conftest.py), since results are compared with runs made in-process
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lib_lora_train.demo.toy import make_toy_dataset
    root = tmp_path_factory.mktemp("dist")
    raw = make_toy_dataset(root / "raw", n_images=8)
    data = root / "data" / "1_zkz"
    data.mkdir(parents=True)
    for f in (raw / "10_zkz").iterdir():
        shutil.copy(f, data / f.name)
    return root


def _config(world: Path, name: str, batch: int, **kw) -> Path:
    values = {"pretrained_model_name_or_path": str(BASE if BASE.exists() else _random_base(world)),
              "train_data_dir": str(world / "data"), "output_dir": str(world / name), "output_name": "zkz",
              "resolution": "64", "network_module": "networks.lora", "network_dim": 8, "network_alpha": 8,
              "learning_rate": 0.1, "text_encoder_lr": 0.02, "optimizer_type": "SGDNesterov",
              "lr_scheduler": "constant", "max_train_epochs": 2, "save_every_n_epochs": 1, "save_state": True,
              "train_batch_size": batch, "cache_latents": True, "seed": 0, "device": "cpu", "overwrite": True,
              "ddp_timeout": 1, **kw}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    path = world / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _random_base(world: Path) -> Path:
    from lib_lora_train.models import write_tiny_checkpoint
    path = world / "tiny_random.safetensors"
    if not path.exists():
        write_tiny_checkpoint(str(path), seed=0)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=HANG)


@pytest.fixture(scope="module")
def single_double_batch(world):
    """One process with twice the per-process batch: the reference."""
    proc = _run([sys.executable, "-m", "lib_lora_train", "train", "--config", str(_config(world, "ref", 4)),
                 "--no-bar"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(world / "ref" / "zkz.safetensors"))


def _check_two_process_run(out: Path, ref: dict) -> float:
    record = read_run_record(str(out / "zkz.run.json"))
    assert record["status"] == "done"
    digests = record["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]                 # bit-identical on both processes
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["global_batch_size"] == 4
    start = next(e for e in read_events(str(out / "zkz.events.jsonl")) if e["kind"] == "start")
    # 8 samples, batch 2: one process takes 4 steps per epoch, each of two processes 2
    assert start["steps_per_epoch"] == 2 and start["total_steps"] == 4
    assert "ceil(4 batches / 2 processes / grad-accum 1) = 2 steps/epoch" in start["formula"]
    with safe_open(str(out / "zkz.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_batches_per_epoch"] == "2" and meta["ss_total_batch_size"] == "4"
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_max_train_steps"] == "4"
    got = load_file(str(out / "zkz.safetensors"))
    assert got.keys() == ref.keys()
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref if not k.endswith(".alpha"))
    # float32 rounding, a few ulps of the largest weight for each of the 4 steps; a mismatch of data, noise or
    # averaging moves weights by about the learning rate times a gradient (> 1e-3 here)
    tol = 4 * 16 * torch.finfo(torch.float32).eps * scale
    assert worst <= tol, (worst, tol)
    changed = max(float((got[k] - load_file(str(out / "zkz-000001.safetensors"))[k]).abs().max()) for k in ref)
    assert changed > 100 * tol          # the comparison is not vacuous: epoch 2 moved the weights much more
    return worst


def test_torchrun_two_processes_equal_one_process_with_double_batch(world, single_double_batch):
    torchrun = BIN / "torchrun"
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = _run(cmd + ["--standalone", "--nproc_per_node", "2", "-m", "lib_lora_train", "train", "--config",
                       str(_config(world, "torchrun", 2)), "--no-bar"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = _check_two_process_run(world / "torchrun", single_double_batch)
    print(f"torchrun x2 vs 1 process with batch 4: largest difference {worst:.3g}")
    assert proc.stdout.count('"status": "done"') == 1          # only rank 0 reports


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_launch_two_cpu_processes(world, single_double_batch):
    # `--multi_gpu` starts N processes also without a GPU (accelerate's MULTI_CPU; `--cpu` alone starts one)
    proc = _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(_free_port()), "-m", "lib_lora_train", "train", "--config",
                 str(_config(world, "accelerate", 2)), "--no-bar"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = _check_two_process_run(world / "accelerate", single_double_batch)
    print(f"accelerate x2 vs 1 process with batch 4: largest difference {worst:.3g}")


_GROUP_FREED = r"""
import gc, json, os, sys, weakref
import torch.distributed as dist
from lib_lora_train import cli
refs = []
real_init = dist.init_process_group
def init(*args, **kwargs):
    real_init(*args, **kwargs)
    refs.append(weakref.ref(dist.group.WORLD))
    import torch.distributed.nn   # as a library imported during the run does (accelerate's FSDP helpers)
dist.init_process_group = init
rc = cli.main(["train", "--config", sys.argv[1], "--no-bar"])
gc.collect()
tasks = "/proc/self/task"
names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
print("RESULT " + json.dumps({"rank": int(os.environ["RANK"]), "rc": rc, "group_alive": refs[0]() is not None,
                              "gloo_threads": [n for n in names if "gloo" in n]}))
"""


def test_the_process_group_is_freed_when_a_run_ends(world):
    """A group that outlives the run keeps gloo's threads running into interpreter shutdown, where one of them
    can abort the process (SIGABRT) after a run that succeeded: seen once in CI under accelerate launch."""
    torchrun = BIN / "torchrun"
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = _run(cmd + ["--standalone", "--nproc_per_node", "2", str(_script(world)),
                       str(_config(world, "freed", 2))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], proc.stdout[-2000:]
    for r in results:
        assert r["rc"] == 0 and not r["group_alive"] and r["gloo_threads"] == [], r


def _script(world: Path) -> Path:
    path = world / "group_freed.py"
    path.write_text(_GROUP_FREED)
    return path


def test_a_killed_process_stops_the_other_and_the_last_save_resumes(world):
    """Two processes started as a launcher starts them (env); process 1 is killed (SIGKILL) in epoch 2."""
    cfg = _config(world, "killed", 2, ddp_timeout=1)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if rank == 1:
            env["LORA_TRAIN_FAULT"] = "kill@step:3"
        procs.append(subprocess.Popen([sys.executable, "-m", "lib_lora_train", "train", "--config", str(cfg),
                                       "--no-bar"], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        out1, err1 = procs[1].communicate(timeout=HANG)
        killed_at = time.monotonic()
        out0, err0 = procs[0].communicate(timeout=HANG)
        waited = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode not in (0, None)
    assert waited < 60 + 30         # within ddp_timeout (1 minute) plus saving a state; gloo usually sees it at once
    assert "process 0 of 2" in err0 and "another process of this run stopped" in err0, err0[-2000:]
    assert err1.strip() == "" or "error" not in out1      # rank 1 printed nothing of its own progress
    out = world / "killed"
    # the last completed save (epoch 1) is intact ...
    assert load_file(str(out / "zkz-000001.safetensors"))
    record = read_run_record(str(out / "zkz.run.json"))
    assert record["status"] in ("failed", "interrupted")
    assert os.path.isdir(out / "zkz-state")          # ... and rank 0 kept a state of its last step
    # ... and resumes, on one process: the step count is recomputed and the record says so
    resume = _config(world, "killed", 2, resume=str(out / "zkz-000001-state"))
    proc = _run([sys.executable, "-m", "lib_lora_train", "train", "--config", str(resume), "--no-bar"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_run_record(str(out / "zkz.run.json"))
    assert record["status"] == "done"
    assert record["resumed_world_size"] == {"saved": 2, "now": 1, "saved_step": 2, "step": 4, "total_steps": 8}
    assert "saved by 2 process(es) at step 2; on 1 process(es) that is step 4 of 8" in proc.stdout + proc.stderr
    assert load_file(str(out / "zkz.safetensors"))


def test_ctrl_c_on_one_process_stops_both_with_a_state(world):
    """SIGINT to process 1 only: the stop is agreed at the next step, both stop, rank 0 saves the state."""
    import signal
    cfg = _config(world, "ctrlc", 2, max_train_epochs=50, save_every_n_epochs=None, save_state=False)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "lib_lora_train", "train", "--config", str(cfg),
                                       "--no-bar"], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    events = world / "ctrlc" / "zkz.events.jsonl"
    try:
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline and procs[0].poll() is None:
            if events.exists() and '"kind": "step"' in events.read_text():
                break
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=HANG) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [3, 3], [o[1][-1500:] for o in outs]     # EXIT_INTERRUPTED on both
    record = read_run_record(str(world / "ctrlc" / "zkz.run.json"))
    assert record["status"] == "interrupted"
    steps = [e for e in read_events(str(events)) if e["kind"] == "step"]
    assert 1 <= steps[-1]["step"] < steps[-1]["total_steps"]
    assert os.path.isdir(world / "ctrlc" / "zkz-state")


_STUCK_PEER = r"""
import sys, time, torch
from lib_lora_train.config import config_from_dict
from lib_lora_train.training.distributed import PeerLost, setup
# Both processes finish their (slow, load-dependent) imports before either starts the rendezvous, so the short
# timeout below can only be reached by the stuck peer, never by one process starting later than the other.
import os
from pathlib import Path
ready = Path(sys.argv[2])
(ready / os.environ["RANK"]).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.05)
ctx = setup(config_from_dict({"device": "cpu", "ddp_timeout": float(sys.argv[1])}))
ctx.barrier()
if ctx.rank == 1:
    time.sleep(3600)            # alive, connected, never answers again
t0 = time.monotonic()
try:
    ctx.agree(False)
except PeerLost as exc:
    print(f"waited {time.monotonic() - t0:.1f}")
    print(exc)
    sys.exit(7)
"""


def test_a_stuck_peer_ends_in_a_timeout_with_a_clear_message(tmp_path):
    """gloo, two real processes: process 1 stops answering; process 0 gives up after ddp_timeout (6 s here)."""
    port = str(_free_port())
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _STUCK_PEER, "0.1", str(ready)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port)) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=HANG)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 7, err[-2000:]
    waited = float(out.split("waited ")[1].split()[0])
    assert 5.0 <= waited < 6.0 + 60, out                # the timeout, not a hang (generous upper bound)
    assert "process 0 of 2: agreeing on a stop failed" in out and "6 s (ddp_timeout)" in out
