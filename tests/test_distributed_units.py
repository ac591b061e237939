"""training/distributed.py without launching processes: sharding, the global batch's random rows, N->M resume
arithmetic, metadata, the single-process no-ops, refusals, and the CUDA/NCCL path with stand-ins (no GPU here)."""
import datetime
import shutil
import time

import pytest
import torch

from lib_lora_train.config import config_from_dict
from lib_lora_train.dataset import plan_steps
from lib_lora_train.errors import ConfigError
from lib_lora_train.training import distributed
from lib_lora_train.training.data_setup import build_training_data
from lib_lora_train.training.distributed import DistContext, resumed_step, setup


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from lib_lora_train.demo.toy import make_toy_dataset
    root = tmp_path_factory.mktemp("toy")
    raw = make_toy_dataset(root / "raw", n_images=12)
    dst = root / "data" / "1_zkz"
    dst.mkdir(parents=True)
    for f in (raw / "10_zkz").iterdir():
        shutil.copy(f, dst / f.name)
    return root / "data"


def _data(toy, batch):
    cfg = config_from_dict({"train_data_dir": str(toy), "resolution": "64", "train_batch_size": batch, "seed": 3})
    return build_training_data(cfg)[0]


def _keys(batch):
    return [(s.item.path, s.flipped) for s in batch.samples]


def test_grouped_order_splits_the_double_batch_of_one_process(toy):
    """2 processes x batch 3 take, at every step, the two halves of one process's batch of 6 (same order)."""
    one = _data(toy, 6)
    two = _data(toy, 3)
    for epoch in range(3):
        big = one.batches_for_epoch(epoch)
        grouped = two.batches_for_epoch(epoch, group=2)
        assert len(grouped) == 2 * len(big) == 4
        for j, b in enumerate(big):
            r0 = DistContext(rank=0, world_size=2).shard(grouped)[j]
            r1 = DistContext(rank=1, world_size=2).shard(grouped)[j]
            assert _keys(r0) + _keys(r1) == _keys(b)
    # group 1 is the single-process order exactly
    assert [_keys(b) for b in two.batches_for_epoch(1, group=1)] == [_keys(b) for b in two.batches_for_epoch(1)]


def test_shard_wraps_like_accelerate_and_covers_every_batch():
    batches = list(range(5))
    r0, r1 = DistContext(rank=0, world_size=2), DistContext(rank=1, world_size=2)
    assert r0.shard(batches) == [0, 2, 4] and r1.shard(batches) == [1, 3, 0]
    assert r0.step_batches(batches, 2) == [4, 0]
    assert DistContext().shard(batches) is batches and DistContext().step_batches(batches, 0) is None
    # each process: ceil(batches / processes), as the steps formula says
    assert plan_steps(5, num_processes=2, max_train_epochs=1).steps_per_epoch == len(r0.shard(batches)) == 3
    assert "/ 2 processes" in plan_steps(5, num_processes=2, max_train_epochs=1).formula


class _B:
    def __init__(self, n, bucket=(64, 64)):
        self.samples, self.bucket = [None] * n, bucket


def test_rows_place_this_process_in_the_global_batch():
    lat = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2) + 1
    ctx = DistContext(rank=1, world_size=3)
    big, mine = ctx.rows(lat, [_B(2), _B(2), _B(1)])
    assert big.shape[0] == 5 and mine == slice(2, 4)
    assert torch.equal(big[mine], lat) and not big[:2].any() and not big[4:].any()
    # mixed buckets: this process draws alone, from its own seed
    big, mine = ctx.rows(lat, [_B(2), _B(2, (64, 128)), _B(1)])
    assert big is lat and mine == slice(None)
    assert ctx.step_seed(7, [_B(2), _B(2, (64, 128))], lambda *p: hash(p)) == hash((7, 1))
    assert ctx.step_seed(7, [_B(2), _B(2)], lambda *p: hash(p)) == 7
    one = DistContext()
    big, mine = one.rows(lat, None)
    assert big is lat and torch.equal(big[mine], lat)
    assert one.rank_seed(11, lambda *p: 0) == 11


def test_noise_drawn_for_the_global_batch_equals_one_process():
    from lib_lora_train.training.noise import sample_noise, sample_timesteps
    lat = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    ref_noise = sample_noise(lat, g, noise_offset=0.05, adaptive_noise_scale=0.01)
    ref_t = sample_timesteps(4, g)
    for rank in range(2):
        ctx = DistContext(rank=rank, world_size=2)
        part = lat[2 * rank:2 * rank + 2]
        big, mine = ctx.rows(part, [_B(2), _B(2)])
        g = torch.Generator().manual_seed(5)
        noise = sample_noise(big, g, noise_offset=0.05, adaptive_noise_scale=0.01)[mine]
        t = sample_timesteps(big.shape[0], g)[mine]
        assert torch.equal(noise, ref_noise[2 * rank:2 * rank + 2]) and torch.equal(t, ref_t[2 * rank:2 * rank + 2])


def test_resumed_step_recomputes_for_another_number_of_processes():
    # an epoch-end state maps exactly: 2 processes, 2 steps/epoch, epoch 1 done -> 1 process, 4 steps/epoch
    assert resumed_step(2, 1, saved_world=2, world=1, ga=1, saved_steps_per_epoch=2, steps_per_epoch=4) == 4
    # mid-epoch: 1 step into epoch 1 on 2 processes = 2 batches = 2 steps on 1 process
    assert resumed_step(3, 1, saved_world=2, world=1, ga=1, saved_steps_per_epoch=2, steps_per_epoch=4) == 6
    # 1 -> 2 processes, rounding down to a whole step
    assert resumed_step(7, 1, saved_world=1, world=2, ga=1, saved_steps_per_epoch=4, steps_per_epoch=2) == 3
    assert resumed_step(5, 1, saved_world=2, world=2, ga=1, saved_steps_per_epoch=2, steps_per_epoch=2) == 5


def test_metadata_as_sd_scripts_writes_it_under_accelerate():
    meta = {"ss_num_batches_per_epoch": "5", "ss_total_batch_size": "6"}
    distributed.adjust_metadata(meta, DistContext(rank=0, world_size=2), 5)
    assert meta == {"ss_num_batches_per_epoch": "3", "ss_total_batch_size": "12"}
    same = {"ss_num_batches_per_epoch": "5", "ss_total_batch_size": "6"}
    distributed.adjust_metadata(same, DistContext(), 5)
    assert same == {"ss_num_batches_per_epoch": "5", "ss_total_batch_size": "6"}


def test_single_process_is_untouched(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    called = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: called.append(1))
    ctx = setup(config_from_dict({}))
    assert not ctx.enabled and ctx.is_main and ctx.device is None and not called
    assert ctx.agree(True) and not ctx.agree(False) and ctx.mean_value(torch.tensor(0.25)) == 0.25
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    ctx.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_refusals():
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    with pytest.raises(ConfigError, match="single process.*torchrun --nproc_per_node 2"):
        distributed.refuse_distributed("the Train LoRA tab and the HTTP API", env)
    distributed.refuse_distributed("x", {"WORLD_SIZE": "1"})
    with pytest.raises(ConfigError, match="WebUI"):
        setup(config_from_dict({"device": "cpu"}), host_model=True, environ=env)
    with pytest.raises(ConfigError, match="fused_backward_pass"):
        setup(config_from_dict({"device": "cpu", "optimizer_type": "Adafactor", "fused_backward_pass": True}),
              environ=env)
    with pytest.raises(ConfigError, match="RANK"):
        setup(config_from_dict({"device": "cpu"}), environ={"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="ddp_timeout"):
        setup(config_from_dict({"ddp_timeout": 0}), environ={})


def test_cuda_path_with_stand_ins(monkeypatch):
    """No GPU here: CUDA is stood in for. LOCAL_RANK picks the device, NCCL is the backend, the timeout and
    device_id reach init_process_group, and too few GPUs is refused."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    def init_process_group(backend=None, *, rank=-1, world_size=-1, timeout=None, device_id=None):
        seen["init"] = dict(backend=backend, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    ctx = setup(config_from_dict({"device": "auto", "ddp_timeout": 2}), environ=env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (3, 4, 1, "nccl")
    assert ctx.device == torch.device("cuda", 1) == seen["set_device"] == seen["init"]["device_id"]
    assert seen["init"]["backend"] == "nccl" and seen["init"]["rank"] == 3 and seen["init"]["world_size"] == 4
    assert seen["init"]["timeout"] == datetime.timedelta(minutes=2)
    assert ctx._comm_device() == torch.device("cuda", 1)      # NCCL reduces tensors on the GPU
    # the launcher's SIGTERM (another process failed) ends this one as a lost peer, with words; close() undoes it
    import os
    import signal
    before = ctx._old_term
    try:
        with pytest.raises(distributed.PeerLost, match="process 3 of 4: stopped by the launcher"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        ctx.close()
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(ConfigError, match="2 CUDA device"):
        setup(config_from_dict({"device": "cuda"}), environ={**env, "LOCAL_RANK": "2"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        setup(config_from_dict({"device": "cuda"}), environ=env)
    with pytest.raises(ConfigError, match="not on 'mps'"):
        setup(config_from_dict({"device": "mps"}), environ=env)


def test_gradient_mean_with_a_stand_in_peer(monkeypatch):
    """average_gradients: one flat all-reduce, divided by the world size, missing gradients count as zero."""
    # the other process's flat gradients a (3), b, c, d (1 each), then its has-a-gradient flags a, b, c, d
    peer = torch.tensor([4.0, 4.0, 4.0, 1.0, 10.0, 0.0] + [1.0, 1.0, 1.0, 0.0])
    calls = []

    def all_reduce(t, op=None):
        calls.append(t.numel())
        t += peer
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    ctx = DistContext(rank=0, world_size=2, device=torch.device("cpu"), backend="gloo")
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (3, 1, 1))
    a.grad, c.grad = torch.tensor([2.0, 0.0, -2.0]), torch.tensor([6.0])
    d = torch.nn.Parameter(torch.zeros(1))                 # no gradient anywhere: stays without one
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    ctx.average_gradients([a, b, c, d, frozen])
    assert calls == [10]
    assert torch.equal(a.grad, torch.tensor([3.0, 2.0, 1.0])) and torch.equal(b.grad, torch.tensor([0.5]))
    assert torch.equal(c.grad, torch.tensor([8.0])) and d.grad is None


def test_a_failed_collective_says_what_happened(monkeypatch):
    def all_reduce(t, op=None):
        raise RuntimeError("Connection closed by peer [127.0.0.1]:7330")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    ctx = DistContext(rank=1, world_size=2, device=torch.device("cpu"), backend="gloo", timeout_s=30)
    with pytest.raises(distributed.PeerLost, match=r"process 1 of 2: agreeing on a stop failed.*30 s \(ddp_timeout\)"):
        ctx.agree(False)


def test_steps_command_says_processes(toy, tmp_path, capsys, monkeypatch):
    from lib_lora_train.cli import main
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'train_data_dir = "{toy}"\nresolution = "64"\ntrain_batch_size = 2\nmax_train_epochs = 3\n')
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["steps", "--config", str(cfg), "--num_processes", "2"]) == 0
    assert "ceil(6 batches / 2 processes / grad-accum 1) = 3 steps/epoch × 3 epochs = 9 steps" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "3")          # under a launcher the command counts its processes
    assert main(["steps", "--config", str(cfg), "--json"]) == 0
    assert '"steps_per_epoch": 2' in capsys.readouterr().out
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["steps", "--config", str(cfg)]) == 0
    assert "ceil(6 batches / grad-accum 1) = 6 steps/epoch" in capsys.readouterr().out
