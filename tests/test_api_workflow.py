"""The HTTP API as a script would use it: from an empty folder of images to a LoRA the host lists, without the
tab; every route behind the host's auth; a corpus of hostile names refused; wrong types, unknown keys, oversized
bodies, unknown ids, concurrent submits and deletes during a run answered without a 500."""
import io
import json
import os
import socket
import threading
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from lib_lora_train.api_workflow import MAX_JSON_BYTES  # noqa: E402
from lib_lora_train.prep.wd14_tiny import write_tiny_wd14  # noqa: E402
from test_api import AUTH, V1, Env, GatedRunner, template  # noqa: E402,F401

HOSTILE = [
    "..", ".", "../star", "..\\star", "/etc", "/tmp/x", "C:\\Windows", "C:", "star/..", "a/b", "a\\b",
    "st\0ar", "\0", "x" * 201, "é" * 101, "CON", "con", "nul.txt", "COM1", "LPT9.png", "AUX", "prn.safetensors",
    " star", "star ", "star\t", "star\n", "\tstar", "star\u200b", "\u202estar", "st\u00adar", "star\u3000",
    "\u00a0star", "ｓｔａｒ／..", "\uff0e\uff0e", "a\uff0fb", "a\u2215b", "x\u2044y", "star.", "star. ",
    ".hidden", "e\u0301toile", "*", "a?b", "a<b", "a|b", 'a"b', "a:b", "",
]


def png_bytes(color=(200, 30, 30), size=(64, 64)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


BOUNDARY = "lora-train-test-boundary"


def raw_multipart(filename: str, data: bytes) -> bytes:
    """A multipart body with the file name's bytes exactly as given (httpx would percent-encode control bytes)."""
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{quoted}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode("utf-8", "surrogatepass") + data + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


def test_every_route_is_behind_auth(template, tmp_path):
    env = Env(template, tmp_path)
    routes = {p: ops for p, ops in env.client.get("/openapi.json").json()["paths"].items() if p.startswith(V1)}
    assert sum(len(ops) for ops in routes.values()) >= 16
    for route, ops in routes.items():
        path = route.replace("{run_id}", "x").replace("{project}", "star")
        for method in ops:
            r = env.client.request(method.upper(), path, json={})
            assert r.status_code == 401, (method, route, r.status_code)
    assert env.jobs.list() == [] and sorted(os.listdir(env.paths.projects)) == ["star"]


def test_hostile_names_are_refused_everywhere(template, tmp_path):
    env = Env(template, tmp_path)
    before = sorted(os.listdir(tmp_path))
    results = {}
    for name in HOSTILE:
        codes = [env.post("/projects", json={"name": name}).status_code,
                 env.post("/runs", json={"project": name, "config": {}}).status_code,
                 env.post(f"/projects/{quote(name, safe='')}/images", params={"filename": "a.png"},
                          content=png_bytes()).status_code,
                 env.get(f"/projects/{quote(name, safe='')}/captions").status_code,
                 env.post("/projects/star/images", params={"filename": name}, content=png_bytes()).status_code,
                 env.client.post(V1 + "/projects/star/images", content=raw_multipart(name, png_bytes()),
                          headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}).status_code]
        results[name] = codes
    # "STAR" / "Ｓtar" are refused as look-alikes of "star"; the others as not plain; never a 5xx or a 2xx
    bad = {n: c for n, c in results.items() if any(code >= 500 or code < 400 for code in c)}
    assert not bad, bad
    assert sorted(os.listdir(env.paths.projects)) == ["star"] and sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists(os.path.join(env.paths.projects, "star", ".uploads")) or \
        not os.listdir(os.path.join(env.paths.projects, "star", ".uploads"))
    for twin in ("STAR", "Ｓtar", "ＳＴＡＲ"):         # look-alikes of the existing project "star"
        r = env.post("/projects", json={"name": twin})
        assert r.status_code == 400 and "only by case or look-alike" in r.json()["detail"]
    r = env.post("/runs", json={"project": " star", "config": {}})
    assert r.status_code == 400 and "space" in r.json()["detail"]
    print(f"hostile-name corpus: {len(HOSTILE)} names x 6 routes, all refused with 4xx")


def test_wrong_types_unknown_keys_and_oversized_bodies(template, tmp_path):
    env = Env(template, tmp_path)
    r = env.post("/projects", json={"name": "ok", "colour": "red"})
    assert r.status_code == 422 and "colour" in json.dumps(r.json())
    r = env.post("/runs", json={"project": "star", "config": {}, "priority": 1})
    assert r.status_code == 422 and "priority" in json.dumps(r.json())
    r = env.post("/projects", json={"name": ["a"]})
    assert r.status_code == 422 and "name" in json.dumps(r.json())
    r = env.post("/projects/star/import", json={"path": 3, "repeats": "many"})
    assert r.status_code == 422 and "repeats" in json.dumps(r.json())
    r = env.post("/runs", json={"project": "star", "config": {"network_dim": "many"}})
    assert r.status_code == 400 and "network_dim" in r.json()["detail"]
    r = env.client.post(V1 + "/projects", content=b"{" + b" " * (MAX_JSON_BYTES + 1) + b"}",
                        headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = env.client.post(V1 + "/projects/star/images", content=b"not an upload",
                        headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    for path in ("/runs/nope", "/runs/nope/outputs"):
        assert env.get(path).status_code == 404
    assert env.client.delete(V1 + "/runs/nope/files", headers=AUTH).status_code == 404
    assert env.get("/projects/ghost/captions").status_code == 404


def test_a_run_that_cannot_start_is_refused_at_submit(template, tmp_path):
    env = Env(template, tmp_path, runner=GatedRunner())
    cases = [({"network_args": ["conv_dim=oops"]}, "conv_dim"),
             ({"network_module": "lycoris.kohya", "network_args": ["algo=nope"]}, "algo"),
             ({"network_weights": os.path.join(env.paths.loras, "missing.safetensors")}, "no file"),
             ({"resume": os.path.join(env.paths.loras, "star", "demo-state")}, "resume"),
             ({"max_train_epochs": -1}, "max_train_epochs")]
    for config, word in cases:
        r = env.post("/runs", json={"project": "star", "config": config})
        assert r.status_code == 400 and word in r.json()["detail"], (config, r.text)
    assert env.jobs.list() == []


def test_concurrent_submits_stop_and_delete_during_a_run(template, tmp_path):
    runner = GatedRunner()
    env = Env(template, tmp_path, runner=runner)
    codes, ids = [], []

    def submit():
        r = env.post("/runs", json={"project": "star", "config": {}})
        codes.append(r.status_code)
        ids.append(r.json().get("id"))
    threads = [threading.Thread(target=submit) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert codes == [200] * 6
    names = [env.jobs.get(i).output_name for i in ids]
    assert len(set(names)) == 6                                           # every run its own files
    r = env.client.delete(V1 + f"/runs/{ids[0]}/files", headers=AUTH)
    assert r.status_code == 409 and "stop it first" in r.json()["detail"]
    for i in ids:
        assert env.post(f"/runs/{i}/stop").status_code in (200, 409)
    for name in names:
        runner.gates.setdefault(name, threading.Event()).set()
    for i in ids:
        assert env.poll(i)["status"] in ("interrupted", "done", "failed")
    assert env.post(f"/runs/{ids[0]}/stop").status_code == 409


def test_a_killed_run_reads_as_interrupted_with_its_state(template, tmp_path):
    env = Env(template, tmp_path)
    out = os.path.join(env.paths.loras, "star")
    state = os.path.join(out, "star-000001-state")
    os.makedirs(state)
    with open(os.path.join(state, "train_state.json"), "w") as fh:
        json.dump({"format": "lib_lora_train.train_state", "format_version": 1, "epoch": 1, "global_step": 4,
                   "files": {}}, fh)
    rec = {"run_id": "dead1", "output_name": "star", "output_dir": out, "status": "running", "step": 6,
           "created": 1.0, "process": {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "start": 1}}
    with open(os.path.join(out, "star.run.json"), "w") as fh:
        json.dump(rec, fh)
    run = env.get("/runs/dead1").json()
    assert run["status"] == "interrupted" and run["state_dir"] == state and "killed or crashed" in run["error"]


def test_from_an_empty_folder_of_images_to_a_lora_the_host_lists(template, tmp_path):
    """The README's API walk-through: every step through HTTP, the same engine functions as the tab."""
    env = Env(template, tmp_path)
    incoming = os.path.join(template, "models", "incoming")      # a folder inside the host's folders
    os.makedirs(incoming, exist_ok=True)
    for i, colour in enumerate([(250, 0, 250), (0, 200, 0)]):
        Image.new("RGB", (80, 64), colour).save(os.path.join(incoming, f"in{i}.png"))
    model, csv = os.path.join(template, "models", "wd14.onnx"), os.path.join(template, "models", "tags.csv")
    write_tiny_wd14(model, csv)

    r = env.post("/projects", json={"name": "mychar", "trigger": "zkz", "purpose": "character"})
    assert r.status_code == 201, r.text
    files = [("files", (f"up{i}.png", png_bytes(c), "image/png")) for i, c in enumerate([(255, 0, 0), (0, 0, 255)])]
    files.append(("files", ("up0.txt", b"red square", "text/plain")))
    r = env.post("/projects/mychar/images", files=files, params={"repeats": 2})
    assert r.status_code == 200 and r.json()["written"] == 2 and r.json()["folder"] == "2_mychar", r.text
    assert r.json()["skipped"] == 0 and r.json()["problems"] == [], r.text      # the caption is no "bad image"
    r = env.post("/projects/mychar/import", json={"path": incoming})
    assert r.status_code == 200 and r.json()["written"] == 2, r.text
    r = env.post("/projects/mychar/import", json={"path": "/etc"})
    assert r.status_code == 400 and "outside the folders" in r.json()["detail"]
    assert env.post("/projects/mychar/check").status_code == 200
    r = env.post("/projects/mychar/preprocess", json={"resolution": 64, "mode": "center"})
    assert r.status_code == 200 and r.json()["folders"][0]["written"] == 4, r.text
    r = env.post("/projects/mychar/autotag", json={"tagger": "wd14", "model": model, "tags_csv": csv,
                                                   "existing": "keep"})
    assert r.status_code == 200 and r.json()["written"] == 3, r.text             # up0 kept its caption
    assert env.post("/projects/mychar/tags", json={"op": "trigger", "tags": ["zkz"]}).status_code == 200
    caps = env.get("/projects/mychar/captions").json()
    assert len(caps) == 4 and all(c["tags"][0] == "zkz" for c in caps)
    r = env.post("/projects/mychar/tags", json={"op": "remove", "tags": ["red square"]})
    assert r.status_code == 200 and len(r.json()["changed"]) == 1
    assert "red square" not in env.get("/projects/mychar/caption", params={"image": "2_mychar/up0.png"}).text
    assert env.post("/projects/mychar/tags", json={"op": "undo"}).json()["restored"] == 1
    assert "red square" in env.get("/projects/mychar/caption", params={"image": "2_mychar/up0.png"}).json()["tags"]
    r = env.post("/projects/mychar/tags", json={"op": "replace", "old": "red square", "new": "red"})
    assert r.status_code == 200 and len(r.json()["changed"]) == 1
    assert env.get("/projects/mychar/caption", params={"image": "../star/x.png"}).status_code == 400

    r = env.post("/runs", json={"project": "mychar", "config": {"max_train_epochs": 1}})
    assert r.status_code == 200, r.text
    run = env.poll(r.json()["id"])
    assert run["status"] == "done", run.get("error")
    outputs = env.get(f"/runs/{run['id']}/outputs").json()
    assert [o["name"] for o in outputs] == ["mychar"] and os.path.isfile(outputs[0]["path"])
    listed = [o["name"] for x in env.get("/runs", params={"project": "mychar"}).json() for o in x["outputs"]]
    assert listed == ["mychar"]
    deleted = env.client.delete(V1 + f"/runs/{run['id']}/files", headers=AUTH)
    assert deleted.status_code == 200 and outputs[0]["path"] in deleted.json()
    assert not os.path.exists(outputs[0]["path"])
