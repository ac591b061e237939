"""POST /lora-train/v1/runs/{id}/compare: the engine's grid of a tiny run end to end, a host's own grid, 4xx."""
import base64
import io
import json
import os
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lib_lora_train.compare.ranking import rank_epochs  # noqa: E402
from lib_lora_train.compare_api import (CompareRequest, CompareResult, compare_runs, mount_compare,  # noqa: E402
                                        run_compare)
from lib_lora_train.config import config_from_dict  # noqa: E402
from lib_lora_train.errors import ConfigError  # noqa: E402
from lib_lora_train.hosts.base import BasicHost, HostPaths  # noqa: E402
from lib_lora_train.jobs import Job, JobManager  # noqa: E402
from lib_lora_train.models import write_tiny_checkpoint  # noqa: E402
from lib_lora_train.training.loop import train  # noqa: E402

V1 = "/lora-train/v1"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run: 2 epochs on 2 images at 64 px, written to <loras>/proj/ like a job's run."""
    root = tmp_path_factory.mktemp("cmpapi")
    ckpt = root / "tiny.safetensors"
    write_tiny_checkpoint(str(ckpt), seed=0)
    folder = root / "data" / "1_zkz"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zkz, tag{i}", encoding="utf-8")
    cfg = config_from_dict(dict(pretrained_model_name_or_path=str(ckpt), train_data_dir=str(root / "data"),
                                output_dir=str(root / "loras" / "proj"), output_name="cmp", resolution="64",
                                network_dim=2, network_alpha=2, learning_rate=1e-2, max_train_epochs=2,
                                save_every_n_epochs=1, train_batch_size=2, seed=2, device="cpu",
                                save_precision="float"))
    train(cfg)
    record = root / "loras" / "proj" / "cmp.run.json"
    return root, str(record), json.loads(record.read_text(encoding="utf-8"))["run_id"]


def client_for(host, jobs=None):
    app = FastAPI()
    jobs = jobs or JobManager(host)
    mount_compare(app, jobs, host)
    return TestClient(app), jobs


def basic_host(root):
    return BasicHost(HostPaths(str(root / "projects"), str(root / "loras")))


def test_engine_grid_over_http(tiny_run):
    root, record, run_id = tiny_run
    client, _ = client_for(basic_host(root))
    before = set(os.listdir(root / "loras" / "proj"))
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"weights": [0.5, 1.0], "steps": 2, "seed": 3,
                                                         "width": 64, "height": 64})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["id"] == run_id and d["method"] == "engine" and d["seed"] == 3 and not d["interrupted"]
    assert d["epochs"] == [1, 2] and d["weights"] == [0.5, 1.0]
    assert [s.split("\n")[0] for s in d["row_labels"]] == ["cmp-000001", "cmp"]
    assert d["col_labels"] == ["weight 0.5", "weight 1"]
    assert d["prompt"] == "zkz"                                 # the trigger word when no prompt is given
    image = Image.open(io.BytesIO(base64.b64decode(d["image"])))
    assert image.format == "PNG" and image.width > 2 * 64 and "Steps: 2" in image.text["parameters"]
    rows = d["validation"]["rows"]
    assert [r["epoch"] for r in rows if r["epoch"] > 0] == [1, 2]
    assert all(r["validation_loss"] is not None for r in rows if r["epoch"] > 0)
    assert sum(r["suggested"] for r in rows) == 1 and d["validation"]["explanation"]
    assert "<- suggested" in d["table"]
    new = set(os.listdir(root / "loras" / "proj")) - before
    assert d["saved"] and os.path.basename(d["saved"]) in new            # saved beside the run
    assert os.path.basename(d["saved"]).endswith(".png")
    # drift (asked for by default): the captions without the trigger drawn on two seeds, per epoch
    drift = d["drift"]
    assert drift["available"] and drift["prompts"] == ["tag0", "tag1"] and drift["seeds"] == [3, 4]
    assert [r["epoch"] for r in drift["rows"]] == [1, 2] and all(r["drift"] >= 0 for r in drift["rows"])
    assert drift["suggested_epoch"] in (1, 2) and drift["explanation"].startswith("Suggested: epoch")
    assert drift["spread"] > 0 and drift["metric"] and drift["weight"] == 1.0
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"weights": [1.0], "steps": 2, "seed": 3, "drift": False})
    assert r.status_code == 200 and r.json()["drift"] is None
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"weights": [1.0], "steps": 2, "seed": 3, "epochs": [2],
                                                         "control_prompts": ["a tree"]})
    assert r.json()["drift"]["prompts"] == ["a tree"] and [x["epoch"] for x in r.json()["drift"]["rows"]] == [2]
    fields = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"drift", "ratio", "within"} <= set(fields["DriftRowModel"]["properties"])


def test_unknown_run_bad_input_and_a_run_still_training(tiny_run):
    root, record, run_id = tiny_run
    host = basic_host(root)
    client, jobs = client_for(host)
    assert client.post(f"{V1}/runs/nope/compare", json={}).status_code == 404
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"epochs": [9]})
    assert r.status_code == 400 and "no file for epoch 9" in r.json()["detail"]
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"weights": [9]})
    assert r.status_code == 400 and "outside" in r.json()["detail"]
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"steps": 0})
    assert r.status_code == 400 and "steps" in r.json()["detail"]
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"width": 70})
    assert r.status_code == 400 and "multiple of 8" in r.json()["detail"]
    job = Job("j1", "proj", {}, "other", str(root / "loras" / "proj"), status="running")
    jobs._jobs[job.id] = job                          # a job of this server, still training
    assert client.post(f"{V1}/runs/j1/compare", json={}).status_code == 409


class HostWithGrid(BasicHost):
    """A host with its own grid (as the WebUI host, through its X/Y/Z script)."""

    def __init__(self, paths):
        super().__init__(paths)
        self.calls = []

    def compare_grid(self, request, *, stop=None, progress=None):
        self.calls.append((request, stop, progress))
        ranking = rank_epochs({1: 0.5, 2: 0.4}, files={1: "a-000001.safetensors", 2: "a.safetensors"})
        return CompareResult(image=Image.new("RGB", (20, 10)), row_labels=["a-000001 (epoch 1)", "a (epoch 2)"],
                             col_labels=["LoRA weight: 1.0"], epochs=[1, 2], files=["x", "y"], weights=[1.0],
                             prompt=request.prompt, seed=11, infotext="zkz\nSteps: 3", ranking=ranking,
                             method="lora_train", interrupted=True, saved="/grids")


def test_a_hosts_own_grid_is_used_and_answered(tiny_run):
    root, record, run_id = tiny_run
    host = HostWithGrid(HostPaths(str(root / "projects"), str(root / "loras")))
    client, _ = client_for(host)
    r = client.post(f"{V1}/runs/{run_id}/compare", json={"prompt": "zkz, smile", "negative_prompt": "bad",
                                                         "sampler_name": "Euler a", "seed": 5, "steps": 3})
    assert r.status_code == 200, r.text
    (req, _, _), = host.calls
    assert isinstance(req, CompareRequest) and req.record_path == record
    assert (req.prompt, req.negative_prompt, req.sampler_name, req.seed, req.steps, req.epochs, req.weights) == \
        ("zkz, smile", "bad", "Euler a", 5, 3, None, None)
    d = r.json()
    assert d["method"] == "lora_train" and d["interrupted"] and d["validation"]["suggested_epoch"] == 2
    assert d["row_labels"] == ["a-000001 (epoch 1)", "a (epoch 2)"]
    assert Image.open(io.BytesIO(base64.b64decode(d["image"]))).text["parameters"] == "zkz\nSteps: 3"
    assert d["drift"] is None                      # an interrupted grid: no drift drawn after it
    stop = threading.Event()
    run_compare(host, CompareRequest(record_path=record), stop=stop, progress=print)
    assert host.calls[-1][1] is stop and host.calls[-1][2] is print
    with pytest.raises(ConfigError, match="run record not found"):
        run_compare(host, CompareRequest(record_path=str(root / "gone.run.json")))


def test_runs_offered_newest_first_with_unique_labels(tiny_run, tmp_path):
    root, record, _ = tiny_run
    loras = tmp_path / "loras"
    for project, name, created in (("a", "one", 100), ("b", "two", 300), ("b", "three", 200)):
        (loras / project).mkdir(parents=True, exist_ok=True)
        (loras / project / f"{name}.run.json").write_text(json.dumps({"output_name": name, "created": created,
                                                                      "status": "done"}))
    (loras / "b" / "broken.run.json").write_text("{")
    host = BasicHost(HostPaths(str(tmp_path / "projects"), str(loras)))
    choices = compare_runs(host)
    assert [c.output_name for c in choices] == ["two", "three", "one"]
    assert choices[0].label.startswith("b / two · ") and choices[0].label.endswith("done")
    assert len({c.label for c in choices}) == 3
