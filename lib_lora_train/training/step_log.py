"""The losses of a run as the progress bar, the run record and the NaN guard see them, read without making the
host wait for the device inside the step.

`float(loss)` on a CUDA tensor waits until the device has computed it, so the host cannot queue the next step
while the device works. With a lag of 1 (async_loss; on by default on CUDA) each micro-batch's loss is copied
into page-locked host memory without waiting, an event marks the copy, and the value is read one micro-batch
later, when the device has long finished it; the step's STEP event is emitted then. Before anything that must
see every loss (a save, previews, validation, the end of an epoch or of the run) the loop calls flush(). The
logged losses and their order are the same as when read at once; the NaN guard (guards.LossGuard) stops a
diverged run one step later at most, naming the same step.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from ..events import STEP, Event


class StepLog:
    def __init__(self, emit: Callable[[Event], None], guard, network, keep: Callable, *, lag: int = 0):
        self.emit, self.guard, self.network, self.keep, self.lag = emit, guard, network, keep, lag
        self._queue: deque = deque()     # (host value or tensor, copy-done event or None, meta), oldest first
        self._pending: deque = deque()   # metas of finished steps whose event waits for its loss
        self.recent: list[float] = []    # the last 50 steps' losses (avg_loss of the progress bar)
        self.loss_sum, self.loss_count = 0.0, 0
        self.epoch_loss, self.epoch_count = 0.0, 0

    # ---------------------------------------------------------------- per micro-batch / per step
    def add(self, loss, step: int, epoch: int) -> dict:
        """One micro-batch's loss (a device tensor, or a float already read); returns its meta record."""
        meta = {"step": step, "epoch": epoch}
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            if self.lag and loss.device.type == "cuda":
                host = torch.empty(loss.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(loss.float(), non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self._queue.append((host, done, meta))
            else:
                self._queue.append((loss, None, meta))
        else:
            self._queue.append((float(loss), None, meta))
        self._settle(self._ready())       # lag 0: the guard sees the loss before the optimizer step, as always
        return meta

    def end_step(self, meta: dict, event: dict) -> None:
        """The step of `meta` (its last micro-batch) is done: its STEP event goes out when its loss is read."""
        meta["event"] = event
        self._pending.append(meta)
        self._emit_ready()

    def flush(self) -> None:
        """Read every loss still in flight (waits for the device) and emit the events that waited for them."""
        self._settle(list(self._take(len(self._queue))))

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_count = 0.0, 0

    @property
    def epoch_avg(self) -> float:
        return self.epoch_loss / max(self.epoch_count, 1)

    @property
    def run_avg(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    # ---------------------------------------------------------------- inside
    def _ready(self):
        return self._take(max(0, len(self._queue) - self.lag))

    def _take(self, n: int):
        for _ in range(n):
            value, done, meta = self._queue.popleft()
            if done is not None:
                done.synchronize()        # the copy of a step already behind the device's queue: no real wait
            yield (value if isinstance(value, float) else float(value), meta)   # host memory: no device sync

    def _settle(self, entries) -> None:
        for value, meta in entries:
            meta["loss"] = value
            self.guard.check(value, meta["step"], meta["epoch"], self.network, keep=self.keep)
            self.epoch_loss += value
            self.epoch_count += 1
        self._emit_ready()

    def _emit_ready(self) -> None:
        while self._pending and "loss" in self._pending[0]:
            meta = self._pending.popleft()
            value = meta["loss"]
            self.recent = (self.recent + [value])[-50:]
            self.loss_sum += value
            self.loss_count += 1
            data = dict(meta["event"])    # its keys in their order; loss and avg_loss filled in now
            data["loss"], data["avg_loss"] = value, sum(self.recent) / len(self.recent)
            self.emit(Event(STEP, data))
