"""The Compare section: what choosing a run fills in, the grid handler (host grid), Stop, Send to txt2img, elem_ids,
the Chinese strings."""
import json
import os
import threading
import time

import pytest
from PIL import Image

from lib_lora_train.compare.ranking import rank_epochs
from lib_lora_train.compare_api import CompareResult
from lib_lora_train.hosts.base import BasicHost, HostPaths
from lib_lora_train.jobs import JobManager
from lib_lora_train.ui import compare_section as cs

gr = pytest.importorskip("gradio")

from lib_lora_train.ui.i18n import components, visible_strings  # noqa: E402

ZH = os.path.join(os.path.dirname(cs.__file__), "compare_zh_CN.json")


def make_run(loras, project="proj", name="cmp", epochs=3, val=(0.3, 0.2, 0.25)):
    folder = loras / project
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for e in range(1, epochs + 1):
        stem = name if e == epochs else f"{name}-{e:06d}"
        (folder / f"{stem}.safetensors").write_bytes(b"x")
        outputs.append({"path": str(folder / f"{stem}.safetensors"), "epoch": e, "kind": "final" if e == epochs
                        else "epoch"})
    rec = {"run_id": "r1", "output_name": name, "created": 10, "status": "done", "outputs": outputs,
           "config": {"resolution": "512,768"}, "dataset": {"tag_frequency": {"1_zkz": {"zkz": 3, "smile": 1}}},
           "validation": [{"epoch": e, "loss": v, "at": "epoch"} for e, v in enumerate(val, 1)],
           "epochs": [{"epoch": e, "avg_loss": 0.1} for e in range(1, epochs + 1)]}
    (folder / f"{name}.run.json").write_text(json.dumps(rec), encoding="utf-8")
    return str(folder / f"{name}.run.json")


class GridHost(BasicHost):
    name = "webui"

    def __init__(self, paths, delay=0.0):
        super().__init__(paths)
        self.delay, self.requests, self.stops = delay, [], []

    def compare_grid(self, request, *, stop=None, progress=None):
        self.requests.append(request)
        end = time.time() + self.delay
        while time.time() < end and not (stop and stop.is_set()):
            if progress:
                progress(1, 4)
            time.sleep(0.02)
        self.stops.append(bool(stop and stop.is_set()))
        ranking = rank_epochs({1: 0.3, 2: 0.2}, files={1: "cmp-000001.safetensors", 2: "cmp-000002.safetensors"})
        return CompareResult(image=Image.new("RGB", (30, 20)), row_labels=["cmp-000001 (epoch 1)", "cmp-000002"],
                             col_labels=["LoRA weight: 0.5"], epochs=request.epochs, files=["a", "b"],
                             weights=request.weights, prompt=request.prompt, seed=9, infotext="", ranking=ranking,
                             method="lora_train", interrupted=bool(stop and stop.is_set()), saved="/out/grids")


def build(host):
    with gr.Blocks() as blocks:
        sec = cs.build_compare_section(host, JobManager(host))
    return blocks, sec


@pytest.fixture
def env(tmp_path):
    paths = HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"))
    record = make_run(tmp_path / "loras")
    return paths, record


def test_components_ids_and_defaults(env):
    paths, record = env
    blocks, sec = build(BasicHost(paths))
    ids = [getattr(b, "elem_id", None) for b in components(blocks)]
    ids = [i for i in ids if i]
    assert ids and all(i.startswith("lora_train_compare_") for i in ids)
    by_id = {b.elem_id: b for b in components(blocks) if getattr(b, "elem_id", None)}
    (label,) = sec.runs
    assert by_id["lora_train_compare_run"].value == label and sec.runs[label] == record
    assert by_id["lora_train_compare_epochs"].value == ["epoch 1: cmp-000001", "epoch 2: cmp-000002", "epoch 3: cmp"]
    assert by_id["lora_train_compare_weights"].value == "0.4, 0.6, 0.8, 1"
    assert by_id["lora_train_compare_prompt"].value == "zkz"                 # the trigger word
    assert (by_id["lora_train_compare_width"].value, by_id["lora_train_compare_height"].value) == (512, 768)
    assert by_id["lora_train_compare_sampler"].value == "DPM++ 2M Karras"
    assert by_id["lora_train_compare_send_file"].value == "cmp-000002"       # the suggested epoch
    assert by_id["lora_train_compare_send"].value == "Show the prompt text"  # no txt2img outside the WebUI


def test_every_visible_string_has_a_translation(env):
    paths, _ = env
    with open(ZH, encoding="utf-8") as fh:
        zh = json.load(fh)
    for host in (BasicHost(paths), GridHost(paths)):
        blocks, _ = build(host)
        missing = [(t, w) for t, w in visible_strings(blocks) if t not in zh]
        assert not missing
    assert zh["★ suggested"]


def test_run_view_ranks_and_explains(env):
    paths, record = env
    sec = cs.CompareSection(BasicHost(paths), None)
    (label,) = sec.run_labels()
    v = sec.run_view(label)
    assert v["table"][0][:5] == [2, 0.2, 0.1, "", 1] and v["table"][0][6] == "★ suggested"
    assert [r[0] for r in v["table"]] == [2, 3, 1]
    assert "overfitting" in v["explanation"]
    os.remove(os.path.join(os.path.dirname(record), "cmp-000001.safetensors"))
    v = sec.run_view(label)
    assert v["epochs"][0] == ["epoch 2: cmp-000002", "epoch 3: cmp"] and "cmp-000001" in v["explanation"]


def test_grid_handler_through_the_host(env):
    paths, record = env
    host = GridHost(paths)
    sec = cs.CompareSection(host, None)
    (label,) = sec.run_labels()
    values = [label, ["epoch 1: cmp-000001", "epoch 2: cmp-000002"], "0.5", "zkz, smile", "bad", 4, 3, 64, 64,
              "Euler a"]
    outs = list(sec.make_grid(*values))
    last = outs[-1]
    (req,) = host.requests
    assert (req.record_path, req.epochs, req.weights, req.prompt, req.negative_prompt, req.seed, req.steps,
            req.width, req.height, req.sampler_name) == (record, [1, 2], [0.5], "zkz, smile", "bad", 4, 3, 64, 64,
                                                         "Euler a")
    assert last["image"].size == (30, 20) and last["status"].startswith("Done: 2 epochs x 1 weights, seed 9")
    assert "Rows (epochs): cmp-000001 (epoch 1) | cmp-000002" in last["labels"]
    assert "Columns (weights): LoRA weight: 0.5" in last["labels"]
    assert any(r[6] == "★ suggested" for r in last["table"])
    assert req.drift is True and req.control_prompts is None
    # this host draws the grid as one picture and has no single-picture renderer: drift says so, honestly
    assert "Drift was not measured" in last["explanation"] and "single-picture renderer" in last["explanation"]
    assert all(r[3] == "" for r in last["table"])
    bad = list(sec.make_grid(label, [], "0.5", "", "", -1, 20, None, None, ""))
    assert bad[-1]["status"].startswith("Error: tick at least one")
    bad = list(sec.make_grid(label, ["epoch 1: cmp-000001"], "x", "", "", -1, 20, None, None, ""))
    assert "not a number" in bad[-1]["status"]


class RenderingHost(GridHost):
    """A host that can also draw single pictures: the base (weight 0) by seed, epoch 1 as the base, epoch 2
    changed (it drifted)."""

    def __init__(self, paths):
        super().__init__(paths)
        self.drawn = []

    def compare_renderer(self, request):
        def render(specs, ef, weight):
            self.drawn.append((ef.epoch, weight, [s.prompt for s in specs]))
            shift = 120 if (weight and ef.epoch == 2) else 0
            return [Image.new("RGB", (16, 16), (s.seed * 40 % 256, shift, 0)) for s in specs]
        return render


def test_drift_column_and_suggestion_with_a_host_renderer(env):
    paths, record = env
    host = RenderingHost(paths)
    sec = cs.CompareSection(host, None)
    (label,) = sec.run_labels()
    out = list(sec.make_grid(label, ["epoch 1: cmp-000001", "epoch 2: cmp-000002"], "1", "zkz", "", 4, 3, 64, 64,
                             "Euler a", "red circle"))[-1]
    assert host.drawn[0] == (1, 0.0, ["red circle", "red circle"])          # the base: two seeds
    assert [(e, w) for e, w, _ in host.drawn[1:]] == [(1, 1.0), (2, 1.0)]
    rows = {r[0]: r for r in out["table"]}
    assert rows[1][3] == "0.0000 ✓" and rows[2][3].endswith("✗")
    # epoch 2 has the lower validation loss but drifted: epoch 1 is suggested, and the text says why
    assert rows[1][6] == "★ suggested" and rows[2][6] == ""
    assert out["explanation"].startswith("Suggested: epoch 1") and "Epoch 2 has the lowest validation loss" in \
        out["explanation"]
    assert "Suggested by loss and drift: epoch 1" in out["status"]


def test_stop_ends_a_running_grid(env):
    paths, _ = env
    host = GridHost(paths, delay=600.0)     # runs until stopped (a loaded machine must not finish it first)
    sec = cs.CompareSection(host, None)
    (label,) = sec.run_labels()
    outs = []
    gen = sec.make_grid(label, ["epoch 1: cmp-000001"], "1", "", "", -1, 20, None, None, "", interval=0.05)
    t = threading.Thread(target=lambda: outs.extend(gen), daemon=True)
    t.start()
    deadline = time.time() + 120
    while not any("1/4 cells" in o.get("status", "") for o in outs) and time.time() < deadline:
        time.sleep(0.02)                                    # the handler reports the host's progress
    second = list(sec.make_grid(label, ["epoch 1: cmp-000001"], "1", "", "", -1, 20, None, None, ""))
    assert second[-1]["status"].startswith("A grid is already being made") and len(host.requests) == 1
    assert sec.stop().startswith("Stopping")
    t.join(120)
    assert host.stops == [True] and outs[-1]["status"].startswith("Stopped")
    assert any("1/4 cells" in o.get("status", "") for o in outs[:-1])
    assert sec.stop() == "Nothing is running."


def test_send_to_txt2img_text_and_js(env):
    paths, _ = env
    sec = cs.CompareSection(BasicHost(paths), None)
    (label,) = sec.run_labels()
    assert sec.send(label, "cmp-000002", 0.8) == "<lora:cmp-000002:0.8> zkz"
    assert cs.send_text("x", "1") == "<lora:x:1>"
    blocks, _ = build(GridHost(paths))                      # name "webui": the click hands the text to the JS
    deps = blocks.config["dependencies"]
    assert any("loraTrainCompareToTxt2img" in str(d.get("js") or "") for d in deps)
    blocks, _ = build(BasicHost(paths))
    assert not any("loraTrainCompareToTxt2img" in str(d.get("js") or "") for d in blocks.config["dependencies"])
    js = open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(cs.__file__))), "javascript",
                           "lora_train_compare.js"), encoding="utf-8").read()
    assert "function loraTrainCompareToTxt2img" in js and "#txt2img_prompt textarea" in js


def _events(blocks):
    """(elem_id of the trigger, fn, inputs, outputs) of every event the section wired (gradio 3.41 / 4.x)."""
    out = []
    deps = blocks.get_config_file()["dependencies"]
    fns = blocks.fns if isinstance(blocks.fns, list) else list(blocks.fns.values())   # 4.x: by id, in order
    for dep, fn in zip(deps, fns):
        targets = [t[0] if isinstance(t, (tuple, list)) else t for t in dep["targets"]]
        for t in targets:
            if t in blocks.blocks:          # 4.x lists page-load events with target None
                out.append((blocks.blocks[t].elem_id, fn.fn, dep["inputs"], dep["outputs"]))
    return out


def test_wired_events_give_one_value_per_output(env):
    paths, record = env
    host = GridHost(paths)
    blocks, sec = build(host)
    (label,) = sec.runs
    events = {}
    for elem, fn, ins, outs in _events(blocks):
        if fn is not None:
            events[elem] = (fn, ins, outs)
    fn, ins, outs = events["lora_train_compare_run"]
    values = fn(label)
    assert len(ins) == 1 and len(values) == len(outs)
    assert values[1] == "zkz" and values[5:7] == [512, 768]
    fn, ins, outs = events["lora_train_compare_make"]
    steps = list(fn(label, ["epoch 2: cmp-000002"], "0.5, 1", "zkz", "", 1, 2, 64, 64, "Euler a", "a tree\n\n",
                    False))
    assert len(ins) == 12 and all(len(s) == len(outs) for s in steps)
    assert host.requests[-1].control_prompts == ["a tree"] and host.requests[-1].drift is False
    assert steps[-1][1].size == (30, 20) and host.requests[-1].epochs == [2]
    fn, ins, outs = events["lora_train_compare_send"]
    assert fn(label, "cmp", 0.6) == "<lora:cmp:0.6> zkz"
    assert fn(label, None, 1).startswith("Error:")
    fn, ins, outs = events["lora_train_compare_refresh"]
    seen = [record]
    assert len(ins) == len(outs) == 2
    assert fn(label, seen)[0]["value"] == label and fn("gone", seen)[0]["value"] == label
    assert fn(label, seen)[1] == seen


def test_refresh_chooses_a_run_that_appeared_and_otherwise_keeps_the_choice(tmp_path):
    """The page opened on an older run; a run trained since then is chosen by Refresh (in the real Forge the
    dropdown kept the run the WebUI started with, which had no epoch files). The user's choice otherwise stays,
    even when its label changes with its status."""
    paths = HostPaths(str(tmp_path / "projects"), str(tmp_path / "loras"))
    old = make_run(tmp_path / "loras", name="old")
    sec = cs.CompareSection(BasicHost(paths), None)
    (old_label,) = sec.run_labels()
    seen = list(sec.runs.values())
    rec = json.loads(open(old, encoding="utf-8").read())
    rec.update(run_id="r2", output_name="new", created=20, status="running")
    new = str(tmp_path / "loras" / "proj" / "new.run.json")
    with open(new, "w", encoding="utf-8") as fh:
        json.dump(rec, fh)
    names, value, seen = sec.refresh(old_label, seen)
    assert value == names[0] and sec.runs[value] == new and len(names) == 2
    new_label = value
    names, value, seen = sec.refresh(old_label, seen)         # the user went back to the old run: it stays
    assert sec.runs[value] == old
    rec["status"] = "done"                                      # the new run's label changes when it ends
    with open(new, "w", encoding="utf-8") as fh:
        json.dump(rec, fh)
    names, value, seen = sec.refresh(new_label, seen)
    assert value != new_label and sec.runs[value] == new and value.endswith("done")
    names, value, _ = sec.refresh(None, seen)                   # nothing chosen, nothing new: the newest
    assert sec.runs[value] == new
