"""POST /lora-train/v1/runs/{id}/resume: a killed run's record resumes from its state through the job manager and
finishes; a run without a state, a finished run and an unknown id are answered with the reason (409 / 404)."""
import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from resume_support import as_killed, stopped_run  # noqa: E402
from test_api import V1, Env, template  # noqa: E402,F401


def test_resume_route_continues_a_killed_run(template, tmp_path):
    env = Env(template, tmp_path)
    cfg = stopped_run(env.jobs, "star", {"output_name": "star", "max_train_epochs": 2, "train_batch_size": 2},
                      at_step=1)
    rec = as_killed(cfg.output_dir, "star")
    run = env.get(f"/runs/{rec['run_id']}").json()
    assert run["status"] == "interrupted" and run["state_dir"] and os.path.isdir(run["state_dir"])
    r = env.post(f"/runs/{rec['run_id']}/resume")
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["output_name"] == "star" and created["project"] == "star"
    job = env.jobs.get(created["id"])
    assert job.config["resume"] == run["state_dir"] and job.config["max_train_epochs"] == 2
    done = env.poll(created["id"], timeout=300)
    assert done["status"] == "done", done["error"]
    assert done["step"] == done["total_steps"] == 4 and done["outputs"]
    again = env.post(f"/runs/{rec['run_id']}/resume")
    assert again.status_code == 409 and "finished" in again.json()["detail"]


def test_resume_route_refuses_a_run_without_a_state(template, tmp_path):
    env = Env(template, tmp_path)
    cfg = stopped_run(env.jobs, "star", {"output_name": "gone"}, at_step=1)
    rec = as_killed(cfg.output_dir, "gone", drop_states=True)
    assert env.get(f"/runs/{rec['run_id']}").json()["status"] == "failed"
    r = env.post(f"/runs/{rec['run_id']}/resume")
    assert r.status_code == 409 and "no training state was saved before it crashed" in r.json()["detail"]
    assert env.jobs.list() == []
    assert env.post("/runs/nosuchrun/resume").status_code == 404
    assert env.client.post(V1 + f"/runs/{rec['run_id']}/resume").status_code == 401   # behind the host's auth
