"""The Compare view's request and result, how a host makes the grid, and `POST /lora-train/v1/runs/{id}/compare`.

`CompareRequest` is what the tab and the HTTP API ask for; `run_compare(host, request)` answers it with a
`CompareResult`: through `host.compare_grid(request)` when the host has one (the WebUI: its own X/Y/Z plot
script, hosts/webui_xyz.py), else with the engine's standalone grid (lib_lora_train.compare, diffusers'
DPM++ 2M Karras), saved beside the run with its infotext, labels and loss table.

`mount_compare(app, jobs, host)` adds the route. FastAPI is imported only there, so the tab can use the types
without it; handlers follow lib_lora_train/api.py (same run lookup, 404 unknown run, 400 bad input, 409 a run
still training or a grid interrupted).
"""
import base64
import io
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import ConfigError, Interrupted

DEFAULT_WEIGHTS = (0.4, 0.6, 0.8, 1.0)
DEFAULT_SAMPLER = "DPM++ 2M Karras"
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
MAX_SIDE = 2048
Progress = Callable[[int, int], None]


@dataclass
class CompareRequest:
    record_path: str                          # the run's <name>.run.json
    epochs: Optional[List[int]] = None        # None / empty: every epoch file of the run
    weights: Optional[List[float]] = None     # None / empty: 0.4, 0.6, 0.8, 1.0
    prompt: str = ""                          # empty: the run's trigger word
    negative_prompt: str = ""
    seed: int = -1                            # -1: one random seed for every cell
    steps: int = DEFAULT_STEPS
    width: Optional[int] = None               # None: the run's resolution
    height: Optional[int] = None
    sampler_name: str = DEFAULT_SAMPLER
    cfg_scale: float = DEFAULT_CFG
    drift: bool = True                        # also measure how far prompts without the trigger moved (drift.py)
    control_prompts: Optional[List[str]] = None   # None / empty: the run's captions without the trigger


@dataclass
class CompareResult:
    image: Any                                # PIL image: the grid, labels drawn
    row_labels: List[str]                     # one per epoch, top to bottom
    col_labels: List[str]                     # one per weight, left to right
    epochs: List[int]
    files: List[str]
    weights: List[float]
    prompt: str
    seed: int
    infotext: str
    ranking: Any                              # lib_lora_train.compare.Ranking
    method: str                               # "engine" | "lora_train" | "addnet" | "prompt_sr"
    interrupted: bool = False
    saved: Optional[str] = None               # the grid file (or the WebUI's grid folder)
    extra: Dict[str, Any] = field(default_factory=dict)
    failed: List[Any] = field(default_factory=list)   # compare.failed.FailedCell: cells drawn as "failed"
    drift: Any = None                         # compare.drift.DriftReport, or None when not asked for

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the picture (an API answer adds it as base64)."""
        from .compare.ranking import table_text
        return {"row_labels": list(self.row_labels), "col_labels": list(self.col_labels), "epochs": list(self.epochs),
                "files": list(self.files), "weights": list(self.weights), "prompt": self.prompt, "seed": self.seed,
                "infotext": self.infotext, "method": self.method, "interrupted": self.interrupted,
                "saved": self.saved, "validation": self.ranking.to_dict(), "table": table_text(self.ranking),
                "failed": [f.to_dict() for f in self.failed],
                "drift": self.drift.to_dict() if self.drift is not None else None}

    def png_bytes(self) -> bytes:
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        if self.infotext:
            info.add_text("parameters", self.infotext)
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()


def parse_weights(values: Any) -> List[float]:
    """Weights from a list or a text like "0.4, 0.6 0.8" (the engine's rules: numbers in -4..4)."""
    from .compare.grid import parse_weights as engine_parse
    if isinstance(values, str):
        values = [values] if values.strip() else None
    return engine_parse(values)


def check_request(request: CompareRequest) -> None:
    """Limits both hosts share; a bad value fails before any work."""
    if not 1 <= int(request.steps) <= 150:
        raise ConfigError(f"steps: expected 1..150, got {request.steps}")
    for key in ("width", "height"):
        v = getattr(request, key)
        if v is not None and not (64 <= int(v) <= MAX_SIDE and int(v) % 8 == 0):
            raise ConfigError(f"{key}: expected a multiple of 8 in 64..{MAX_SIDE}, got {v}")
    if not os.path.isfile(request.record_path or ""):
        raise ConfigError(f"run record not found: {request.record_path}")


def choose_files(run: Any, epochs: Optional[Sequence[int]]) -> list:
    """The run's epoch files to draw: all, or those of `epochs` (each must have a file)."""
    if not run.files:
        gone = f" (listed but missing: {', '.join(run.missing)})" if run.missing else ""
        raise ConfigError(f"{run.record_path}: the run has no epoch files to compare{gone}")
    if not epochs:
        return list(run.files)
    wanted = sorted({int(e) for e in epochs})
    absent = [e for e in wanted if run.file_for(e) is None]
    if absent:
        have = ", ".join(str(f.epoch) for f in run.files)
        raise ConfigError(f"epochs: no file for epoch {', '.join(map(str, absent))}; this run has files for "
                          f"epochs {have}")
    return [run.file_for(e) for e in wanted]


from .jobs import _accepts  # noqa: E402  (one signature check for hosts' optional keywords)


def run_compare(host: Any, request: CompareRequest, *, stop: Optional[threading.Event] = None,
                progress: Optional[Progress] = None) -> CompareResult:
    """The grid for `request`: the host's own (host.compare_grid) or the engine's standalone one.

    Drift with a host's own grid: a host that can draw single pictures offers `host.compare_renderer(request)`
    -> `render(specs, epoch_file, weight) -> images` (its sampler, its LoRA loading); the control prompts are
    drawn with it after the grid. A host without one gets an honest "not measured" report."""
    check_request(request)
    own = getattr(host, "compare_grid", None)
    if callable(own):
        kw = {k: v for k, v in (("stop", stop), ("progress", progress)) if v is not None and _accepts(own, k)}
        result = own(request, **kw)
        if request.drift and getattr(result, "drift", None) is None and not result.interrupted:
            result.drift = host_drift(host, request, result, stop=stop)
        return result
    return engine_compare(request, stop=stop, progress=progress)


def host_drift(host: Any, request: CompareRequest, result: CompareResult, *,
               stop: Optional[threading.Event] = None) -> Any:
    """Drift of a host-made grid's epochs, drawn by the host's own single-picture renderer when it has one."""
    from .compare.drift import DRIFT_SEEDS, default_control_prompts, measure_drift, suggest, unavailable
    from .compare.runs import open_run
    make = getattr(host, "compare_renderer", None)
    if not callable(make):
        return unavailable(f"this host ({getattr(host, 'name', '?')}) draws the grid as one picture and offers "
                           f"no single-picture renderer to draw the control prompts with")
    run = open_run(request.record_path)
    files = choose_files(run, request.epochs)
    controls = [p for p in (request.control_prompts or []) if p and p.strip()] or \
        default_control_prompts(run.record)
    if not controls:
        return unavailable("the run's captions hold nothing but the trigger and it has no class prompt; pass "
                           "control prompts")
    rw, rh = run.resolution
    report = measure_drift(make(request), files, controls, seed=int(result.seed), n_seeds=DRIFT_SEEDS,
                           negative_prompt=request.negative_prompt or None, steps=int(request.steps),
                           width=int(request.width or rw), height=int(request.height or rh),
                           sampler=request.sampler_name or None, cfg_scale=float(request.cfg_scale), stop=stop)
    return suggest(report, result.ranking)


def engine_compare(request: CompareRequest, *, model: Any = None, stop: Optional[threading.Event] = None,
                   progress: Optional[Progress] = None, save: bool = True) -> CompareResult:
    """The standalone grid (diffusers' sampler, the LoRA merged at each weight), saved beside the run."""
    from .compare.cli import default_out_path
    from .compare.grid import compare_grid, save_compare_grid
    from .compare.runs import open_run

    run = open_run(request.record_path)
    choose_files(run, request.epochs)                 # the same message as the WebUI host for a bad epoch
    grid = compare_grid(run, model=model, epochs=request.epochs or None, weights=parse_weights(request.weights),
                        prompts=[request.prompt] if request.prompt.strip() else None,
                        negative_prompt=request.negative_prompt or None,
                        seed=None if int(request.seed) < 0 else int(request.seed), steps=int(request.steps),
                        width=request.width, height=request.height, sampler=request.sampler_name or None,
                        cfg_scale=float(request.cfg_scale), progress=progress, stop=stop,
                        drift=bool(request.drift), control_prompts=request.control_prompts or None)
    saved = save_compare_grid(grid, default_out_path(run)) if save else None
    return CompareResult(image=grid.image, row_labels=list(grid.row_labels), col_labels=list(grid.col_labels),
                         epochs=list(grid.epochs), files=list(grid.files), weights=list(grid.weights),
                         prompt=grid.prompts[0], seed=grid.seed, infotext=grid.infotext, ranking=grid.ranking,
                         method="engine", saved=saved, failed=list(grid.failed), drift=grid.drift)


# ---------------------------------------------------------------------------------------------- runs to offer
@dataclass
class RunChoice:
    label: str            # what a dropdown shows: "project / name · date · status"
    record_path: str
    project: str
    output_name: str
    created: float


def compare_runs(host: Any, jobs: Any = None) -> List[RunChoice]:
    """Runs that have a record, newest first: the records under <loras>/<project>/ plus this process's jobs
    (a job's record may sit elsewhere only if the host's folders changed)."""
    import time

    from .record import RECORD_SUFFIX, read_run_record

    root = host.paths.loras
    found: Dict[str, RunChoice] = {}

    def add(path: str, project: str) -> None:
        real = os.path.realpath(path)
        if real in found:
            return
        try:
            rec = read_run_record(path)
        except (OSError, ValueError):
            return
        if not isinstance(rec, dict):
            return
        created = float(rec.get("created") or 0)
        name = str(rec.get("output_name") or os.path.basename(path)[:-len(RECORD_SUFFIX)])
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(created)) if created else "?"
        label = f"{project} / {name} · {when} · {rec.get('status') or '?'}"
        found[real] = RunChoice(label, path, project, name, created)

    for entry in sorted(os.scandir(root), key=lambda e: e.name) if os.path.isdir(root) else []:
        if entry.is_dir() and not entry.name.startswith("."):
            for f in sorted(os.listdir(entry.path)):
                if f.endswith(RECORD_SUFFIX):
                    add(os.path.join(entry.path, f), entry.name)
    for job in jobs.list() if jobs is not None else []:
        if job.record_path and os.path.isfile(job.record_path):
            add(job.record_path, job.project)
    out = sorted(found.values(), key=lambda c: -c.created)
    seen: Dict[str, int] = {}
    for c in out:                      # labels are dropdown values: make them unique
        n = seen.get(c.label, 0)
        seen[c.label] = n + 1
        if n:
            c.label = f"{c.label} ({n + 1})"
    return out


# ---------------------------------------------------------------------------------------------- the route
def build_compare_router(jobs: Any, host: Any, *, dependencies: Optional[Sequence[Any]] = None) -> Any:
    from fastapi import APIRouter, HTTPException
    from pydantic import BaseModel, Field

    from .api import TAG, LoraTrainAPI, _as_dependencies, _errors, _finite
    from .errors import LoraTrainError

    class CompareBody(BaseModel):
        epochs: Optional[List[int]] = Field(None, description="Epoch numbers to draw (default: every epoch file)")
        weights: Optional[List[float]] = Field(None, description="LoRA weights, one column each "
                                                                  "(default 0.4, 0.6, 0.8, 1.0)")
        prompt: str = Field("", description="Prompt (default: the run's trigger word); the LoRA is added by the "
                                            "grid, do not write a <lora:...> for it")
        negative_prompt: str = Field("", description="Negative prompt")
        seed: int = Field(-1, description="One seed for every cell (-1: random, reported back)")
        steps: int = Field(DEFAULT_STEPS, description="Sampling steps, 1..150")
        width: Optional[int] = Field(None, description="Width, a multiple of 8 (default: the run's resolution)")
        height: Optional[int] = Field(None, description="Height, a multiple of 8 (default: the run's resolution)")
        sampler_name: str = Field(DEFAULT_SAMPLER, description="Sampler (the WebUI's names; default DPM++ 2M "
                                                               "Karras)")
        cfg_scale: float = Field(DEFAULT_CFG, description="CFG scale")
        drift: bool = Field(True, description="Also draw control prompts (without the trigger) with the base "
                                              "model and each epoch on fixed seeds, and report their drift")
        control_prompts: Optional[List[str]] = Field(None, description="Control prompts for drift (default: the "
                                                     "run's most frequent captions with the trigger taken out, "
                                                     "or its reg_images_prompt)")

    class ValidationRow(BaseModel):
        epoch: int = Field(..., description="Epoch (0: before training)")
        step: Optional[int] = Field(None, description="Global step at the end of the epoch")
        validation_loss: Optional[float] = Field(None, description="Loss on held-out images at fixed noise")
        train_loss: Optional[float] = Field(None, description="The epoch's average training loss")
        file: Optional[str] = Field(None, description="The epoch's LoRA file")
        rank: Optional[int] = Field(None, description="1 = lowest validation loss among epochs with a file")
        suggested: bool = Field(False, description="The suggested epoch")

    class Validation(BaseModel):
        rows: List[ValidationRow] = Field(default_factory=list, description="One row per epoch")
        suggested_epoch: Optional[int] = Field(None, description="Epoch with the lowest validation loss")
        verdict: str = Field("no_data", description="overfitting | undertrained | trained | no_data")
        explanation: str = Field("", description="What the curves say, in plain words")
        source: Optional[str] = Field(None, description="held_out | training_images | null")

    class FailedCellModel(BaseModel):
        reason: str = Field(..., description="Why the cell failed (an error, or a NaN image)")
        epoch: Optional[int] = Field(None, description="The cell's epoch (row)")
        weight: Optional[float] = Field(None, description="The cell's LoRA weight (column)")
        prompt: Optional[str] = Field(None, description="The cell's prompt")
        file: Optional[str] = Field(None, description="The cell's LoRA file")

    class DriftRowModel(BaseModel):
        epoch: int = Field(..., description="Epoch")
        drift: Optional[float] = Field(None, description="Mean image distance of the control pictures from the "
                                                         "base model's (same seeds), 0 = unchanged, 1 = maximal")
        ratio: Optional[float] = Field(None, description="drift / spread")
        within: Optional[bool] = Field(None, description="ratio <= threshold: the control prompts were left alone")
        file: Optional[str] = Field(None, description="The epoch's LoRA file")

    class DriftModel(BaseModel):
        available: bool = Field(True, description="False: drift was not measured (explanation says why)")
        prompts: List[str] = Field(default_factory=list, description="The control prompts (no trigger)")
        seeds: List[int] = Field(default_factory=list, description="Seeds of the control pictures")
        weight: float = Field(1.0, description="LoRA weight the control prompts were drawn at")
        spread: Optional[float] = Field(None, description="The base model's mean distance between pictures of "
                                                          "the same prompt at different seeds: drift's scale")
        threshold: float = Field(0.5, description="Largest ratio that counts as 'left alone'")
        rows: List[DriftRowModel] = Field(default_factory=list, description="One row per epoch")
        suggested_epoch: Optional[int] = Field(None, description="Lowest validation loss among the epochs that "
                                                                 "did not drift (see explanation)")
        explanation: str = Field("", description="The suggestion and its reasoning, in plain words")
        metric: str = Field("", description="How the distance is computed")

    class CompareAnswer(BaseModel):
        id: str = Field(..., description="The run's id")
        image: str = Field(..., description="The grid as a base64 PNG (with its infotext)")
        row_labels: List[str] = Field(..., description="Row labels, top to bottom (one per epoch)")
        col_labels: List[str] = Field(..., description="Column labels, left to right (one per weight)")
        epochs: List[int] = Field(..., description="Epoch of each row")
        files: List[str] = Field(..., description="LoRA file of each row")
        weights: List[float] = Field(..., description="Weight of each column")
        prompt: str = Field(..., description="The prompt used (without the LoRA token the grid adds)")
        seed: int = Field(..., description="The seed every cell used")
        infotext: str = Field("", description="The grid's generation parameters")
        method: str = Field(..., description="engine | lora_train | addnet | prompt_sr: who made the grid")
        interrupted: bool = Field(False, description="True when Interrupt stopped the grid (cells left blank)")
        saved: Optional[str] = Field(None, description="Where the grid was saved")
        validation: Validation = Field(..., description="Epochs ranked by validation loss")
        table: str = Field("", description="The validation-loss table as text")
        failed: List[FailedCellModel] = Field(default_factory=list, description="Cells that failed (drawn as a "
                                              "grey 'failed' tile, not as a black picture), with the reason")
        drift: Optional[DriftModel] = Field(None, description="Drift of the prompts without the trigger, per "
                                                              "epoch, and the epoch suggested by loss and drift "
                                                              "(null when not asked for)")

    api = LoraTrainAPI(jobs)
    router = APIRouter(dependencies=_as_dependencies(dependencies), tags=[TAG])

    @router.post("/runs/{run_id}/compare", response_model=CompareAnswer, summary="Epoch x weight grid of a run",
                 responses=_errors(400, 404, 409))
    def post_compare(run_id: str, body: CompareBody) -> CompareAnswer:
        """Draw every chosen epoch file of the run at every weight with one seed (rows: epochs, columns:
        weights) and rank the epochs by validation loss. In the WebUI the grid is made by its X/Y/Z plot script
        (its sampler, prompt syntax and Lora loading) and saved like any grid; elsewhere by the engine. Answers
        when the grid is done."""
        job, past = api.find(run_id)
        if job is not None and job.active:
            raise HTTPException(409, f"run '{run_id}' is {job.status}; compare its epochs when it has finished")
        record = job.record_path if job is not None else past.record_path
        if not record or not os.path.isfile(record):
            raise HTTPException(409, f"run '{run_id}' has no run record yet")
        data = (getattr(body, "model_dump", None) or body.dict)()      # pydantic 2 / pydantic 1
        request = CompareRequest(record_path=record, **data)
        try:
            result = run_compare(host, request)
        except Interrupted as exc:
            raise HTTPException(409, f"the grid was interrupted: {exc}") from None
        except LoraTrainError as exc:
            raise HTTPException(400, str(exc)) from None
        d = _finite(result.to_dict())
        return CompareAnswer(id=run_id, image=base64.b64encode(result.png_bytes()).decode("ascii"), **d)

    return router


def mount_compare(app_or_router: Any, jobs: Any, host: Any, *, prefix: str = "/lora-train/v1",
                  dependencies: Optional[Sequence[Any]] = None) -> Any:
    """Add the compare route under `prefix` to a FastAPI app (or a router not yet included anywhere)."""
    router = build_compare_router(jobs, host, dependencies=dependencies)
    app_or_router.include_router(router, prefix=prefix.rstrip("/"))
    if hasattr(app_or_router, "openapi_schema"):
        app_or_router.openapi_schema = None     # a cached schema would hide the new route
    return router


__all__ = ["CompareRequest", "CompareResult", "RunChoice", "DEFAULT_WEIGHTS", "DEFAULT_SAMPLER", "check_request",
           "host_drift", "choose_files", "compare_runs", "engine_compare", "parse_weights", "run_compare", "build_compare_router",
           "mount_compare"]
