"""Training jobs for the long-lived hosts (the tab, the standalone page, the HTTP API).

A `JobManager` owns one worker thread that runs queued jobs one after another through `training.loop.train`.
Each `Job` keeps what a page needs to (re)draw itself at any time: status, step, loss curve, log, outputs. A page
reload or a second browser tab therefore just reads the same Job; nothing lives only in a browser.

Paths are never taken from the caller: the training folder, the output folder and the other location keys come
from the project name and the host's configured folders; checkpoint / LoRA paths a caller names must lie inside
the host's folders.
"""
from __future__ import annotations

import gc
import inspect
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import background
from .config import ALIASES, TrainConfig, config_from_dict
from .errors import ConfigError, Interrupted, LoraTrainError
from .events import DONE, EPOCH, ERROR, INTERRUPTED, LOG, SAMPLE, SAVED, START, STEP, WARNING, Event, fan_out
from .heap import release_free_memory
from .hosts.base import Host, inside, safe_child
from .hosts import outputs as sidecars
from .record import record_paths

STATUSES = ("queued", "running", "done", "failed", "interrupted")
# Set from the project; a caller naming them is told so instead of being silently overridden.
PROJECT_KEYS = ("train_data_dir", "reg_data_dir", "output_dir", "dataset_config", "latents_cache_dir",
                "logging_dir", "reg_images_dir")
# Paths a caller may give, each checked to lie inside the host's folders.
PATH_KEYS = ("pretrained_model_name_or_path", "network_weights", "resume", "sample_prompts", "vae")
LOG_LINES = 500
# Not an engine event: the manager tells its listeners when a job changes status (data: status, error).
JOB_STATUS = "job_status"


class ProjectNotFound(ConfigError):
    """The named project has no folder (an HTTP API answers 404)."""


class JobConflict(ConfigError):
    """The request clashes with existing runs: an output name with files, or in use by a queued job (HTTP 409)."""


def canonical_key(key: str) -> str:
    """The option name config_from_dict will use for `key` (dashes and sd-scripts' misspellings folded)."""
    k = str(key).replace("-", "_")
    return ALIASES.get(k, k)


def name_taken(out_dir: str, name: str) -> bool:
    """Whether `out_dir` holds files of a run called `name` (the files train() refuses to replace)."""
    if not os.path.isdir(out_dir):
        return False
    for n in os.listdir(out_dir):
        if n in (name + ".safetensors", name + ".ckpt", name + ".pt", name + ".run.json"):
            return True
        if n.startswith(name + "-") and n.endswith(".safetensors") and n[len(name) + 1:-12].isdigit():
            return True
    return False


@dataclass
class Job:
    id: str
    project: str
    config: dict[str, Any]                     # the sd-scripts keys the run was started with (resolved)
    output_name: str
    output_dir: str
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: int = 0
    epochs: int | None = None
    loss: float | None = None
    avg_loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    error: str | None = None
    run_id: str | None = None
    record_path: str | None = None
    state_dir: str | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)   # {"name", "path", "epoch", "step", "kind"}
    samples: list[dict[str, Any]] = field(default_factory=list)   # {"paths", "epoch", "step"}
    losses: list[tuple[int, float]] = field(default_factory=list)        # (step, loss) of every step
    epoch_losses: list[tuple[int, float]] = field(default_factory=list)  # (epoch, average loss)
    # (epoch, loss on held-out images) from EPOCH events carrying "validation_loss" (the compare issue adds it)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    version: int = 0                           # bumped on every change: pages redraw only when it moves

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def to_dict(self, *, curve: bool = False, log: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "id", "project", "status", "created", "started", "finished", "step", "total_steps", "epoch", "epochs",
            "loss", "avg_loss", "it_per_s", "eta_s", "error", "run_id", "record_path", "state_dir", "output_name",
            "output_dir", "version")}
        d["outputs"] = [dict(o) for o in self.outputs]
        d["samples"] = [dict(s) for s in self.samples]
        d["epoch_losses"] = [list(p) for p in self.epoch_losses]
        d["validation_losses"] = [list(p) for p in self.validation_losses]
        if curve:
            d["losses"] = [list(p) for p in self.losses]
        if log:
            d["log"] = list(self.log)
        d["config"] = dict(self.config)
        return d


def _lines(event: Event) -> str | None:
    d = event.data
    if event.kind in (LOG, WARNING):
        return ("warning: " if event.kind == WARNING else "") + str(d.get("message", ""))
    if event.kind == ERROR:
        return f"error: {d.get('message')}"
    if event.kind == START:
        return f"{d.get('total_steps')} steps: {d.get('formula', '')}"
    if event.kind == EPOCH:
        return f"epoch {d.get('epoch')}/{d.get('epochs')} done, average loss {d.get('avg_loss', 0):.4f}"
    if event.kind == SAVED:
        return f"saved {os.path.basename(str(d.get('path')))}"
    if event.kind == INTERRUPTED:
        return f"interrupted at step {d.get('step')}; resumable state in {d.get('state')}"
    if event.kind == DONE:
        return f"done: {d.get('steps')} steps"
    return None


def _accepts(fn: Callable, name: str) -> bool:
    """Whether `fn` takes the keyword `name` (tests' fake runners take only cfg, model, sink, stop)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class JobManager:
    def __init__(self, host: Host, *, runner: Callable | None = None, preferred_weight: float = 1.0):
        self.host = host
        self._runner = runner          # tests pass a fake; None = training.loop.train
        self.preferred_weight = preferred_weight
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._submitting = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._closing = False          # Python is exiting: the worker ends instead of waiting for more work
        self.listeners: list[Callable[[Job, Event], None]] = []   # e.g. a page pushing updates

    # ------------------------------------------------------------ queries
    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def list(self, project: str | None = None) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return sorted([j for j in jobs if project is None or j.project == project], key=lambda j: j.created,
                      reverse=True)

    def current(self) -> Job | None:
        """The running job, else the next queued one, else None."""
        jobs = self.list()
        running = [j for j in jobs if j.status == "running"]
        queued = [j for j in jobs if j.status == "queued"]
        return running[0] if running else (queued[-1] if queued else None)

    # ------------------------------------------------------------ building a run
    def resolve_config(self, project: str, config: dict[str, Any]) -> TrainConfig:
        """The run's full TrainConfig: host defaults, then the caller's keys, then the project's folders.
        Raises ConfigError with a message a user can act on (ProjectNotFound for an unknown project)."""
        if not isinstance(config, dict):
            raise ConfigError("config must be an object of sd-scripts option names and values")
        from .prep.project import is_project, open_project

        root = self.host.paths.project_dir(project)
        if not is_project(root):
            raise ProjectNotFound(f"project '{project}' does not exist in {self.host.paths.projects}")
        # Keys as config_from_dict will read them, so no spelling slips past the checks below.
        given: dict[str, Any] = {}
        for key, value in config.items():
            if canonical_key(key) in PATH_KEYS and value in (None, ""):
                continue   # "no path" means the host's default (e.g. the loaded checkpoint), not an empty one
            given[canonical_key(key)] = value
        named = [k for k in config if canonical_key(k) in PROJECT_KEYS]
        if named:
            raise ConfigError(f"{', '.join(named)}: set from the project's folders; leave "
                              f"{'it' if len(named) == 1 else 'them'} out")
        roots = self.host.paths.allowed_roots()
        for key in PATH_KEYS:
            value = given.get(key)
            if value:
                path = os.path.abspath(os.path.expanduser(str(value)))
                if not inside(path, roots):
                    raise ConfigError(f"{key}: {value} is outside the folders this host may read "
                                      f"({', '.join(roots)})")
                given[key] = path
        proj = open_project(root)
        values = dict(self.host.base_config())
        values.update(given)
        values["train_data_dir"] = proj.train_dir
        if proj.folders(reg=True):
            values["reg_data_dir"] = proj.reg_dir
        values["reg_images_dir"] = os.path.join(proj.root, "reg_cache")   # prep/regimages.py (the API's too)
        out_dir = self.host.paths.output_dir(project)
        values["output_dir"] = out_dir
        explicit = bool(given.get("output_name"))
        if explicit:
            name = str(given["output_name"]).strip()
            safe_child(out_dir, name, what="output_name")   # a plain file name: the output stays in out_dir
            values["output_name"] = name
        elif given.get("resume"):
            # Resuming continues that run's files and record: its name is in the state folder's name.
            state = os.path.basename(os.path.normpath(str(given["resume"])))
            m = re.match(r"(?P<name>.+?)(?:-\d+|-step\d+)?-state$", state)
            values["output_name"] = m.group("name") if m else proj.name
        else:
            values["output_name"] = self._free_name(out_dir, proj.name)
        cfg = config_from_dict(values)
        if explicit and not cfg.resume and not cfg.overwrite and name_taken(out_dir, cfg.output_name):
            raise JobConflict(f"output_name '{cfg.output_name}' already has files in {out_dir}; choose another "
                              f"name, leave output_name out for a free one, or resume that run")
        if not proj.folders():
            raise ConfigError(f"project '{project}' has no training images yet (import some first)")
        preflight(cfg)
        return cfg

    def _free_name(self, out_dir: str, base: str) -> str:
        """The project's name, or name_v2, name_v3, ... so a new run never collides with an earlier one."""
        taken = {j.output_name for j in self.list() if j.output_dir == out_dir and j.active}
        name, n = base, 1
        while name in taken or name_taken(out_dir, name):
            n += 1
            name = f"{base}_v{n}"
        return name

    # ------------------------------------------------------------ control
    def submit(self, project: str, config: dict[str, Any]) -> Job:
        with self._submitting:    # concurrent submits: each picks its free output name after the previous one
            return self._submit(project, config)

    def _submit(self, project: str, config: dict[str, Any]) -> Job:
        cfg = self.resolve_config(project, config)
        job = Job(uuid.uuid4().hex[:12], project, cfg.to_dict(), cfg.output_name, cfg.output_dir)
        job.record_path = record_paths(cfg.output_dir, cfg.output_name)[0]
        with self._lock:
            clash = [j for j in self._jobs.values() if j.active and j.output_dir == job.output_dir
                     and j.output_name == job.output_name]
            if clash:
                raise JobConflict(f"output_name '{job.output_name}' is used by job {clash[0].id}, still "
                                  f"{clash[0].status}")
            self._jobs[job.id] = job
            self._queue.append(job.id)
            if self._worker is None or not self._worker.is_alive():
                self._worker = background.start(self._work, name="lora-train-jobs", stop=self._stop_for_exit)
            self._wake.notify_all()
        job.log.append(f"queued as {job.output_name} in {job.output_dir}")
        return job

    def stop(self, job_id: str) -> Job:
        """Stop a job: a queued one leaves the queue at once; a running one stops at the next step boundary
        (the engine saves a resumable state). A finished job is returned unchanged. KeyError: no such job."""
        job = self.get(job_id)
        with self._lock:
            if not job.active:
                return job
            queued = job.status == "queued" and job.id in self._queue
            if queued:
                self._queue.remove(job.id)
                job.status, job.finished = "interrupted", time.time()
                job.log.append("removed from the queue before it started")
                job.version += 1
            else:
                job.log.append("stop requested: stopping at the next step")
            job.stop_event.set()
        if queued:
            self._notify(job, Event(JOB_STATUS, {"status": job.status, "error": None}))
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        end = None if timeout is None else time.time() + timeout
        while job.active and (end is None or time.time() < end):
            time.sleep(0.05)
        return job

    def _stop_for_exit(self) -> None:
        """Python is exiting (background.py): queued jobs leave the queue, the running one stops at its next step
        with a resumable state, and the worker ends."""
        with self._lock:
            self._closing = True
            active = [j.id for j in self._jobs.values() if j.active]
        for job_id in active:
            self.stop(job_id)
        with self._lock:
            self._wake.notify_all()

    # ------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if not self._closing:
                        self._wake.wait(timeout=60)
                    if not self._queue:
                        self._worker = None
                        return
                job = self._jobs[self._queue.popleft()]
                # Under the lock: stop() sees either a queued job still in the queue or a running one.
                job.status, job.started = "running", time.time()
                job.version += 1
            self._notify(job, Event(JOB_STATUS, {"status": "running", "error": None}))
            self._run(job)

    def _run(self, job: Job) -> None:
        status, error = "failed", None
        try:
            from .training.distributed import refuse_distributed
            refuse_distributed("the Train LoRA tab and the HTTP API")   # the host owns its one GPU
            cfg = config_from_dict(job.config, TrainConfig())
            with self.host.training_session(cfg) as model:
                sink = fan_out([lambda e: self._on_event(job, e), self.host.progress_sink(job, job.stop_event)])
                runner = self._runner
                if runner is None:
                    from .training.loop import train as runner
                extra = {}
                # The host's own preview pipeline (the WebUI's) only when the run trains the host's model.
                renderer = getattr(self.host, "preview_renderer", None) if model is not None else None
                if renderer is not None and _accepts(runner, "preview_renderer"):
                    extra["preview_renderer"] = renderer
                # reg_images_prompt: drawn by the host's own txt2img too (its queue lock is already held here)
                source = getattr(self.host, "reg_image_source", None) if model is not None else None
                if source is not None and cfg.reg_images_prompt and _accepts(runner, "reg_source"):
                    extra["reg_source"] = lambda: source(take_lock=False)
                result = runner(cfg, model=model, sink=sink, stop=job.stop_event, **extra)
            status = "interrupted" if getattr(result, "status", "done") == "interrupted" else "done"
            job.record_path = getattr(result, "record_path", None) or job.record_path
            job.state_dir = getattr(result, "state_dir", None) or job.state_dir
        except Interrupted:
            status = "interrupted"
        except LoraTrainError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a job's failure is reported on the job, the host lives on
            error = f"{type(exc).__name__}: {exc}"
        finally:
            if error:
                job.error = error
                job.log.append(f"error: {error}")
            written = [o["path"] for o in job.outputs]
            if written:
                try:
                    self.host.outputs_written(written)
                except Exception as exc:  # noqa: BLE001
                    job.log.append(f"warning: the host could not refresh its LoRA list: {exc}")
            # A finished run's network (adapters, their layers and parameters) sits in reference cycles; collect
            # them now rather than at Python's next full collection, so a long-lived host is back at its
            # baseline when the job reports done (found by bench/soak_webui.py: 1332 tensors per run held late).
            gc.collect()
            release_free_memory()          # heap.py: what glibc kept of the run's freed tensors
            # Last: whoever waits for the status sees a job whose files and host lists are complete.
            job.finished = time.time()
            job.status = status
            job.version += 1
            self._notify(job, Event(JOB_STATUS, {"status": job.status, "error": job.error}))

    def _on_event(self, job: Job, event: Event) -> None:
        d = event.data
        if event.kind == START:
            job.total_steps, job.epochs, job.run_id = d.get("total_steps"), d.get("epochs"), d.get("run_id")
        elif event.kind == STEP:
            job.step, job.epoch = d.get("step", job.step), d.get("epoch", job.epoch)
            job.loss, job.avg_loss = d.get("loss"), d.get("avg_loss")
            job.it_per_s, job.eta_s = d.get("it_per_s"), d.get("eta_s")
            job.total_steps = d.get("total_steps", job.total_steps)
            if job.loss is not None:
                job.losses.append((job.step, float(job.loss)))
        elif event.kind == EPOCH:
            job.epoch_losses.append((d.get("epoch"), float(d.get("avg_loss") or 0.0)))
            if d.get("validation_loss") is not None:
                job.validation_losses.append((d.get("epoch"), float(d["validation_loss"])))
        elif event.kind == SAVED:
            self._publish(job, d)
        elif event.kind == SAMPLE:
            job.samples.append(dict(d))
            self._preview_for(job, d)
        elif event.kind == INTERRUPTED:
            job.state_dir = d.get("state")
        elif event.kind == ERROR:
            job.error = d.get("message")
        line = _lines(event)
        if line:
            job.log.append(line)
        job.version += 1
        self._notify(job, event)

    def _notify(self, job: Job, event: Event) -> None:
        for listener in list(self.listeners):
            try:
                listener(job, event)
            except Exception:  # noqa: BLE001 - a page going away must not stop training
                pass

    def _publish(self, job: Job, d: dict[str, Any]) -> None:
        """A LoRA file was written: list it, give it its card sidecar and (when a sample exists) a preview."""
        path = str(d.get("path"))
        entry = {"name": os.path.splitext(os.path.basename(path))[0], "path": path, "epoch": d.get("epoch"),
                 "step": d.get("step"), "kind": d.get("kind"), "sshs_model_hash": d.get("sshs_model_hash")}
        job.outputs = [o for o in job.outputs if o["path"] != path] + [entry]
        try:
            from .prep.project import open_project
            trigger = open_project(self.host.paths.project_dir(job.project)).trigger
            sidecars.write_sidecar(
                path, activation_text=trigger, preferred_weight=self.preferred_weight,
                sd_version_name=sidecars.sd_version(self._base_version(path)),
                notes=sidecars.run_notes(job.config, epoch=d.get("epoch"), step=d.get("step"), loss=job.avg_loss))
            if job.samples:
                last = job.samples[-1]
                if last.get("paths") and last.get("epoch") == d.get("epoch"):
                    sidecars.set_preview(path, last["paths"][-1])
        except Exception as exc:  # noqa: BLE001 - the LoRA is saved; a missing card extra is only a warning
            job.log.append(f"warning: could not write the card files for {os.path.basename(path)}: {exc}")

    def _preview_for(self, job: Job, d: dict[str, Any]) -> None:
        paths = d.get("paths") or []
        if not paths:
            return
        for out in job.outputs:
            if out.get("epoch") == d.get("epoch"):
                try:
                    sidecars.set_preview(out["path"], paths[-1])
                except OSError:
                    pass

    @staticmethod
    def _base_version(path: str) -> str | None:
        try:
            from safetensors import safe_open
            with safe_open(path, framework="pt") as fh:
                return (fh.metadata() or {}).get("ss_base_model_version")
        except Exception:  # noqa: BLE001
            return None


def preflight(cfg: TrainConfig) -> None:
    """What the engine would refuse before loading a model, checked at submit so a run that cannot start is
    refused now (400) instead of failing when its turn in the queue comes: network_args, that the named files
    exist, a resumable state, and a dataset that gives at least one step."""
    from .networks.config import check_run_network_options
    from .training.data_setup import plan_for_config

    check_run_network_options(cfg)
    for key in ("pretrained_model_name_or_path", "network_weights", "sample_prompts"):
        value = getattr(cfg, key, None)
        if value and not os.path.isfile(str(value)):
            raise ConfigError(f"{key}: no file at {value}")
    if cfg.resume:
        from .training.state import _read_info
        if not os.path.isdir(str(cfg.resume)):
            raise ConfigError(f"resume: no saved state folder at {cfg.resume}")
        _read_info(Path(str(cfg.resume)))
    plan = plan_for_config(cfg)
    if plan.total_steps < 1:
        raise ConfigError(f"this config trains 0 steps ({plan.formula}); raise max_train_epochs or add images")
