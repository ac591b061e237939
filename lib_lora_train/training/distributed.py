"""Data-parallel training under torchrun / accelerate launch, on PyTorch distributed (NCCL on CUDA, gloo on CPU).

The launcher starts one process per device and tells each its place through the environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup` reads it; without a launcher (WORLD_SIZE unset or 1) nothing here
changes anything and the loop runs exactly as a single process.

What the loop gets from here, each a small call at one place:
- `shard`: each process's share of an epoch's batches, as accelerate shards a DataLoader of bucket-batches
  (process r takes batches r, r+N, r+2N, ...; the last round wraps to the start so every process has
  ceil(batches / N) of them). `TrainingData.batches_for_epoch(epoch, group=N)` orders the batches so that the N
  batches of one step are the halves (thirds, ...) of the batch a single process with N times the batch size
  takes at that step, in the same order.
- `rows`: the random numbers of a step (noise, timesteps) are drawn for the whole step's global batch from the
  generator of (seed, epoch, batch), and each process keeps its rows; so N processes with batch B draw exactly
  what one process with batch N x B draws. Where the step's batches have different shapes (different buckets at an
  epoch's end) each process draws its own from (seed, epoch, batch, rank).
- `average_gradients`: an all-reduce (mean) of the trainable parameters' gradients after the last backward of
  each optimizer step. The LoRA network's modules run as hooks inside the UNet / text encoders, outside any
  `forward` of the network object, so DDP wrapped around the network alone never sees their gradients
  (shared/reference/engine-trial.md); the explicit reduction has no such trap and is the same for every network
  type.
- `agree`: one flag all processes act on together (stop requests, a diverged loss), so no process waits in a
  collective that another one left.
- only rank 0 writes (files, state, record, events, samples, validation); other ranks are silent except errors.

A dead or stuck peer: every collective fails after `ddp_timeout` (minutes, sd-scripts' option; default 30 as in
accelerate) with a `PeerLost` error that says which process gave up and why.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass

import torch

from ..errors import ConfigError, LoraTrainError

DEFAULT_TIMEOUT_MIN = 30.0


class PeerLost(LoraTrainError):
    """Another process of a distributed run failed, was killed or did not answer within the timeout."""


def env_world_size(environ=None) -> int:
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def refuse_distributed(where: str, environ=None) -> None:
    """The WebUI tab, the standalone page and the HTTP API train in one process only."""
    n = env_world_size(environ)
    if n > 1:
        raise ConfigError(f"{where} trains in a single process, but this process was started by a distributed "
                          f"launcher (WORLD_SIZE={n}); run several processes from the command line instead: "
                          f"torchrun --nproc_per_node {n} -m lib_lora_train train --config run.toml")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_MIN * 60
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ lifetime
    def watch_launcher(self) -> None:
        """torchrun / accelerate stop the other processes with SIGTERM when one fails: end as a lost peer (rank 0
        then saves a state, every process says why) instead of dying without a word."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            raise PeerLost(f"process {self.rank} of {self.world_size}: stopped by the launcher (SIGTERM) — another "
                           f"process of this run failed or was killed. Resume from the last saved state.")
        self._old_term = signal.signal(signal.SIGTERM, on_term)

    def close(self) -> None:
        old = getattr(self, "_old_term", None)
        if old is not None:
            import signal
            signal.signal(signal.SIGTERM, old)
            self._old_term = None
        if self.owns_group and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
            self.owns_group = False

    def _fail(self, what: str, exc: BaseException) -> PeerLost:
        return PeerLost(f"process {self.rank} of {self.world_size}: {what} failed — another process of this run "
                        f"stopped (failed, was interrupted or killed) or did not answer within "
                        f"{self.timeout_s:g} s (ddp_timeout). Resume from the last saved state. "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")

    # ------------------------------------------------------------ collectives (no-ops in a single process)
    def barrier(self, what: str = "barrier") -> None:
        if not self.enabled:
            return
        try:
            # a barrier as an all-reduce: gloo's and NCCL's both honour the group's timeout
            torch.distributed.all_reduce(torch.zeros(1, device=self._comm_device()))
        except Exception as exc:  # noqa: BLE001 - every backend error means the same here
            raise self._fail(what, exc) from exc

    def agree(self, flag: bool, what: str = "agreeing on a stop") -> bool:
        """True on every process when it is true on any."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        try:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(what, exc) from exc
        return bool(t.item() > 0)

    def mean_value(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes (the step's loss over the global batch)."""
        if not self.enabled:
            return float(value)
        t = value.detach().float().reshape(1).to(self._comm_device()).clone()
        try:
            torch.distributed.all_reduce(t)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("averaging the loss", exc) from exc
        return float(t.item() / self.world_size)

    def average_gradients(self, params) -> None:
        """Mean of every trainable parameter's gradient over all processes, in one flat all-reduce per dtype.
        A parameter without a gradient on this process counts as zero (as DDP does with unused parameters); one
        without a gradient on every process keeps none, so the optimizer skips it as it does in one process."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        by_kind: dict[tuple, list] = {}
        for p in params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), group in by_kind.items():
            has = torch.tensor([0.0 if p.grad is None else 1.0 for p in group], device=device, dtype=dtype)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                             + [has])
            try:
                torch.distributed.all_reduce(flat)
            except Exception as exc:  # noqa: BLE001
                raise self._fail("averaging the gradients", exc) from exc
            anyone = flat[-len(group):] > 0
            flat = flat[:-len(group)] / self.world_size
            offset = 0
            for i, p in enumerate(group):
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone() if anyone[i] else None
                offset += n

    def broadcast_parameters(self, params) -> None:
        """Every process starts from rank 0's weights (they are equal by seeding; this makes it a guarantee)."""
        if not self.enabled:
            return
        try:
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("sharing the initial weights", exc) from exc

    def check_in_sync(self, tensors: dict, record, emit) -> None:
        """Every process's network weights hashed and compared; the record keeps the digests (rank order).
        Different weights (which the averaging should make impossible) are an error, not a silent drift."""
        if not self.enabled:
            return
        import hashlib
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests: list = [None] * self.world_size
        try:
            torch.distributed.all_gather_object(digests, h.hexdigest())
        except Exception as exc:  # noqa: BLE001
            raise self._fail("comparing the weights of the processes", exc) from exc
        record.set(weights_sha256_per_rank=digests)
        if len(set(digests)) != 1:
            raise LoraTrainError(f"the processes ended with different network weights ({digests}); the run's "
                                 f"gradients were not averaged the same way on every process")

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------ caches: rank 0 builds, the others read
    @contextlib.contextmanager
    def main_first(self, what: str):
        """Rank 0 runs the body first (building on-disk caches); the others wait, then run it (reading them)."""
        if not self.enabled:
            yield
            return
        if not self.is_main:
            self.barrier(f"waiting for process 0 to build the {what}")
        yield
        if self.is_main:
            self.barrier(f"waiting for process 0 to build the {what}")

    # ------------------------------------------------------------ data
    def shard(self, batches: list) -> list:
        """This process's batches of an epoch: positions rank, rank+N, ... wrapping round to fill the last step."""
        if not self.enabled:
            return batches
        n, w = len(batches), self.world_size
        return [batches[(i * w + self.rank) % n] for i in range(math.ceil(n / w))]

    def step_batches(self, batches: list, index: int) -> list | None:
        """The batches of all processes at this process's batch `index` (the step's global batch), rank order."""
        if not self.enabled:
            return None
        n, w = len(batches), self.world_size
        return [batches[(index * w + r) % n] for r in range(w)]

    def step_seed(self, seed: int, step_batches: list | None, derive) -> int:
        """The seed of the generator of a step's noise and timesteps: the step's (shared by all processes, which
        draw for the global batch and keep their rows) when its batches share a bucket, else this process's."""
        if step_batches is None or len({b.bucket for b in step_batches}) == 1:
            return seed
        return self.rank_seed(seed, derive)

    def rows(self, lat: torch.Tensor, step_batches: list | None):
        """(tensor to draw a step's random numbers for, this process's rows of it).
        In a single process (or a step of mixed buckets): (lat, all rows). When the step's batches share a bucket: a tensor of the
        global batch's shape holding this process's latents at its own rows (the rest zero: only per-sample
        values of other rows are drawn from it, never read back), and the slice of this process's rows."""
        if not self.enabled or step_batches is None:
            return lat, slice(None)
        sizes = [len(b.samples) for b in step_batches]
        if len({b.bucket for b in step_batches}) != 1:
            return lat, slice(None)
        start = sum(sizes[:self.rank])
        big = lat.new_zeros((sum(sizes), *lat.shape[1:]))
        big[start:start + lat.shape[0]] = lat
        return big, slice(start, start + lat.shape[0])

    def rank_seed(self, seed: int, derive) -> int:
        """(seed, epoch, batch) -> (seed, epoch, batch, rank); rank 0 keeps the single-process seed."""
        return seed if self.rank == 0 else derive(seed, self.rank)

    # ------------------------------------------------------------ words
    def describe(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend,
                "device": str(self.device), "timeout_s": self.timeout_s}


def setup(cfg, *, host_model: bool = False, environ=None) -> DistContext:
    """The process's place in a launched run (or a single process): init the process group, pick the device."""
    environ = os.environ if environ is None else environ
    world = env_world_size(environ)
    minutes = DEFAULT_TIMEOUT_MIN if getattr(cfg, "ddp_timeout", None) is None else float(cfg.ddp_timeout)
    if minutes <= 0:
        raise ConfigError(f"ddp_timeout must be a positive number of minutes, got {cfg.ddp_timeout!r}")
    ctx = DistContext(timeout_s=minutes * 60)
    if world <= 1:
        return ctx
    if host_model:
        refuse_distributed("training on a host's loaded model (the WebUI)", environ)
    if getattr(cfg, "fused_backward_pass", False):
        raise ConfigError("fused_backward_pass updates each parameter inside the backward pass, before the "
                          "gradients of the other processes can be averaged; switch it off for multi-process runs")
    try:
        rank, local_rank = int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"]))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"WORLD_SIZE={world} but RANK / LOCAL_RANK are missing or invalid in the environment; "
                          f"start the run with torchrun or accelerate launch") from exc
    device = _device_for(cfg.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                      timeout_s=minutes * 60)
    if torch.distributed.is_initialized():      # accelerate's or a host's group: use it as it is
        if torch.distributed.get_world_size() != world:
            raise ConfigError("a process group of another size is already initialised")
        ctx.backend = torch.distributed.get_backend()
        return ctx
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _import_group_defaults()
    try:
        import inspect
        kwargs = {"device_id": device} if device.type == "cuda" and "device_id" in \
            inspect.signature(torch.distributed.init_process_group).parameters else {}   # torch >= 2.3
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=ctx.timeout_s), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise PeerLost(f"process {rank} of {world}: could not join the other processes at "
                       f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')} within "
                       f"{ctx.timeout_s:g} s (ddp_timeout): {exc}") from exc
    ctx.owns_group = True
    # A group still alive at interpreter exit is torn down by C++ destructors while gloo's threads wait on a lost
    # peer, which aborts (SIGABRT) and hides the process's exit code; close it first on every way out.
    import atexit
    atexit.register(ctx.close)
    ctx.watch_launcher()
    return ctx


# torch modules whose functions take `group=group.WORLD` as a default: imported after the group exists (accelerate
# imports them with its FSDP helpers, while the model loads) they keep the group in those defaults for the life of
# the process, destroy_process_group cannot free it, and gloo's worker threads are still running when the
# interpreter shuts down; one of them dropping a tensor then needs the GIL of a dying interpreter and the process
# aborts (SIGABRT, "terminate called without an active exception") after a run that succeeded.
_GROUP_DEFAULT_MODULES = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp.sharded_grad_scaler")


def _import_group_defaults() -> None:
    """Import those modules before the group exists, so their defaults hold None (the default group, looked up
    at call time)."""
    import importlib
    for name in _GROUP_DEFAULT_MODULES:
        with contextlib.suppress(Exception):   # a build without them holds no such default either
            importlib.import_module(name)


def _device_for(name: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is asked for (or auto and present), else the CPU (gloo)."""
    if name in ("auto", "cuda") or name.startswith("cuda"):
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise ConfigError(f"LOCAL_RANK {local_rank} but this machine has {count} CUDA device(s); start "
                                  f"at most {count} processes per machine")
            return torch.device("cuda", local_rank)
        if name != "auto":
            raise ConfigError(f"device '{name}' was asked for but PyTorch sees no CUDA device")
    if name not in ("auto", "cpu"):
        raise ConfigError(f"multi-process training runs on CUDA (NCCL) or the CPU (gloo), not on '{name}'")
    return torch.device("cpu")


def resumed_step(global_step: int, epoch: int, *, saved_world: int, world: int, ga: int,
                 saved_steps_per_epoch: int | None, steps_per_epoch: int) -> int:
    """A state's step counted for this run's number of processes: the batches of its epoch that were done,
    re-divided among `world` processes (an epoch-end state maps exactly; mid-epoch rounds down)."""
    if saved_world == world:
        return global_step
    spe_old = saved_steps_per_epoch or steps_per_epoch
    in_epoch = max(0, global_step - epoch * spe_old)
    batches_done = in_epoch * saved_world * ga
    return epoch * steps_per_epoch + min(steps_per_epoch, batches_done // (world * ga))


class Silent:
    """Stands in for the record, the sampler and the validator on ranks other than 0."""

    path = ""
    run_id = ""
    enabled = False
    source = None
    items: list = []

    def set(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __call__(self, event) -> None:
        pass

    def due_step(self, *a) -> bool:
        return False

    def due_epoch(self, *a) -> bool:
        return False

    def make(self, *a) -> None:
        pass

    def run(self, *a, **k):
        return None


def errors_only(sink):
    """A sink that passes only errors (for ranks other than 0)."""
    from ..events import ERROR

    def emit(event) -> None:
        if sink is not None and event.kind == ERROR:
            sink(event)
    return emit


def save_after_peer_lost(exc: BaseException, ctx: DistContext, save_state, emit) -> None:
    """Another process died: rank 0 saves a resumable state of the last completed step, when it can."""
    if not (isinstance(exc, PeerLost) and ctx.is_main and save_state is not None):
        return
    from ..events import WARNING, Event
    try:
        path = save_state()
    except Exception as err:  # noqa: BLE001 - the PeerLost error is the one to report
        emit(Event(WARNING, {"message": f"could not save a state after losing the other processes: {err}"}))
        return
    emit(Event(WARNING, {"message": f"saved a resumable state after losing the other processes: {path}"}))


def state_extra(ctx: DistContext, plan) -> dict:
    """What a saved state records about the processes that saved it."""
    return {"world_size": ctx.world_size, "steps_per_epoch": plan.steps_per_epoch}


def adapt_resume(state, ctx: DistContext, plan, ga: int, lr_scheduler, emit, record) -> int:
    """The step to continue from: a state saved by N processes, resumed on M, has its step recomputed (and the
    learning-rate schedule moved to it); the record and the log say so. Same N: the saved step, unchanged."""
    from ..events import LOG, Event
    extra = state.extra or {}
    saved_world = int(extra.get("world_size") or 1)
    if saved_world == ctx.world_size:
        return state.global_step
    step = resumed_step(state.global_step, state.epoch, saved_world=saved_world, world=ctx.world_size, ga=ga,
                        saved_steps_per_epoch=extra.get("steps_per_epoch"), steps_per_epoch=plan.steps_per_epoch)
    lr_scheduler.last_epoch = step
    factors = [f(step) for f in lr_scheduler.lr_lambdas]
    for group, base, factor in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs, factors):
        group["lr"] = base * factor
    lr_scheduler._last_lr = [g["lr"] for g in lr_scheduler.optimizer.param_groups]
    message = (f"the state was saved by {saved_world} process(es) at step {state.global_step}; on "
               f"{ctx.world_size} process(es) that is step {step} of {plan.total_steps} "
               f"({plan.steps_per_epoch} steps per epoch)")
    emit(Event(LOG, {"message": message}))
    record.set(resumed_world_size={"saved": saved_world, "now": ctx.world_size, "saved_step": state.global_step,
                                   "step": step, "total_steps": plan.total_steps})
    return step


def adjust_metadata(meta: dict, ctx: DistContext, num_batches_per_epoch: int) -> None:
    """sd-scripts under accelerate: ss_num_batches_per_epoch is one process's share (its prepared DataLoader's
    length), ss_total_batch_size counts every process."""
    if not ctx.enabled:
        return
    meta["ss_num_batches_per_epoch"] = str(math.ceil(num_batches_per_epoch / ctx.world_size))
    total = meta.get("ss_total_batch_size")
    if total not in (None, "None"):
        meta["ss_total_batch_size"] = str(int(total) * ctx.world_size)
