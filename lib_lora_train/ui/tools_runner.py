"""Running the Tools section's actions: one tool at a time in a background thread, a stop event, a progress
sink the status box reads, and results / errors as messages a user reads (never a traceback)."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .. import background
from ..errors import ConfigError, Interrupted, LoraTrainError
from ..events import LOG, PROGRESS, WARNING, Event

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- results

@dataclass
class ActionResult:
    ok: bool
    message: str
    path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def error_message(e: BaseException) -> str:
    """A readable one-paragraph message for an error (never a traceback)."""
    if isinstance(e, Interrupted):
        return f"Stopped: {e}"
    if isinstance(e, LoraTrainError):
        return f"Error: {e}"
    if isinstance(e, FileNotFoundError):
        return f"Error: file not found: {e.filename or e}"
    if isinstance(e, PermissionError):
        return f"Error: permission denied: {e.filename or e}"
    if isinstance(e, OSError):
        return f"Error: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return "Error: out of memory. Close other programs or use a smaller precision / fewer LoRAs."
    return f"Error: {type(e).__name__}: {e}"


def size_text(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return "?"
    n = float(os.path.getsize(path))
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------------------------------------- progress

class Progress:
    """An EventSink keeping what the status box shows: the stage and count of the last PROGRESS event, the
    last log line, the warnings."""

    def __init__(self) -> None:
        self.stage = ""
        self.done = 0
        self.total = 0
        self.message = ""
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        self.host_sink = None        # the host's own progress display (the WebUI's), when it has one

    def __call__(self, event: Event) -> None:
        if self.host_sink is not None:
            try:
                self.host_sink(event)
            except Exception:  # noqa: BLE001 - a broken display must not break the tool
                pass
        d = event.data
        with self._lock:
            if event.kind == PROGRESS:
                self.stage, self.done, self.total = str(d.get("stage", "")), int(d.get("done") or 0), \
                    int(d.get("total") or 0)
                if d.get("message"):
                    self.message = str(d["message"])
            elif event.kind == LOG:
                self.message = str(d.get("message", ""))
            elif event.kind == WARNING and len(self.warnings) < 20:
                self.warnings.append(str(d.get("message", "")))

    def text(self) -> str:
        with self._lock:
            parts = []
            if self.stage:
                pct = f" ({100 * self.done // self.total}%)" if self.total else ""
                parts.append(f"{self.stage}: {self.done}/{self.total}{pct}")
            if self.message:
                parts.append(self.message)
            lines = [" · ".join(parts)] if parts else []
            lines += [f"warning: {w}" for w in self.warnings]
            return "\n".join(lines)


@dataclass
class ToolRun:
    label: str
    stop: threading.Event
    progress: Progress
    thread: threading.Thread
    started: float = field(default_factory=time.time)
    result: ActionResult | None = None


class ToolRunner:
    """Runs one tool at a time in a background thread (the tools are CPU- and memory-heavy), with a stop event
    and a progress sink; the UI polls status()."""

    def __init__(self, host: Any = None) -> None:
        self._lock = threading.Lock()
        self.current: ToolRun | None = None
        self.host = host             # host.tool_progress(label, stop), when present: its progress and Interrupt

    @property
    def busy(self) -> bool:
        run = self.current
        return run is not None and run.result is None

    def start(self, label: str, fn: Callable[[Progress, threading.Event], ActionResult]) -> ToolRun:
        """Start fn(sink, stop) -> ActionResult; ConfigError if a tool is already running."""
        with self._lock:
            if self.busy:
                raise ConfigError(f"{self.current.label} is still running; wait for it or press Stop")
            run = ToolRun(label, threading.Event(), Progress(), None)  # type: ignore[arg-type]

            def work() -> None:
                hook = getattr(self.host, "tool_progress", None)
                try:
                    with (hook(label, run.stop) if callable(hook) else contextlib.nullcontext()) as host_sink:
                        run.progress.host_sink = host_sink
                        res = fn(run.progress, run.stop)
                except BaseException as e:  # noqa: BLE001 - every failure becomes a message
                    if not isinstance(e, (LoraTrainError, OSError)):
                        log.exception("%s failed", label)
                    res = ActionResult(False, error_message(e))
                run.result = res

            self.current = run
            run.thread = background.start(work, name=f"lora-tools-{label}", stop=run.stop)
            return run

    def stop(self) -> str:
        run = self.current
        if run is None or run.result is not None:
            return "Nothing is running."
        run.stop.set()
        return f"Stopping {run.label}…"

    def status(self, run: ToolRun | None = None) -> str:
        run = run or self.current
        if run is None:
            return ""
        elapsed = time.time() - run.started
        head = f"{run.label}: " + ("running" if run.result is None else ("done" if run.result.ok else "ended"))
        if run.stop.is_set() and run.result is None:
            head += " (stopping)"
        body = run.progress.text()
        return f"{head}, {elapsed:.0f} s" + (f"\n{body}" if body else "")

    def stream(self, label: str, fn: Callable[[Progress, threading.Event], ActionResult],
               interval: float = 0.5) -> Iterator[tuple[str, str]]:
        """Start fn and yield (status, result message) until it ends; the UI's generator handlers use it."""
        try:
            run = self.start(label, fn)
        except LoraTrainError as e:
            yield self.status(), error_message(e)
            return
        yield self.status(run), ""
        while run.thread.is_alive():
            run.thread.join(interval)
            if run.result is None:
                yield self.status(run), ""
        yield self.status(run), run.result.message if run.result else "Error: the tool ended without a result"

    def run_sync(self, label: str, fn: Callable[[Progress, threading.Event], ActionResult]) -> ActionResult:
        """Start fn and wait for its result (tests, the HTTP API)."""
        run = self.start(label, fn)
        run.thread.join()
        assert run.result is not None
        return run.result


def guarded(fn: Callable[..., ActionResult]) -> Callable[..., ActionResult]:
    """Turn errors of a quick (unthreaded) action into a failed ActionResult."""
    def call(*args, **kwargs) -> ActionResult:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            if not isinstance(e, (LoraTrainError, OSError)):
                log.exception("%s failed", fn.__name__)
            return ActionResult(False, error_message(e))
    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call
