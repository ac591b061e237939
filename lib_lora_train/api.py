"""The HTTP API for scripts: projects, runs, start and stop, under `/lora-train/v1/`.

`mount(app, jobs)` adds the routes to an existing FastAPI app (the WebUI's, or the standalone Gradio app's). The
routes sit on one APIRouter so a host can put its own check in front of all of them (the WebUI glue passes its
`--api-auth` dependency: routes added straight to the WebUI's app are not protected otherwise).

A run is either a job of this process (its id is the job id) or a past run found in a run record under
`<loras>/<project>/` (addressed by the record's `run_id`; a job can be addressed by its run_id too). Paths come
from the host's configured folders only; `JobManager.resolve_config` rejects any other.

Works with FastAPI 0.94 + pydantic 1 (the WebUI's pins) and current FastAPI + pydantic 2: plain `BaseModel`s with
`Field` descriptions, nothing version-specific. No `from __future__ import annotations`: FastAPI reads the
handlers' annotations at runtime.
"""
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from fastapi import APIRouter, HTTPException, Query
from fastapi import params as fastapi_params
from pydantic import BaseModel, Field

from .api_workflow import Strict, build_workflow_router, limit_json_body
from .errors import LoraTrainError
from .safenames import check_name
from .jobs import Job, JobConflict, JobManager, ProjectNotFound
from .record import RECORD_SUFFIX, read_run_record

PREFIX = "/lora-train/v1"
TAG = "LoRA training"


# ---------------------------------------------------------------------------------------------- models
class FolderInfo(BaseModel):
    folder: str = Field(..., description="Folder name in sd-scripts' form <repeats>_<name>, e.g. 10_zkz")
    repeats: int = Field(..., description="How many times each image of the folder is seen per epoch")
    images: int = Field(..., description="Number of images in the folder")
    regularization: bool = Field(False, description="True for a regularisation (class) image folder")


class ProjectInfo(BaseModel):
    name: str = Field(..., description="The project's folder name: what POST runs takes as `project`")
    title: str = Field(..., description="The name stored in the project (usually the same as `name`)")
    trigger: str = Field("", description="Trigger word; becomes the LoRA card's activation text")
    purpose: Optional[str] = Field(None, description="character | style | null")
    images: int = Field(..., description="Training images over all folders (regularisation images excluded)")
    folders: List[FolderInfo] = Field(default_factory=list, description="Training and regularisation folders")
    path: str = Field(..., description="The project folder")


class OutputInfo(BaseModel):
    name: str = Field(..., description="LoRA name as the WebUI lists it (file name without extension)")
    path: str = Field(..., description="The LoRA file")
    epoch: Optional[int] = Field(None, description="Epoch the file was saved at")
    step: Optional[int] = Field(None, description="Global step the file was saved at")
    kind: Optional[str] = Field(None, description="epoch | step | final")
    sshs_model_hash: Optional[str] = Field(None, description="The WebUI's hash of the file (sha256 of the tensors)")
    sidecar: Optional[str] = Field(None, description="The Lora card's user-metadata JSON beside the file, if any")
    preview: Optional[str] = Field(None, description="The Lora card's preview image, if any")


class EpochValue(BaseModel):
    epoch: int = Field(..., description="Epoch number, from 1")
    loss: Optional[float] = Field(..., description="Loss value for that epoch (null: not a number, the run diverged)")


class StepValue(BaseModel):
    step: int = Field(..., description="Global step")
    loss: Optional[float] = Field(..., description="Training loss of that step (null: not a number)")


class RunInfo(BaseModel):
    id: str = Field(..., description="Id to address the run with: the job id, or the record's run_id for a past run")
    run_id: Optional[str] = Field(None, description="The run record's id (known once the run has started)")
    project: str = Field(..., description="Project name")
    source: str = Field(..., description="job: run by this server process; record: read from a run record")
    status: str = Field(..., description="queued | running | done | failed | interrupted")
    step: int = Field(0, description="Steps done")
    total_steps: Optional[int] = Field(None, description="Steps planned (sd-scripts' formula)")
    epoch: int = Field(0, description="Current (or last) epoch, from 1")
    epochs: Optional[int] = Field(None, description="Epochs planned")
    loss: Optional[float] = Field(None, description="Loss of the latest step")
    avg_loss: Optional[float] = Field(None, description="Moving average of the recent steps' loss")
    it_per_s: Optional[float] = Field(None, description="Training speed, steps per second")
    eta_s: Optional[float] = Field(None, description="Estimated seconds left")
    error: Optional[str] = Field(None, description="Why the run failed")
    output_name: Optional[str] = Field(None, description="Base name of the run's files")
    output_dir: Optional[str] = Field(None, description="Folder of the run's files")
    outputs: List[OutputInfo] = Field(default_factory=list, description="LoRA files written so far")
    epoch_losses: List[EpochValue] = Field(default_factory=list, description="Average training loss per epoch")
    validation_loss: List[EpochValue] = Field(
        default_factory=list, description="Loss on held-out images per epoch (empty when not measured)")
    created: Optional[float] = Field(None, description="Unix time the run was submitted")
    started: Optional[float] = Field(None, description="Unix time training started")
    finished: Optional[float] = Field(None, description="Unix time the run ended")
    state_dir: Optional[str] = Field(None, description="Resumable training state (after an interrupt); POST "
                                                       "runs/{id}/resume continues the run from it (or pass it as "
                                                       "config.resume with the run's output_name)")
    record_path: Optional[str] = Field(None, description="The run record (run.json)")
    config: Dict[str, Any] = Field(default_factory=dict, description="The run's resolved sd-scripts options")
    losses: Optional[List[StepValue]] = Field(None, description="Loss of every step (only with ?curve=true)")
    log: Optional[List[str]] = Field(None, description="Log lines of this server's job (only with ?log=true)")


class RunRequest(Strict):
    project: str = Field(..., description="Name of an existing project (see GET projects)")
    config: Dict[str, Any] = Field(
        default_factory=dict,
        description="sd-scripts options, as the CLI takes them (e.g. {\"max_train_epochs\": 10, \"network_dim\": "
                    "32, \"learning_rate\": 1e-4}). The checkpoint defaults to the host's (the WebUI's loaded "
                    "model). Folders come from the project: train_data_dir, reg_data_dir, output_dir, "
                    "dataset_config are refused. Paths (resume, network_weights, sample_prompts, "
                    "pretrained_model_name_or_path) must lie in the host's folders.")


class RunCreated(BaseModel):
    id: str = Field(..., description="The new run's id (GET runs/{id}, POST runs/{id}/stop)")
    status: str = Field(..., description="queued (or already running)")
    project: str = Field(..., description="Project name")
    output_name: str = Field(..., description="Base name of the LoRA files this run writes")
    output_dir: str = Field(..., description="Folder the files go to")


class ErrorInfo(BaseModel):
    detail: str = Field(..., description="What is wrong, in words")


def _errors(*codes: int) -> Dict[int, Dict[str, Any]]:
    text = {400: "Bad configuration", 404: "Not found", 409: "Conflict with the run's state"}
    return {c: {"model": ErrorInfo, "description": text[c]} for c in codes}


# ---------------------------------------------------------------------------------------------- conversions
def _output(o: Dict[str, Any]) -> OutputInfo:
    from .hosts.outputs import preview_path, sidecar_path

    path = str(o.get("path") or "")
    side, prev = sidecar_path(path), preview_path(path)
    return OutputInfo(name=o.get("name") or os.path.splitext(os.path.basename(path))[0], path=path,
                      epoch=o.get("epoch"), step=o.get("step"), kind=o.get("kind"),
                      sshs_model_hash=o.get("sshs_model_hash"),
                      sidecar=side if os.path.isfile(side) else None, preview=prev if os.path.isfile(prev) else None)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity (Starlette refuses to encode them): a diverged loss is reported as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _pairs(values: Any) -> List[EpochValue]:
    out = []
    for pair in values or []:
        try:
            epoch, loss = pair
            out.append(EpochValue(epoch=int(epoch), loss=None if loss is None else _finite(float(loss))))
        except (TypeError, ValueError):
            continue
    return out


def _from_job(job: Job, *, curve: bool = False, log: bool = False) -> RunInfo:
    d = _finite(job.to_dict(curve=curve, log=log))
    info = RunInfo(
        id=job.id, source="job", outputs=[_output(o) for o in d["outputs"]], epoch_losses=_pairs(d["epoch_losses"]),
        validation_loss=_pairs(d.get("validation_losses")),
        **{k: d.get(k) for k in ("run_id", "project", "status", "step", "total_steps", "epoch", "epochs", "loss",
                                 "avg_loss", "it_per_s", "eta_s", "error", "output_name", "output_dir", "created",
                                 "started", "finished", "state_dir", "record_path", "config")})
    if curve:
        info.losses = [StepValue(step=int(s), loss=v) for s, v in d["losses"]]
    if log:
        info.log = [str(line) for line in d["log"]]
    return info


def _from_record(rec: Dict[str, Any], project: str, path: str) -> RunInfo:
    rec = _finite(rec)
    steps = rec.get("steps") or {}
    epochs = [e for e in rec.get("epochs") or [] if isinstance(e, dict)]
    status = rec.get("status") if rec.get("status") in ("queued", "running", "done", "failed", "interrupted") \
        else "failed"
    return RunInfo(
        id=str(rec.get("run_id") or os.path.basename(path)[:-len(RECORD_SUFFIX)]), run_id=rec.get("run_id"),
        project=project, source="record", status=status, step=int(rec.get("step") or 0),
        total_steps=steps.get("total_steps"), epoch=int(rec.get("epoch") or 0), epochs=steps.get("epochs"),
        loss=rec.get("last_loss"), error=rec.get("error"), output_name=rec.get("output_name"),
        output_dir=rec.get("output_dir"),
        outputs=[_output(o) for o in rec.get("outputs") or [] if isinstance(o, dict) and o.get("path")],
        epoch_losses=_pairs((e.get("epoch"), e.get("avg_loss")) for e in epochs if e.get("avg_loss") is not None),
        validation_loss=_pairs(_record_validation(rec, epochs)),
        created=rec.get("created"), started=rec.get("started"), finished=rec.get("finished"),
        state_dir=rec.get("resume_state") if status == "interrupted" else None, record_path=path,
        config=rec.get("config") if isinstance(rec.get("config"), dict) else {})


def _record_validation(rec: Dict[str, Any], epochs: List[Dict[str, Any]]) -> List[tuple]:
    """Per-epoch validation loss: on the record's epoch entries, else its `validation` list's epoch points."""
    pairs = [(e.get("epoch"), e.get("validation_loss")) for e in epochs if e.get("validation_loss") is not None]
    if not pairs:
        pairs = [(v.get("epoch"), v.get("loss")) for v in rec.get("validation") or []
                 if isinstance(v, dict) and (v.get("at") or v.get("kind")) == "epoch" and v.get("loss") is not None]
    return pairs


# ---------------------------------------------------------------------------------------------- the service
class LoraTrainAPI:
    """What the routes do, kept apart from FastAPI so it reads (and tests) as plain code."""

    def __init__(self, jobs: JobManager):
        self.jobs = jobs
        self.paths = jobs.host.paths

    def projects(self) -> List[ProjectInfo]:
        from .dataset.config import parse_folder_name
        from .dataset.images import list_images
        from .prep.project import is_project, open_project

        out = []
        root = self.paths.projects
        for entry in sorted(os.scandir(root), key=lambda e: e.name) if os.path.isdir(root) else []:
            if not entry.is_dir() or entry.name.startswith(".") or not is_project(entry.path):
                continue
            try:
                proj = open_project(entry.path)
            except LoraTrainError:
                continue   # an unreadable project.json: the tab says so; a listing skips it
            folders = []
            for reg in (False, True):
                for folder in proj.folders(reg=reg):
                    parsed = parse_folder_name(os.path.basename(folder))
                    folders.append(FolderInfo(folder=os.path.basename(folder), repeats=parsed[0] if parsed else 1,
                                              images=len(list_images(folder)), regularization=reg))
            out.append(ProjectInfo(name=entry.name, title=proj.name, trigger=proj.trigger, purpose=proj.purpose,
                                   images=sum(f.images for f in folders if not f.regularization), folders=folders,
                                   path=entry.path))
        return out

    def _records(self, project: Optional[str]) -> List[tuple]:
        """(project, record path, record) of every readable run record under <loras>/<project>/ (one project or
        all), newest first."""
        root = self.paths.loras
        if project is not None:
            names = [project]
        else:
            names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")) \
                if os.path.isdir(root) else []
        out = []
        for name in names:
            folder = os.path.join(root, name)
            if not os.path.isdir(folder):
                continue
            for entry in os.scandir(folder):
                if not entry.name.endswith(RECORD_SUFFIX) or not entry.is_file():
                    continue
                try:
                    rec = read_run_record(entry.path)
                except (OSError, ValueError):
                    continue   # being written or damaged: the next listing reads it
                if isinstance(rec, dict):
                    out.append((name, entry.path, rec))
        return sorted(out, key=lambda t: _number(t[2].get("created")), reverse=True)

    def _job_for_record(self, path: str, rec: Dict[str, Any]) -> Optional[Job]:
        real = os.path.realpath(path)
        for job in self.jobs.list():
            if (job.run_id and job.run_id == rec.get("run_id")) or \
                    (job.record_path and os.path.realpath(job.record_path) == real and job.active):
                return job
        return None

    def _check_project(self, project: str) -> None:
        from .hosts.base import safe_child
        try:
            check_name(project, "project")
            has_project = os.path.isdir(self.paths.project_dir(project))
            has_outputs = os.path.isdir(safe_child(self.paths.loras, project, what="project"))
        except LoraTrainError as exc:
            raise HTTPException(400, str(exc)) from None
        if not has_project and not has_outputs:
            raise HTTPException(404, f"project '{project}' does not exist in {self.paths.projects} and has no "
                                     f"runs in {self.paths.loras}")

    def runs(self, project: Optional[str] = None) -> List[RunInfo]:
        if project is not None:
            self._check_project(project)
        runs = [_from_job(j) for j in self.jobs.list(project)]
        for name, path, rec in self._records(project):
            if self._job_for_record(path, rec) is None:
                try:
                    runs.append(_from_record(rec, name, path))
                except (TypeError, ValueError, AttributeError):
                    continue   # a record this version cannot read (hand-edited, other engine): not listed
        return sorted(runs, key=lambda r: _number(r.created), reverse=True)

    def find(self, run_id: str) -> tuple:
        """(job, None) for a job of this process, (None, RunInfo) for a past run; 404 otherwise."""
        try:
            return self.jobs.get(run_id), None
        except KeyError:
            pass
        for job in self.jobs.list():
            if job.run_id == run_id:
                return job, None
        for name, path, rec in self._records(None):
            if rec.get("run_id") == run_id or (not rec.get("run_id") and rec.get("output_name") == run_id):
                job = self._job_for_record(path, rec)
                if job is not None:
                    return job, None
                try:
                    return None, _from_record(rec, name, path)
                except (TypeError, ValueError, AttributeError):
                    continue   # unreadable for this version, as in the listing
        raise HTTPException(404, f"no run with id '{run_id}' (neither a job of this server nor a run record "
                                 f"under {self.paths.loras})")

    def run(self, run_id: str, *, curve: bool = False, log: bool = False) -> RunInfo:
        job, past = self.find(run_id)
        if job is not None:
            return _from_job(job, curve=curve, log=log)
        if curve and past.record_path:
            past.losses = _record_curve(past.record_path)
        return past

    def start(self, request: RunRequest) -> RunCreated:
        try:
            check_name(request.project, "project")    # taken as given: " star" is not mapped onto "star"
            job = self.jobs.submit(request.project, dict(request.config or {}))
        except ProjectNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except JobConflict as exc:
            raise HTTPException(409, str(exc)) from None
        except LoraTrainError as exc:   # ConfigError / DataError: the engine's own message
            raise HTTPException(400, str(exc)) from None
        return RunCreated(id=job.id, status=job.status, project=job.project, output_name=job.output_name,
                          output_dir=job.output_dir)

    def stop(self, run_id: str) -> RunInfo:
        job, past = self.find(run_id)
        if job is None:
            raise HTTPException(409, f"run '{run_id}' is {past.status} (a past run; only runs of this server can "
                                     f"be stopped)")
        if not job.active:
            raise HTTPException(409, f"run '{run_id}' is already {job.status}; there is nothing to stop")
        return _from_job(self.jobs.stop(job.id))

    def delete_files(self, run_id: str) -> List[str]:
        """Delete one past run's files inside its project's output folder (the tab's History delete)."""
        from .ui.history import delete_run
        job, past = self.find(run_id)
        info = _from_job(job) if job is not None else past
        if job is not None and job.active:
            raise HTTPException(409, f"run '{run_id}' is {job.status}; stop it first")
        if not info.output_dir or not info.output_name:
            raise HTTPException(409, f"run '{run_id}' has no files yet")
        try:
            return delete_run(info.output_dir, info.output_name)
        except LoraTrainError as exc:
            raise HTTPException(400, str(exc)) from None


def _record_curve(record_path: str) -> List[StepValue]:
    from .record import EVENTS_SUFFIX, read_events

    events = record_path[:-len(RECORD_SUFFIX)] + EVENTS_SUFFIX
    if not os.path.isfile(events):
        return []
    return [StepValue(step=int(e["step"]), loss=_finite(float(e["loss"]))) for e in read_events(events)
            if e.get("kind") == "step" and e.get("loss") is not None and e.get("step") is not None]


# ---------------------------------------------------------------------------------------------- routes
def _as_dependencies(dependencies: Optional[Sequence[Any]]) -> List[Any]:
    """Accept `Depends(...)` objects or plain callables (wrapped in Depends)."""
    from fastapi import Depends
    return [d if isinstance(d, fastapi_params.Depends) else Depends(d) for d in dependencies or []]


def build_router(jobs: JobManager, *, dependencies: Optional[Sequence[Any]] = None) -> APIRouter:
    """The API's routes (without a prefix) on one router carrying the host's `dependencies`."""
    api = LoraTrainAPI(jobs)
    router = APIRouter(dependencies=_as_dependencies(dependencies) + _as_dependencies([limit_json_body]),
                       tags=[TAG])

    @router.get("/projects", response_model=List[ProjectInfo], summary="List dataset projects")
    def get_projects() -> List[ProjectInfo]:
        """Every project in the host's projects folder, with its trigger word, purpose and image folders."""
        return api.projects()

    @router.get("/runs", response_model=List[RunInfo], summary="List runs", responses=_errors(400, 404))
    def get_runs(project: Optional[str] = Query(None, description="Only this project's runs")) -> List[RunInfo]:
        """Jobs of this server (queued, running, finished) and past runs from the run records under
        `<loras>/<project>/`, newest first."""
        return api.runs(project)

    @router.post("/runs", response_model=RunCreated, summary="Start a run", responses=_errors(400, 404, 409))
    def post_runs(request: RunRequest) -> RunCreated:
        """Queue a training run of a project; runs go one at a time in submission order. Bad options answer 400
        with the engine's message, an unknown project 404, an output name in use 409."""
        return api.start(request)

    @router.get("/runs/{run_id}", response_model=RunInfo, summary="One run's progress and results",
                responses=_errors(404))
    def get_run(run_id: str,
                curve: bool = Query(False, description="Include the loss of every step"),
                log: bool = Query(False, description="Include the job's log lines")) -> RunInfo:
        """Status, step, epoch, loss, outputs (LoRA names and paths), error, per-epoch losses. `run_id` is a job
        id or a run record's run_id."""
        return api.run(run_id, curve=curve, log=log)

    @router.post("/runs/{run_id}/stop", response_model=RunInfo, summary="Stop a run", responses=_errors(404, 409))
    def post_stop(run_id: str) -> RunInfo:
        """A queued run leaves the queue; a running one stops at the next step, saves a resumable state
        (`state_dir`) and the last finished epoch's file, and ends as `interrupted`. 409 when already finished."""
        return api.stop(run_id)

    @router.get("/runs/{run_id}/outputs", response_model=List[OutputInfo], summary="A run's LoRA files",
                responses=_errors(404))
    def get_outputs(run_id: str) -> List[OutputInfo]:
        """The LoRA files a run wrote (names as the WebUI lists them), with their card files."""
        return api.run(run_id).outputs

    @router.delete("/runs/{run_id}/files", response_model=List[str], summary="Delete a run's files",
                   responses=_errors(400, 404, 409))
    def delete_files(run_id: str) -> List[str]:
        """Delete only this run's files (LoRAs, cards, samples, states, record) in its project's output folder;
        409 while it is queued or running."""
        return api.delete_files(run_id)

    @router.post("/runs/{run_id}/resume", response_model=RunCreated, summary="Resume an interrupted run",
                 responses=_errors(400, 404, 409))
    def post_resume(run_id: str) -> Any:
        """Continue an interrupted (stopped, killed or crashed) run from its saved state (`state_dir`): a new job
        with the run's own settings, `resume` = that state and the same output name, so its files and record
        continue. 409 with the reason when the run is still queued/running, finished, or saved no state.
        The same as POST runs with `config.resume` = `state_dir` and `config.output_name` = the run's name."""
        from .resume_api import resume_request
        project, config = resume_request(api, run_id)
        return api.start(RunRequest(project=project, config=config))

    from .interop.api import add_import_route
    add_import_route(router)   # POST /import: another trainer's settings -> {config, report}
    return router


def mount(app: Any, jobs: JobManager, *, prefix: str = PREFIX,
          dependencies: Optional[Sequence[Any]] = None) -> APIRouter:
    """Add the API's routes under `prefix` to an existing FastAPI app; every route gets `dependencies` (e.g. the
    WebUI's --api-auth check)."""
    router = build_router(jobs, dependencies=dependencies)
    app.include_router(router, prefix=prefix.rstrip("/"))
    deps = _as_dependencies(dependencies) + _as_dependencies([limit_json_body])
    app.include_router(build_workflow_router(jobs, deps), prefix=prefix.rstrip("/"))
    app.openapi_schema = None   # a schema cached before (someone opened /docs early) would hide the new routes
    return router


__all__ = ["PREFIX", "FolderInfo", "ProjectInfo", "OutputInfo", "EpochValue", "StepValue", "RunInfo", "RunRequest",
           "RunCreated", "ErrorInfo", "LoraTrainAPI", "build_router", "mount"]
