"""POST /lora-train/v1/import: another trainer's settings -> {config, report}, behind the host's auth."""
import base64
import json

import pytest

pytest.importorskip("httpx")   # TestClient's transport

from fastapi import Depends, FastAPI, HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lib_lora_train.api import mount  # noqa: E402
from lib_lora_train.hosts.base import BasicHost, HostPaths  # noqa: E402
from lib_lora_train.jobs import JobManager  # noqa: E402

V1 = "/lora-train/v1"


def deny_without_token(token: str = ""):
    if token != "ok":
        raise HTTPException(401, "no")


@pytest.fixture()
def client(tmp_path):
    host = BasicHost(HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras")))
    app = FastAPI()
    mount(app, JobManager(host), dependencies=[Depends(deny_without_token)])
    return TestClient(app)


KOHYA = {"LoRA_type": "LyCORIS/LoHa", "network_dim": "16", "network_alpha": "8", "conv_dim": 4, "conv_alpha": 1,
         "max_resolution": "512,512", "optimizer": "AdamW", "learning_rate": "0.0001", "epoch": 3, "seed": "5",
         "xformers": "sdpa", "sample_prompts": "zkz"}


def test_import_returns_config_and_report(client):
    r = client.post(f"{V1}/import?token=ok", json={"filename": "preset.json", "content": json.dumps(KOHYA)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["config"]["network_module"] == "lycoris.kohya" and body["config"]["max_train_epochs"] == 3
    rep = body["report"]
    assert rep["can_start"] and rep["format"] == "kohya_ss GUI JSON" and rep["family"] == "sd1"
    assert {e["field"] for e in rep["entries"]} >= set(KOHYA)
    assert body["files"]["sample_prompts.txt"] == "zkz\n"
    b64 = base64.b64encode(json.dumps(KOHYA).encode()).decode()
    r2 = client.post(f"{V1}/import?token=ok", json={"filename": "preset.json", "content_base64": b64})
    assert r2.json()["config"] == body["config"]


def test_bad_input_is_a_report_not_a_crash(client):
    r = client.post(f"{V1}/import?token=ok", json={"filename": "x.json", "content": json.dumps(KOHYA)[:40]})
    assert r.status_code == 200 and not r.json()["report"]["can_start"]
    assert "ends early" in r.json()["report"]["reasons"][0]
    assert client.post(f"{V1}/import?token=ok", json={"filename": "x.json"}).status_code == 400
    assert client.post(f"{V1}/import", json={"filename": "x.json", "content": "{}"}).status_code == 401
    spec = client.get("/openapi.json").json()
    assert "post" in spec["paths"][f"{V1}/import"]
