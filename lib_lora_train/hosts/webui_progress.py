"""The WebUI's progress display for a training run: `shared.state` filled the way the WebUI's own jobs fill it
(job count = steps, one-line text, live preview), the WebUI's Interrupt watched, and the bar's ETA made ours.

The WebUI's bar (progressbar.js) prints `textinfo`, the percentage and an ETA it computes itself as
elapsed / progress - elapsed from `state.time_start`. That estimate counts model building and latent caching as
training time and so disagrees with the engine's; instead of printing a second ETA in the text, `time_start` is
set so the WebUI's formula gives the engine's ETA: one ETA on the bar, ours.
"""
import contextlib
import threading
import time
from typing import Any, Optional

from ..events import DONE, ERROR, INTERRUPTED, LOG, SAMPLE, START, STEP, WARNING, Event


def task_id(job_id: str) -> str:
    """The WebUI progress-task id of a job: a page polls `/internal/progress` with it (requestProgress)."""
    return f"task(lora-train-{job_id})"


def _stop_asked(state) -> bool:
    """The WebUI's Interrupt: `interrupted`, or `stopping_generation`, which its top-row button sets first when
    "Don't Interrupt in the middle" is on (the default) and job_count > 1 (always, for a run of several steps)."""
    return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


class _Session:
    """One run's tie to `shared.state`: the sink and a watcher for the WebUI's Interrupt."""

    def __init__(self):
        self.task: Optional[str] = None
        self.cfg: Any = None              # the run's TrainConfig (the previews read their settings from it)
        self._closed = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def attach(self, webui: Any, job, stop: threading.Event):
        state = webui.shared.state
        self.task = task_id(job.id)
        state.job = self.task
        if webui.progress is not None:
            with contextlib.suppress(Exception):
                webui.progress.start_task(self.task)
        state.textinfo = f"Train LoRA: {job.output_name}, preparing"

        def watch() -> None:     # Interrupt can come while no event flows (model building, latent caching)
            while not self._closed.wait(0.2):
                if _stop_asked(state):
                    stop.set()
                    return
        self._watcher = threading.Thread(target=watch, name="lora-train-interrupt", daemon=True)
        self._watcher.start()
        return _StateSink(webui, job, stop)

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2)


def step_text(d: dict) -> str:
    """One line (the WebUI's bar shows textinfo only without a newline): epoch, step, loss, speed. The ETA is
    the bar's own (see bar_time_start)."""
    parts = [f"Epoch {d.get('epoch', '?')}/{d.get('epochs', '?')}",
             f"step {d.get('step', '?')}/{d.get('total_steps', '?')}"]
    if d.get("loss") is not None:
        parts.append(f"loss {float(d['loss']):.4f}")
    rate = d.get("it_per_s")
    if rate:
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1.0 / rate:.1f} s/it")
    return " · ".join(parts)


def bar_time_start(done: int, total: int, eta_s: Optional[float], now: float) -> Optional[float]:
    """The `state.time_start` for which the WebUI's ETA (elapsed / progress - elapsed, progress = done / total)
    equals `eta_s`; None when there is nothing to show (no ETA yet, nothing done, or finished)."""
    if eta_s is None or total <= 0 or not 0 < done < total:
        return None
    progress = done / total
    return now - max(float(eta_s), 0.0) * progress / (1.0 - progress)


class _StateSink:
    """Mirrors engine events into shared.state, the way the WebUI's own jobs fill it."""

    def __init__(self, webui: Any, job, stop: threading.Event):
        self.state = webui.shared.state
        self.job, self.stop = job, stop

    def __call__(self, event: Event) -> None:
        st, d = self.state, event.data
        if event.kind == START:
            st.job_count = int(d.get("total_steps") or 0)
            st.job_no = int(d.get("start_step") or 0)
            st.textinfo = f"Train LoRA: {self.job.output_name}, {st.job_count} steps"
        elif event.kind == STEP:
            st.job_count = int(d.get("total_steps") or st.job_count or 0)
            st.job_no = int(d.get("step") or 0)
            st.textinfo = step_text(d)
            start = bar_time_start(st.job_no, st.job_count, d.get("eta_s"), time.time())
            if start is not None:
                st.time_start = start
        elif event.kind == SAMPLE:
            paths = d.get("paths") or []
            if paths:
                from PIL import Image

                with Image.open(paths[-1]) as im:
                    st.assign_current_image(im.copy())
        elif event.kind in (LOG, WARNING) and not st.job_no:
            st.textinfo = str(d.get("message", "")).splitlines()[0][:200] if d.get("message") else st.textinfo
        elif event.kind == INTERRUPTED:
            st.textinfo = f"Interrupted at step {d.get('step')}; resumable state saved"
        elif event.kind == DONE:
            st.job_no = st.job_count
            st.textinfo = f"Done: {d.get('steps')} steps"
        elif event.kind == ERROR:
            st.textinfo = f"Error: {str(d.get('message', ''))[:200]}"
        if _stop_asked(st):
            self.stop.set()
