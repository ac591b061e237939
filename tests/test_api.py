"""The HTTP API under /lora-train/v1/ through FastAPI's TestClient: routes and OpenAPI, the host's auth dependency,
projects, runs of this process and from run records, clear 4xx answers, one real tiny run end to end."""
import base64
import json
import os
import secrets
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")   # TestClient's transport

from fastapi import Depends, FastAPI, HTTPException  # noqa: E402
from fastapi.security import HTTPBasic, HTTPBasicCredentials  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_lora_train.api import mount  # noqa: E402
from lib_lora_train.demo.toy import make_toy_dataset  # noqa: E402
from lib_lora_train.errors import DataError, Interrupted  # noqa: E402
from lib_lora_train.events import EPOCH, SAVED, START, STEP, Event  # noqa: E402
from lib_lora_train.hosts.base import BasicHost, HostPaths  # noqa: E402
from lib_lora_train.jobs import JobManager  # noqa: E402
from lib_lora_train.models import write_tiny_checkpoint  # noqa: E402
from lib_lora_train.prep.preprocess import PreprocessOptions  # noqa: E402
from lib_lora_train.prep.project import create_project, import_images  # noqa: E402

V1 = "/lora-train/v1"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"user:secret").decode()}
BASE = {"resolution": "64", "network_dim": 2, "network_alpha": 1, "max_train_epochs": 1, "train_batch_size": 1,
        "learning_rate": 1e-3, "seed": 1, "device": "cpu"}
_basic = HTTPBasic()


def require_login(credentials: HTTPBasicCredentials = Depends(_basic)):
    """Like the WebUI's --api-auth check: HTTP basic credentials or 401."""
    if not (secrets.compare_digest(credentials.username, "user")
            and secrets.compare_digest(credentials.password, "secret")):
        raise HTTPException(401, "wrong credentials", headers={"WWW-Authenticate": "Basic"})


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    ckpt = root / "models" / "tiny.safetensors"
    ckpt.parent.mkdir()
    write_tiny_checkpoint(str(ckpt), seed=0)
    src = make_toy_dataset(root / "toy", n_images=4)
    proj = create_project(str(root / "projects" / "star"), "star", trigger="zkz", purpose="character")
    import_images(proj, str(src), recursive=True, repeats=1, options=PreprocessOptions(workers=1))
    return root


class Env:
    def __init__(self, template, tmp_path, runner=None):
        if not (tmp_path / "projects").exists():
            shutil.copytree(template / "projects", tmp_path / "projects")
        self.paths = HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"), [str(template / "models")])
        self.host = BasicHost(self.paths, default_checkpoint=str(template / "models" / "tiny.safetensors"),
                              config=BASE)
        self.jobs = JobManager(self.host, runner=runner)
        self.app = FastAPI()
        mount(self.app, self.jobs, dependencies=[Depends(require_login)])
        self.client = TestClient(self.app)

    def get(self, path, **kw):
        return self.client.get(V1 + path, headers=AUTH, **kw)

    def post(self, path, **kw):
        return self.client.post(V1 + path, headers=AUTH, **kw)

    def poll(self, run_id, until=("done", "failed", "interrupted"), timeout=120):
        end = time.time() + timeout
        while True:
            r = self.get(f"/runs/{run_id}")
            assert r.status_code == 200, r.text
            if r.json()["status"] in until or time.time() > end:
                return r.json()
            time.sleep(0.05)


class GatedRunner:
    """A fake training run: waits for its gate (or a stop), then reports steps, an epoch and a saved file."""

    def __init__(self):
        self.gates: dict = {}
        self.fail: dict = {}

    def __call__(self, cfg, *, model=None, sink=None, stop=None):
        sink(Event(START, {"total_steps": 2, "epochs": 1, "run_id": "run-" + cfg.output_name}))
        gate = self.gates.setdefault(cfg.output_name, threading.Event())
        while not gate.wait(0.01):
            if stop.is_set():
                sink(Event("interrupted", {"step": 1, "epoch": 1, "state": os.path.join(cfg.output_dir, "st")}))
                raise Interrupted("stopped at step 1")
        if cfg.output_name in self.fail:
            raise self.fail[cfg.output_name]
        for s in (1, 2):
            sink(Event(STEP, {"step": s, "total_steps": 2, "epoch": 1, "loss": 0.25 * s, "avg_loss": 0.3}))
        sink(Event(EPOCH, {"epoch": 1, "epochs": 1, "avg_loss": 0.3, "step": 2, "validation_loss": 0.2}))
        path = os.path.join(cfg.output_dir, cfg.output_name + ".safetensors")
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"fake")
        sink(Event(SAVED, {"path": path, "epoch": 1, "step": 2, "kind": "final"}))


def test_openapi_documents_the_routes(template, tmp_path):
    env = Env(template, tmp_path)
    spec = env.client.get("/openapi.json").json()
    paths = spec["paths"]
    project = f"{V1}/projects/{{project}}"
    assert {p for p in paths if p.startswith(V1)} == {
        f"{V1}/projects", f"{V1}/runs", f"{V1}/runs/{{run_id}}", f"{V1}/runs/{{run_id}}/stop", f"{V1}/import",
        f"{V1}/runs/{{run_id}}/resume", f"{V1}/runs/{{run_id}}/outputs", f"{V1}/runs/{{run_id}}/files",
        f"{project}/images", f"{project}/import",
        f"{project}/check", f"{project}/preprocess", f"{project}/autotag", f"{project}/captions",
        f"{project}/caption", f"{project}/tags", f"{project}/reg-images"}
    for path, ops in paths.items():
        for op in ops.values():
            assert op.get("summary") and op.get("description"), (path, "documented on /docs")
    assert set(paths[f"{V1}/runs"]) == {"get", "post"} and set(paths[f"{V1}/runs/{{run_id}}/stop"]) == {"post"}
    assert "409" in paths[f"{V1}/runs/{{run_id}}/stop"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    run = schemas["RunInfo"]["properties"]
    for key in ("status", "step", "total_steps", "epoch", "loss", "outputs", "error", "epoch_losses",
                "validation_loss"):
        assert run[key].get("description"), key
    assert "sd-scripts" in schemas["RunRequest"]["properties"]["config"]["description"]
    assert env.client.get("/docs").status_code == 200


def test_every_route_is_behind_the_host_dependency(template, tmp_path):
    env = Env(template, tmp_path)
    calls = [("get", "/projects", {}), ("get", "/runs", {}), ("post", "/runs", {"json": {"project": "star"}}),
             ("get", "/runs/x", {}), ("post", "/runs/x/stop", {})]
    for method, path, kw in calls:
        r = getattr(env.client, method)(V1 + path, **kw)
        assert r.status_code == 401, (path, r.status_code)
        wrong = {"Authorization": "Basic " + base64.b64encode(b"user:nope").decode()}
        assert getattr(env.client, method)(V1 + path, headers=wrong, **kw).status_code == 401
    assert env.jobs.list() == []                                      # the refused POST queued nothing
    assert env.get("/projects").status_code == 200


def test_projects_are_listed(template, tmp_path):
    env = Env(template, tmp_path)
    os.makedirs(os.path.join(env.paths.projects, "not-a-project"))
    broken = os.path.join(env.paths.projects, "broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "project.json"), "w") as fh:
        fh.write("{ nope")
    r = env.get("/projects")
    assert r.status_code == 200
    (star,) = r.json()
    assert (star["name"], star["trigger"], star["purpose"], star["images"]) == ("star", "zkz", "character", 4)
    assert star["folders"] == [{"folder": "1_star", "repeats": 1, "images": 4, "regularization": False}]
    assert star["path"] == os.path.join(env.paths.projects, "star")


def test_bad_requests_get_clear_4xx(template, tmp_path):
    env = Env(template, tmp_path, runner=GatedRunner())
    cases = [
        ({"project": "ghost", "config": {}}, 404, "'ghost' does not exist"),
        ({"project": "../star", "config": {}}, 400, "contains '/'"),
        ({"project": "star", "config": {"netwrok_dim": 4}}, 400, "did you mean 'network_dim'"),
        ({"project": "star", "config": {"network_dim": "many"}}, 400, "network_dim: expected int"),
        ({"project": "star", "config": {"train_data_dir": "/tmp"}}, 400, "set from the project"),
        ({"project": "star", "config": {"pretrained_model_name_or_path": "/etc/hostname"}}, 400,
         "outside the folders"),
        ({"project": "star", "config": {"network_weights": os.path.join(env.paths.loras, "..", "..", "x")}}, 400,
         "outside the folders"),
        ({"project": "star", "config": {"output_name": "../../evil"}}, 400, "output_name"),
    ]
    for body, code, message in cases:
        r = env.post("/runs", json=body)
        assert r.status_code == code, (body, r.status_code, r.text)
        assert message in r.json()["detail"], (body, r.json())
    assert env.post("/runs", json={"config": {}}).status_code == 422                     # no project
    assert env.post("/runs", json={"project": "star", "config": [1]}).status_code == 422  # not an object
    assert env.jobs.list() == []
    os.makedirs(os.path.join(env.paths.loras, "star"))
    open(os.path.join(env.paths.loras, "star", "mine.safetensors"), "wb").close()
    r = env.post("/runs", json={"project": "star", "config": {"output_name": "mine"}})
    assert r.status_code == 409 and "mine" in r.json()["detail"]
    assert env.get("/runs/nope").status_code == 404 and "nope" in env.get("/runs/nope").json()["detail"]
    assert env.post("/runs/nope/stop").status_code == 404
    assert env.get("/runs", params={"project": "ghost"}).status_code == 404
    assert env.get("/runs", params={"project": "../x"}).status_code == 400


def test_runs_queue_stop_and_fail_through_the_api(template, tmp_path):
    runner = GatedRunner()
    env = Env(template, tmp_path, runner=runner)
    ids = [env.post("/runs", json={"project": "star", "config": {"network_dim": 4}}).json()["id"] for _ in range(3)]
    names = [env.jobs.get(i).output_name for i in ids]
    assert names == ["star", "star_v2", "star_v3"]
    assert env.poll(ids[0], until=("running",))["status"] == "running"
    listed = env.get("/runs", params={"project": "star"}).json()
    assert {r["id"]: r["status"] for r in listed} == {ids[0]: "running", ids[1]: "queued", ids[2]: "queued"}
    assert all(r["source"] == "job" and r["config"]["network_dim"] == 4 for r in listed)
    # stop a queued run: it never starts
    r = env.post(f"/runs/{ids[1]}/stop")
    assert r.status_code == 200 and r.json()["status"] == "interrupted"
    assert env.post(f"/runs/{ids[1]}/stop").status_code == 409
    # the running one fails with a clear message; the next one still runs
    runner.fail["star"] = DataError("folder 1_star has no captions")
    runner.gates.setdefault("star", threading.Event()).set()
    failed = env.poll(ids[0])
    assert failed["status"] == "failed" and failed["error"] == "folder 1_star has no captions"
    assert env.post(f"/runs/{ids[0]}/stop").status_code == 409
    env.poll(ids[2], until=("running",))
    end = time.time() + 60
    while env.jobs.get(ids[2]).run_id is None and time.time() < end:     # the runner's start event
        time.sleep(0.01)
    assert env.get(f"/runs/{ids[2]}").json()["run_id"] == "run-star_v3"
    assert env.get("/runs/run-star_v3").json()["id"] == ids[2]          # addressed by its run_id too
    runner.gates.setdefault("star_v3", threading.Event()).set()
    done = env.poll(ids[2])
    assert done["status"] == "done" and done["step"] == done["total_steps"] == 2 and done["loss"] == 0.5
    assert done["epoch_losses"] == [{"epoch": 1, "loss": 0.3}]
    assert done["validation_loss"] == [{"epoch": 1, "loss": 0.2}]
    assert [(o["name"], o["path"]) for o in done["outputs"]] == [
        ("star_v3", os.path.join(env.paths.loras, "star", "star_v3.safetensors"))]
    assert done["outputs"][0]["sidecar"].endswith("star_v3.json")
    curve = env.get(f"/runs/{ids[2]}", params={"curve": True, "log": True}).json()
    assert curve["losses"] == [{"step": 1, "loss": 0.25}, {"step": 2, "loss": 0.5}]
    assert any("queued as star_v3" in line for line in curve["log"])


def test_stop_a_running_run(template, tmp_path):
    env = Env(template, tmp_path, runner=GatedRunner())
    run_id = env.post("/runs", json={"project": "star"}).json()["id"]
    env.poll(run_id, until=("running",))
    r = env.post(f"/runs/{run_id}/stop")
    assert r.status_code == 200 and r.json()["status"] in ("running", "interrupted")
    stopped = env.poll(run_id)
    assert stopped["status"] == "interrupted" and stopped["state_dir"].endswith("st")


def test_a_diverged_loss_is_reported_as_null(template, tmp_path):
    def runner(cfg, *, model=None, sink=None, stop=None):
        sink(Event(START, {"total_steps": 1, "epochs": 1}))
        sink(Event(STEP, {"step": 1, "total_steps": 1, "epoch": 1, "loss": float("nan"), "avg_loss": float("inf")}))
        sink(Event(EPOCH, {"epoch": 1, "epochs": 1, "avg_loss": float("nan"), "step": 1}))
    env = Env(template, tmp_path, runner=runner)
    run = env.poll(env.post("/runs", json={"project": "star"}).json()["id"])
    assert run["status"] == "done" and run["loss"] is None and run["avg_loss"] is None
    assert run["epoch_losses"] == [{"epoch": 1, "loss": None}]
    assert env.get(f"/runs/{run['id']}", params={"curve": True}).json()["losses"] == [{"step": 1, "loss": None}]


def test_past_runs_come_from_run_records(template, tmp_path):
    env = Env(template, tmp_path)
    folder = os.path.join(env.paths.loras, "oldproject")     # the project itself is gone: its runs remain
    os.makedirs(folder)
    record = {"run_id": "abc123", "output_name": "old", "output_dir": folder, "created": 100.0, "started": 101.0,
              "finished": 160.0, "status": "interrupted", "step": 30, "epoch": 3, "last_loss": 0.11,
              "steps": {"total_steps": 40, "epochs": 4}, "resume_state": os.path.join(folder, "old-state"),
              "epochs": [{"epoch": 1, "avg_loss": 0.2, "step": 10, "validation_loss": 0.25},
                         {"epoch": 2, "avg_loss": 0.15, "step": 20}],
              "outputs": [{"path": os.path.join(folder, "old-000002.safetensors"), "epoch": 2, "step": 20,
                           "kind": "epoch", "sshs_model_hash": "ff"}],
              "config": {"network_dim": 16}}
    with open(os.path.join(folder, "old.run.json"), "w") as fh:
        json.dump(record, fh)
    with open(os.path.join(folder, "old.events.jsonl"), "w") as fh:
        for s in (1, 2):
            fh.write(json.dumps({"kind": "step", "step": s, "loss": 0.1 * s}) + "\n")
    (run,) = env.get("/runs").json()
    assert (run["id"], run["source"], run["project"], run["status"]) == ("abc123", "record", "oldproject",
                                                                        "interrupted")
    assert (run["step"], run["total_steps"], run["epoch"], run["epochs"], run["loss"]) == (30, 40, 3, 4, 0.11)
    assert run["epoch_losses"] == [{"epoch": 1, "loss": 0.2}, {"epoch": 2, "loss": 0.15}]
    assert run["validation_loss"] == [{"epoch": 1, "loss": 0.25}]
    assert run["outputs"][0]["name"] == "old-000002" and run["state_dir"].endswith("old-state")
    one = env.get("/runs/abc123", params={"curve": True}).json()
    assert one["config"] == {"network_dim": 16} and [p["step"] for p in one["losses"]] == [1, 2]
    assert env.get("/runs", params={"project": "oldproject"}).json()[0]["id"] == "abc123"
    r = env.post("/runs/abc123/stop")
    assert r.status_code == 409 and "past run" in r.json()["detail"]
    # a record that keeps its validation points only in its `validation` list
    record.update(run_id="def456", output_name="new", created=200.0, epochs=[{"epoch": 1, "avg_loss": 0.2}],
                  validation=[{"epoch": 0, "step": 0, "loss": 0.5, "kind": "start"},
                              {"epoch": 1, "step": 10, "loss": 0.4, "kind": "epoch"}])
    with open(os.path.join(folder, "new.run.json"), "w") as fh:
        json.dump(record, fh)
    with open(os.path.join(folder, "odd.run.json"), "w") as fh:                       # damaged records: skipped
        json.dump({"run_id": "odd", "created": 300.0, "steps": "many", "outputs": [3]}, fh)
    with open(os.path.join(folder, "cut.run.json"), "w") as fh:
        fh.write('{"run_id": "cut", ')
    assert [x["id"] for x in env.get("/runs").json()] == ["def456", "abc123"]       # newest first
    assert env.get("/runs/odd").status_code == 404
    assert env.get("/runs/def456").json()["validation_loss"] == [{"epoch": 1, "loss": 0.4}]


def test_real_run_end_to_end(template, tmp_path):
    """POST a real tiny run, poll it to the end, find its LoRA and card sidecar; after a 'restart' (a new manager
    on the same folders) the same run is listed from its run record."""
    env = Env(template, tmp_path)
    r = env.post("/runs", json={"project": "star", "config": {"max_train_epochs": 1, "network_dim": 2}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_name"] == "star" and body["output_dir"] == os.path.join(env.paths.loras, "star")
    run = env.poll(body["id"])
    assert run["status"] == "done", run["error"]
    assert run["step"] == run["total_steps"] == 4 and run["epoch"] == 1 and isinstance(run["loss"], float)
    assert [e["epoch"] for e in run["epoch_losses"]] == [1] and run["error"] is None
    (out,) = run["outputs"]
    assert out["name"] == "star" and os.path.isfile(out["path"]) and out["kind"] == "final"
    assert out["path"] == os.path.join(env.paths.loras, "star", "star.safetensors")
    side = json.loads(open(out["sidecar"], encoding="utf-8").read())
    assert side["activation text"] == "zkz" and side["sd version"] == "SD1"
    listed = env.get("/runs").json()
    assert [x["id"] for x in listed] == [body["id"]]                    # the job, not also its record
    assert env.get(f"/runs/{run['run_id']}").json()["id"] == body["id"]

    later = Env(template, tmp_path)                                     # a new server process on the same folders
    (past,) = later.get("/runs").json()
    assert past["id"] == run["run_id"] and past["source"] == "record" and past["status"] == "done"
    assert past["step"] == 4 and [o["path"] for o in past["outputs"]] == [out["path"]]
    assert past["epoch_losses"] == run["epoch_losses"]
    assert later.post(f"/runs/{past['id']}/stop").status_code == 409
