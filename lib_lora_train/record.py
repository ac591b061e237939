"""The run record: one machine-readable account of a run, beside its outputs.

`<output_dir>/<output_name>.run.json` holds the config, the model, the dataset summary, the step plan, timings,
outputs with hashes, samples, the validation losses (`validation`: [{epoch, step, loss, at}] and
`validation_source`: which images, how many, which timesteps) and the final status; `<output_name>.events.jsonl`
holds every event, one per line.
The CLI, the WebUI tab and the standalone page all read these two files.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from . import __version__
from .events import DONE, EPOCH, ERROR, INTERRUPTED, SAMPLE, SAVED, START, STEP, VALIDATION, Event
from .fsutil import atomic_write_json, pid_alive

RECORD_SUFFIX = ".run.json"
EVENTS_SUFFIX = ".events.jsonl"


def record_paths(output_dir: str, output_name: str) -> tuple[str, str]:
    base = os.path.join(output_dir, output_name)
    return base + RECORD_SUFFIX, base + EVENTS_SUFFIX


class RunRecord:
    """Keeps run.json current and appends events; used as one of the trainer's event sinks."""

    def __init__(self, output_dir: str, output_name: str, config: dict[str, Any], *, resume: bool = False):
        self.path, self.events_path = record_paths(output_dir, output_name)
        old = read_run_record(self.path) if resume and os.path.exists(self.path) else None
        now = time.time()
        self.data: dict[str, Any] = old or {
            "engine": "lib_lora_train",
            "engine_version": __version__,
            "run_id": uuid.uuid4().hex[:12],
            "output_name": output_name,
            "output_dir": os.path.abspath(output_dir),
            "created": now,
            "outputs": [],
            "samples": [],
            "epochs": [],
            "validation": [],
            "resumes": [],
        }
        if old is not None:
            self.data["resumes"].append({"time": now, "from_step": old.get("step", 0)})
        self.data.update({"status": "running", "config": config, "engine_version": __version__,
                          "started": now, "error": None, "finished": None, "crashed": None,
                          # who writes this record: a reader tells a run whose process died from a live one
                          "process": {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_ticks()}})
        self._last_write = 0.0
        os.makedirs(output_dir, exist_ok=True)
        if not resume and os.path.exists(self.events_path):
            os.unlink(self.events_path)   # only reached when overwriting an earlier run was allowed
        self._events = open(self.events_path, "a", encoding="utf-8")
        self.flush()

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self.flush()

    def flush(self) -> None:
        atomic_write_json(self.path, self.data)
        self._last_write = time.time()

    def __call__(self, event: Event) -> None:
        self._events.write(json.dumps(event.to_json(), ensure_ascii=False, default=str) + "\n")
        d = event.data
        if event.kind == START:
            self.data["steps"] = {k: d.get(k) for k in ("total_steps", "epochs", "steps_per_epoch", "formula")}
        elif event.kind == STEP:
            self.data.update(step=d["step"], epoch=d.get("epoch"), last_loss=d.get("loss"))
            if time.time() - self._last_write > 5:   # keep run.json fresh for readers, cheaply
                self._events.flush()
                self.flush()
            return
        elif event.kind == EPOCH:
            entry = {"epoch": d["epoch"], "avg_loss": d.get("avg_loss"), "step": d.get("step")}
            if d.get("validation_loss") is not None:
                entry["validation_loss"] = d["validation_loss"]
            self.data["epochs"].append(entry)
        elif event.kind == VALIDATION:
            entry = {k: d.get(k) for k in ("epoch", "step", "loss", "at")}
            # a resumed run may evaluate a point again: keep one entry per point, the latest
            kept = [v for v in self.data.setdefault("validation", [])
                    if (v.get("at"), v.get("epoch"), v.get("step")) != (entry["at"], entry["epoch"], entry["step"])]
            self.data["validation"] = kept + [entry]
            self.data["validation_source"] = {k: d.get(k) for k in ("source", "images", "timesteps", "seed")}
        elif event.kind == SAVED:
            self.data["outputs"] = [o for o in self.data["outputs"] if o.get("path") != d.get("path")]
            self.data["outputs"].append(dict(d))
        elif event.kind == SAMPLE:
            self.data["samples"].append(dict(d))
        elif event.kind in (DONE, INTERRUPTED, ERROR):
            self.data["finished"] = event.time
            self.data["seconds"] = round(event.time - self.data["started"], 3)
            self.data["status"] = {DONE: "done", INTERRUPTED: "interrupted", ERROR: "failed"}[event.kind]
            if event.kind == ERROR:
                self.data["error"] = d.get("message")
            if event.kind == INTERRUPTED:
                self.data["resume_state"] = d.get("state")
        self._events.flush()
        self.flush()

    def close(self) -> None:
        if not self._events.closed:
            self._events.close()


def read_run_record(path: str) -> dict[str, Any]:
    """The record as written, except that a run whose process died while "running" reads as ended (see below)."""
    with open(path, encoding="utf-8") as fh:
        return settle_dead_run(json.load(fh))


def _start_ticks(pid: int | None = None) -> int | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the run."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", encoding="ascii") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_gone(proc: Any) -> bool:
    """True when the process that wrote a record surely no longer runs (same machine, pid gone or reused)."""
    if not isinstance(proc, dict) or proc.get("host") != socket.gethostname():
        return False
    pid = proc.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return isinstance(pid, int)
    start = proc.get("start")
    now = _start_ticks(pid)
    return start is not None and now is not None and now != start


def settle_dead_run(rec: dict[str, Any]) -> dict[str, Any]:
    """A record left "running" by a process that was killed or crashed reads as "interrupted" when a saved state
    can resume it (resume_state names it) and as "failed" otherwise, with crashed = true and an explanation."""
    if not isinstance(rec, dict) or rec.get("status") != "running" or not process_gone(rec.get("process")):
        return rec
    state = None
    try:
        from .training.state import find_latest_state
        found = find_latest_state(rec.get("output_dir") or "", str(rec.get("output_name") or ""))
        state = str(found) if found else None
    except Exception:  # noqa: BLE001 - a reader must not fail on a damaged folder
        state = None
    pid = rec["process"].get("pid")
    rec = dict(rec, crashed=True, resume_state=state, status="interrupted" if state else "failed")
    rec["error"] = (f"the training process (pid {pid}) ended without finishing: it was killed or crashed at "
                    f"step {rec.get('step') or 0}. " +
                    (f"Resume with resume = \"{state}\"." if state else "No state was saved; start the run again."))
    return rec


def read_events(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break   # a line cut by a crash ends the readable part
    return out


def list_runs(folder: str) -> list[dict[str, Any]]:
    """Every run record in a folder, newest first."""
    runs = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(RECORD_SUFFIX):
                try:
                    runs.append(read_run_record(os.path.join(folder, name)))
                except (OSError, json.JSONDecodeError):
                    continue
    return sorted(runs, key=lambda r: r.get("created", 0), reverse=True)
