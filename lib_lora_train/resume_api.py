"""POST /lora-train/v1/runs/{id}/resume: continue an interrupted or crashed run from its saved state.

The same as the tab's History "Resume run": the run is submitted again through the job manager with
`resume = <state dir>`, the run's recorded settings and its own output name (lib_lora_train.resume).
A run without a state, or one still queued / running / done, answers 409 with the reason.
"""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from .errors import LoraTrainError
from .record import read_run_record
from .resume import resume_config, resume_state


def resume_run(api: Any, run_id: str) -> Any:
    """`api` is the LoraTrainAPI; returns its RunCreated for the new job."""
    from .api import RunRequest
    job, past = api.find(run_id)
    if job is not None and job.active:
        raise HTTPException(409, f"run '{run_id}' is still {job.status}; stop it first (a stopped run saves a "
                                 f"state to resume from)")
    info = past if job is None else None
    project = job.project if job is not None else info.project
    path = job.record_path if job is not None else info.record_path
    try:
        rec = read_run_record(path) if path else None
    except (OSError, ValueError):
        rec = None
    if not isinstance(rec, dict):
        raise HTTPException(409, f"run '{run_id}' has no run record to resume from")
    state, why = resume_state(rec)
    if not state:
        raise HTTPException(409, why)
    try:
        config = resume_config(rec, state)
    except LoraTrainError as exc:
        raise HTTPException(400, str(exc)) from None
    return api.start(RunRequest(project=project, config=config))


def add_resume_route(router: Any, api: Any) -> None:
    from .api import RunCreated, _errors

    @router.post("/runs/{run_id}/resume", response_model=RunCreated, summary="Resume an interrupted run",
                 responses=_errors(400, 404, 409))
    def post_resume(run_id: str) -> Any:
        """Continue an interrupted (stopped, killed or crashed) run from its saved state (`state_dir`): a new job
        with the run's own settings, `resume` = that state and the same output name, so its files and record
        continue. 409 with the reason when the run is still queued/running, finished, or saved no state.
        The same as POST runs with `config.resume` = `state_dir` and `config.output_name` = the run's name."""
        return resume_run(api, run_id)
