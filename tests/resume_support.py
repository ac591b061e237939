"""Shared setup of the resume tests (no tests here): a real tiny run stopped at a step through the same job
config the job manager builds, then its record made to read as a process that was killed (status still
"running", the writer's pid gone), the way a killed WebUI leaves it."""
from __future__ import annotations

import json
import os
import socket
import threading

from lib_lora_train.errors import Interrupted
from lib_lora_train.events import STEP
from lib_lora_train.record import record_paths
from lib_lora_train.training.loop import train

DEAD_PID = 2 ** 22 + 12345      # above the default pid_max: never a live process


def stopped_run(jobs, project: str, config: dict, at_step: int):
    """Train `project` with the job manager's resolved config and stop at step `at_step` (a state is saved)."""
    cfg = jobs.resolve_config(project, config)
    stop = threading.Event()

    def sink(event):
        if event.kind == STEP and event.data["step"] >= at_step:
            stop.set()

    try:
        train(cfg, sink=sink, stop=stop)
    except Interrupted:
        pass
    return cfg


def as_killed(output_dir: str, output_name: str, *, drop_states: bool = False) -> dict:
    """Rewrite the run's record as a killed process leaves it; with drop_states, no state folder is left."""
    path = record_paths(output_dir, output_name)[0]
    with open(path, encoding="utf-8") as fh:
        rec = json.load(fh)
    rec.update(status="running", finished=None, resume_state=None,
               process={"pid": DEAD_PID, "host": socket.gethostname(), "start": 1})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rec, fh)
    if drop_states:
        import shutil
        for entry in os.listdir(output_dir):
            if entry.startswith(output_name) and entry.endswith("-state"):
                shutil.rmtree(os.path.join(output_dir, entry))
    return rec
