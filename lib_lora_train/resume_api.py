"""What POST /lora-train/v1/runs/{id}/resume (api.py) submits: continue an interrupted or crashed run from its saved state.

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


def resume_request(api: Any, run_id: str) -> tuple[str, dict]:
    """(project, config) of the job that resumes run `run_id` (`api` is the LoraTrainAPI); HTTPException with the
    reason when it cannot resume."""
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
    return project, config
