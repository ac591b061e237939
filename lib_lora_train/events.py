"""Events the engine emits while it works; each host renders them its own way.

The engine never prints. It calls `sink(event)` for every event; the CLI draws a progress bar, the WebUI
updates `shared.state`, the standalone page streams them, and the run record appends them to events.jsonl.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Kinds used by the trainer. `data` carries the details listed next to each kind.
START = "start"            # total_steps, epochs, steps_per_epoch, formula, run_id
STEP = "step"              # step, total_steps, epoch, loss, avg_loss, lr (dict group -> lr), it_per_s, eta_s
EPOCH = "epoch"            # epoch, epochs, avg_loss, step, validation_loss (when validated this epoch)
VALIDATION = "validation"  # epoch, step, loss, at ("start" | "epoch" | "step"), source, images, timesteps
SAVED = "saved"            # path, epoch, step, sshs_model_hash, kind ("epoch" | "step" | "final")
STATE_SAVED = "state_saved"  # path, epoch, step
SAMPLE = "sample"          # paths, epoch, step
WARNING = "warning"        # message
LOG = "log"                # message (progress of slow preparation: loading, caching latents)
ERROR = "error"            # message, type
INTERRUPTED = "interrupted"  # step, epoch, state (path)
DONE = "done"              # outputs, steps, seconds
PROGRESS = "progress"      # tools (merge, extract, ...): tool, stage, done, total, message


@dataclass
class Event:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        out = {"kind": self.kind, "time": round(self.time, 3)}
        for key, value in self.data.items():
            # a data field named like a header field (SAVED's "kind": epoch | step | final) keeps its value
            # under "data_<name>" instead of replacing the event's own kind
            out["data_" + key if key in ("kind", "time") else key] = value
        return out


EventSink = Callable[[Event], None]


def fan_out(sinks: Iterable[EventSink | None]) -> EventSink:
    """One sink that forwards to several; a failing host sink must never break training."""
    live = [s for s in sinks if s is not None]

    def emit(event: Event) -> None:
        for sink in live:
            try:
                sink(event)
            except Exception:  # noqa: BLE001 - a broken progress display is not a reason to lose a run
                pass
    return emit
