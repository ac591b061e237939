"""POST /projects/{project}/reg-images: drawn once with the host's model, found in the cache the second time, a
larger count adds the missing ones; a run started with the returned keys trains on them without drawing again;
hostile names, bad values and unknown keys refused; in the route list of /docs."""
import json
import os
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from test_api import Env, template  # noqa: E402,F401
from test_api_workflow import HOSTILE  # noqa: E402

BODY = {"prompt": "a red circle", "count": 2, "steps": 2}


def test_generate_reuse_grow_and_train_on_them(template, tmp_path):
    env = Env(template, tmp_path)
    r = env.post("/projects/star/reg-images", json=BODY)
    assert r.status_code == 200, r.text
    first = r.json()
    assert (first["generated"], first["reused"], first["backend"]) == (2, 0, "engine")
    project = os.path.join(env.paths.projects, "star")
    assert first["reg_data_dir"].startswith(os.path.join(project, "reg_cache") + os.sep)
    assert os.path.basename(first["folder"]) == "1_a red circle"
    assert Image.open(first["images"][0]).size == (64, 64)        # the host's run resolution
    assert first["config"]["reg_images_prompt"] == "a red circle" and first["config"]["reg_images_size"] == "64,64"
    again = env.post("/projects/star/reg-images", json=BODY).json()
    assert (again["generated"], again["reused"], again["key"]) == (0, 2, first["key"])
    grown = env.post("/projects/star/reg-images", json=dict(BODY, count=4)).json()
    assert (grown["generated"], grown["reused"], grown["reg_data_dir"]) == (2, 2, first["reg_data_dir"])
    # a run of the project with the returned keys uses the cached images (all four: one epoch's 4 samples)
    r = env.post("/runs", json={"project": "star", "config": dict(grown["config"], prior_loss_weight=0.5)})
    assert r.status_code == 200, r.text
    run = env.poll(r.json()["id"])
    assert run["status"] == "done", run
    out = os.path.join(env.paths.loras, "star")
    events = [json.loads(line) for name in os.listdir(out) if name.endswith(".events.jsonl")
              for line in open(os.path.join(out, name), encoding="utf-8")]
    messages = [e.get("message", "") for e in events if e["kind"] == "log"]
    assert any("4 from the cache, 0 drawn by the engine sampler" in m for m in messages), messages
    assert sorted(os.listdir(os.path.join(project, "reg_cache"))) == [first["key"]]


def test_hostile_and_bad_requests_are_refused(template, tmp_path):
    env = Env(template, tmp_path)
    before = sorted(os.listdir(tmp_path))
    for name in HOSTILE:
        code = env.post(f"/projects/{quote(name, safe='')}/reg-images", json=BODY).status_code
        assert 400 <= code < 500, (name, code)
    assert env.post("/projects/ghost/reg-images", json=BODY).status_code == 404
    for bad, word in (({"prompt": "a\nb"}, "control"), ({"prompt": "x" * 1001}, "1000"),
                      ({"sampler": "nope"}, "sampler"), ({"width": 100}, "divisible by 8")):
        r = env.post("/projects/star/reg-images", json=dict(BODY, **bad))
        assert r.status_code == 400 and word in r.json()["detail"], (bad, r.text)
    for bad in ({"count": 0}, {"count": 10001}, {"steps": 0}, {"cfg_scale": 0}, {"seed": -1}, {"width": 32},
                {"count": "many"}, {"folder": "../x"}, {"out": "/tmp"}):
        r = env.post("/projects/star/reg-images", json=dict(BODY, **bad))
        assert r.status_code == 422, (bad, r.status_code)
    assert env.post("/projects/star/reg-images", json={"count": 2}).status_code == 422
    # a run may not name where the cache is: it is the project's
    r = env.post("/runs", json={"project": "star", "config": {"reg_images_prompt": "x", "reg_images_dir": "/tmp"}})
    assert r.status_code == 400 and "reg_images_dir" in r.json()["detail"]
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists(os.path.join(env.paths.projects, "star", "reg_cache"))


def test_the_route_is_documented(template, tmp_path):
    env = Env(template, tmp_path)
    paths = env.client.get("/openapi.json").json()["paths"]
    op = paths["/lora-train/v1/projects/{project}/reg-images"]["post"]
    assert op["summary"] == "Generate regularisation images" and "prior preservation" in op["description"]
