"""Resuming a past run from its record: whether it can be resumed (and why not), and the config that submits it
again through the job manager with `resume = <state dir>`, the run's own settings and its own output name.

The tab's History section and the HTTP API (POST runs/{id}/resume) both use these two functions, so a run that a
killed process left behind continues the same way from either.
"""
from __future__ import annotations

import os
from typing import Any

from .jobs import PROJECT_KEYS, canonical_key


def resume_state(rec: dict[str, Any]) -> tuple[str | None, str]:
    """(state folder, "") when the run can continue; (None, why not) otherwise. `rec` is a record as
    read_run_record returns it (a run whose process died already reads as interrupted / failed)."""
    name = rec.get("output_name") or "this run"
    status = rec.get("status")
    if status in ("running", "queued"):
        return None, f"run '{name}' is still {status}; stop it first (a stopped run saves a state to resume from)"
    if status == "done":
        return None, f"run '{name}' finished; there is nothing to resume"
    state = rec.get("resume_state")
    if not state and status in ("interrupted", "failed"):
        try:   # a failed run (out of memory, full disk) may have saved states along the way
            from .training.state import find_latest_state
            found = find_latest_state(rec.get("output_dir") or "", str(rec.get("output_name") or ""))
            state = str(found) if found else None
        except Exception:  # noqa: BLE001 - a damaged folder means no state, not a crash of the page
            state = None
    if not state:
        return None, (f"run '{name}' cannot be resumed: no training state was saved before it "
                      f"{'crashed' if rec.get('crashed') else 'ended'} (states are saved on Stop, or every epoch "
                      f"with save_state); start it again")
    if not os.path.isdir(str(state)):
        return None, f"run '{name}' cannot be resumed: its state folder {state} is gone; start it again"
    return str(state), ""


def resume_config(rec: dict[str, Any], state: str) -> dict[str, Any]:
    """The run's recorded settings as a job config that continues it: the project's folders left to the job
    manager, `resume` = the state, `output_name` = the run's own (its files and record continue)."""
    config = {k: v for k, v in (rec.get("config") or {}).items()
              if canonical_key(k) not in PROJECT_KEYS and canonical_key(k) != "resume"}
    config["resume"] = state
    config["output_name"] = rec.get("output_name")
    return config
