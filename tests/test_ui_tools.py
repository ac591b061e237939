"""The tab's Tools section: inputs from the host's folders, safe outputs, each action on tiny models, progress and
stop, live merging through the host, and (with gradio) the section's components and translations."""
import json
import os
import threading
import time

import pytest
import torch

from lib_lora_train.errors import ConfigError
from lib_lora_train.events import PROGRESS, WARNING, Event
from lib_lora_train.hosts.base import BasicHost, HostPaths
from lib_lora_train.hosts.live_merge import ModuleLiveModel
from lib_lora_train.models import read_checkpoint, save_checkpoint
from lib_lora_train.networks import read_network_file, save_network_file
from lib_lora_train.tools.inspect import inspect_lora
from lib_lora_train.ui import tools_actions as act
from lib_lora_train.ui.tools_runner import Progress, ToolRunner
from test_live_merge import module_like_webui
from test_tools_support import base_model, random_network, tiny_sd

ZH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib_lora_train", "ui",
                  "tools_zh_CN.json")


class LiveHost(BasicHost):
    def __init__(self, *a, live=None, **kw):
        super().__init__(*a, **kw)
        self.live_model = live
        self.written = []

    def outputs_written(self, paths):
        self.written += paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools_ui")
    models, loras = d / "models", d / "loras"
    os.makedirs(models)
    os.makedirs(loras / "proj")
    save_checkpoint(models / "base.safetensors", tiny_sd())
    a = random_network(base_model(), "networks.lora", 4, 2, ["conv_dim=2", "conv_alpha=1"], seed=71).save_tensors()
    first = next(k for k in a if k.endswith("lora_up.weight"))
    a[first] = torch.zeros_like(a[first])       # one untrained module
    save_network_file(loras / "a.safetensors", a, {"modelspec.title": "Alpha", "ss_base_model_version": "sd_v1",
                                                   "ss_tag_frequency": json.dumps({"1_x": {"cat": 5, "dog": 2}})})
    b = random_network(base_model(), "networks.lora", 8, 4, [], seed=72).save_tensors()
    save_network_file(loras / "proj" / "b.safetensors", b, {})
    (d / "outside.safetensors").write_bytes((loras / "a.safetensors").read_bytes())
    return d


def make_host(world, live=None):
    paths = HostPaths(str(world / "projects"), str(world / "loras"), [str(world / "models")])
    return LiveHost(paths, default_checkpoint=str(world / "models" / "base.safetensors"), live=live)


def run(fn, **kw):
    return ToolRunner().run_sync("test", lambda sink, stop: fn(sink=sink, stop=stop, **kw))


def test_inputs_come_from_the_hosts_folders(world):
    host = make_host(world)
    listed = act.list_loras(host)
    assert {"a.safetensors", "proj/b.safetensors"} <= set(listed) and listed == sorted(listed)
    assert "outside.safetensors" not in str(listed)
    choices = act.checkpoint_choices(host)
    assert list(choices)[0] == "base.safetensors (default)" and "base.safetensors" not in choices
    assert act.resolve_checkpoint(host, "base.safetensors (default)") == str(world / "models" / "base.safetensors")
    assert act.resolve_lora(host, "proj/b.safetensors") == str(world / "loras" / "proj" / "b.safetensors")
    assert act.resolve_lora(host, str(world / "loras" / "a.safetensors")).endswith("a.safetensors")
    for bad, match in ((str(world / "outside.safetensors"), "outside"), ("../outside.safetensors", "not a file"),
                       ("missing.safetensors", "no such file"), ("", "choose")):
        with pytest.raises(ConfigError, match=match):
            act.resolve_lora(host, bad)
    with pytest.raises(ConfigError, match="outside"):
        act.resolve_checkpoint(host, str(world / "outside.safetensors"))


def test_output_names_are_plain_and_never_replace_silently(world):
    folder = str(world / "loras")
    assert act.output_file(folder, " new ") == os.path.join(folder, "new.safetensors")
    for bad in ("sub/new", "..\\new", "", "..", ".hidden", "x.ckpt"):
        with pytest.raises(ConfigError):
            act.output_file(folder, bad)
    with pytest.raises(ConfigError, match="exists already"):
        act.output_file(folder, "a")
    assert act.output_file(folder, "a.safetensors", overwrite=True).endswith("a.safetensors")


def test_inspect_shows_types_ranks_metadata_tags_norms_and_hash(world):
    host = make_host(world)
    v = act.inspect_file(host, "a.safetensors")
    ins = inspect_lora(str(world / "loras" / "a.safetensors"))
    assert v.title == "Alpha" and v.hash_status == "ok"
    assert len(v.modules) == len(ins.modules) and len(v.modules[0]) == len(act.MODULE_HEADERS)
    flagged = [r for r in v.modules if "untrained" in r[7]]
    assert len(flagged) == 1 and flagged[0][6] == 0.0
    assert {r[3] for r in v.modules} == {"LoRA", "LoCon"} and {r[4] for r in v.modules} == {4, 2}
    assert {r[2] for r in v.modules} >= {"BASE", "IN01", "M00", "OUT11"}
    for text in ("Base model: sd_v1", "Hash: ok", "Top tags: cat (5), dog (2)", "1 modules untrained",
                 f"Flagged modules: {flagged[0][0]} (untrained)", "types LoRA: "):
        assert text in v.summary
    keys = [k for k, _ in v.metadata]
    assert "ss_tag_frequency" in keys and "sshs_model_hash" in keys


def test_metadata_edit_writes_a_new_file_unless_in_place_is_ticked(world, tmp_path):
    host = make_host(world)
    src = world / "loras" / "proj" / "b.safetensors"
    before = src.read_bytes()
    res = act.save_metadata(host, "proj/b.safetensors", "Bee", "bzz, bee", "a bee", "b_named")
    assert res.ok, res.message
    assert res.path == str(world / "loras" / "proj" / "b_named.safetensors") and src.read_bytes() == before
    assert host.written == [res.path]
    new = inspect_lora(res.path)
    assert (new.title, new.trigger_phrase, new.description, new.hash["status"]) == ("Bee", "bzz, bee", "a bee", "ok")
    again = act.save_metadata(host, "proj/b.safetensors", "Bee", "", "", "b_named")
    assert not again.ok and "exists already" in again.message
    same = act.save_metadata(host, "proj/b.safetensors", "Bee", "", "", "b")
    assert not same.ok and "exists already" in same.message
    same = act.save_metadata(host, "proj/b.safetensors", "Bee", "", "", "b", overwrite=True)
    assert not same.ok and "input file" in same.message and src.read_bytes() == before
    copy = tmp_path / "c.safetensors"
    copy.write_bytes(before)
    inplace_host = BasicHost(HostPaths(str(tmp_path / "p"), str(tmp_path), []))
    res = act.save_metadata(inplace_host, str(copy), "", "trig", "", None, in_place=True)
    assert res.ok and res.path == str(copy)
    assert inspect_lora(str(copy)).trigger_phrase == "trig" and inspect_lora(str(copy)).hash["status"] == "ok"


def test_merge_into_checkpoint_writes_a_new_file_and_refuses_overwrites(world):
    host = make_host(world)
    rows = [act.LoraRow("a.safetensors", 0.8, "MIDD"), act.LoraRow("proj/b.safetensors", -0.5, "")]
    res = run(act.merge_into_checkpoint, host=host, base="base.safetensors (default)", rows=rows,
              output_name="merged", save_precision="fp16")
    assert res.ok, res.message
    out = world / "models" / "merged.safetensors"
    assert res.path == str(out) and res.message.startswith(f"Saved {out}")
    sd = read_checkpoint(out)
    base = tiny_sd()
    assert set(sd) == set(base) and all(t.dtype == torch.float16 for t in sd.values() if t.is_floating_point())
    assert sum(not torch.equal(sd[k], base[k].half()) for k in sd) == res.details["changed_tensors"] > 0
    assert "merged.safetensors" in act.checkpoint_choices(host)
    stamp = out.stat().st_mtime_ns
    for kw, match in ((dict(output_name="merged"), "exists already"),
                      (dict(output_name="../merged"), "without folders"),
                      (dict(output_name="base", overwrite=True), "is one of the inputs"),
                      (dict(output_name="x", base=str(world / "outside.safetensors")), "outside")):
        args = dict(host=host, base="base.safetensors (default)", rows=rows, output_name="merged")
        args.update(kw)
        bad = run(act.merge_into_checkpoint, **args)
        assert not bad.ok and match in bad.message and "Traceback" not in bad.message
    assert out.stat().st_mtime_ns == stamp
    bad = run(act.merge_into_checkpoint, host=host, base="base.safetensors (default)",
              rows=[act.LoraRow("a.safetensors", 1, "1,2,3")], output_name="y")
    assert not bad.ok and "17 values" in bad.message


def test_lora_tools_write_files_with_a_report(world):
    host = make_host(world)
    rows = [act.LoraRow("a.safetensors", 1.0), act.LoraRow("proj/b.safetensors", 0.5)]
    svd = run(act.merge_loras, host=host, rows=rows, output_name="m_svd", method="svd", new_rank=6)
    assert svd.ok, svd.message
    assert "Energy kept" in svd.message and "rank 6" in svd.message
    cat = run(act.merge_loras, host=host, rows=rows, output_name="m_cat", method="concat", save_precision="fp16")
    assert cat.ok, cat.message
    t, meta = read_network_file(cat.path)
    assert {v.dtype for v in t.values()} == {torch.float16} and meta["sshs_model_hash"]
    rs = run(act.resize, host=host, lora="proj/b.safetensors", output_name="b_r2", new_rank=2)
    assert rs.ok and "rank 2" in rs.message and "Energy kept" in rs.message
    dyn = run(act.resize, host=host, lora="proj/b.safetensors", output_name="b_dyn", method="sv_fro",
              dynamic_param=0.5, new_rank=8)
    assert dyn.ok, dyn.message
    nodyn = run(act.resize, host=host, lora="proj/b.safetensors", output_name="b_dyn2", method="sv_fro")
    assert not nodyn.ok and "parameter" in nodyn.message
    merged = world / "models" / "tuned.safetensors"
    if not merged.exists():
        from lib_lora_train.tools.merge import merge_into_checkpoint
        merge_into_checkpoint(world / "models" / "base.safetensors", [str(world / "loras" / "a.safetensors")],
                              merged)
    ex = run(act.extract, host=host, tuned="tuned.safetensors", base="base.safetensors (default)",
             output_name="extracted", dim=4, conv_dim=2)
    assert ex.ok, ex.message
    assert "Energy kept" in ex.message and os.path.exists(ex.path)
    same = run(act.extract, host=host, tuned="base.safetensors (default)", base="base.safetensors (default)",
               output_name="nothing")
    assert not same.ok and "same file" in same.message
    assert set(host.written) >= {svd.path, cat.path, rs.path, dyn.path, ex.path}


def test_runner_reports_progress_and_stops():
    runner = ToolRunner()
    started = threading.Event()

    def slow(sink, stop):
        from lib_lora_train.tools.common import ToolContext
        ctx = ToolContext(sink, stop, "slow")
        ctx.progress("work", 3, 10)
        ctx.warn("careful")
        started.set()
        while True:
            ctx.check_stop()
            time.sleep(0.01)

    stream = runner.stream("slow tool", slow, interval=0.02)
    first = next(stream)
    assert first[1] == ""
    started.wait(5)
    with pytest.raises(ConfigError, match="still running"):
        runner.start("other", slow)
    assert "work: 3/10 (30%)" in runner.status() and "warning: careful" in runner.status()
    assert runner.stop().startswith("Stopping")
    *_, (status, result) = list(stream)
    assert result.startswith("Stopped:") and "nothing was written" in result
    assert runner.stop() == "Nothing is running."
    crash = runner.run_sync("crash", lambda sink, stop: {}["missing"])
    assert not crash.ok and crash.message == "Error: KeyError: 'missing'"


def test_progress_text():
    p = Progress()
    p(Event(PROGRESS, {"stage": "merge", "done": 5, "total": 20, "message": None}))
    p(Event(WARNING, {"message": "3 modules skipped"}))
    assert p.text() == "merge: 5/20 (25%)\nwarning: 3 modules skipped"


class FakeJobs:
    def __init__(self, status):
        self.status = status

    def current(self):
        return type("J", (), {"status": self.status})()


def test_live_merge_through_the_host_and_restore(world):
    live = ModuleLiveModel(module_like_webui(tiny_sd()))
    before = {k: t.detach().clone() for k, t in live.state_dict_view().items()}
    host = make_host(world, live=live)
    state = act.LiveState(host)
    rows = [act.LoraRow("a.safetensors", 0.7, "OUTALL")]
    refused = run(act.live_apply, host=host, jobs=FakeJobs("running"), live=state, rows=rows)
    assert not refused.ok and "training run" in refused.message
    res = run(act.live_apply, host=host, jobs=FakeJobs("done"), live=state, rows=rows)
    assert res.ok and "No file was written" in res.message, res.message
    assert "Merged into the loaded model now: a.safetensors ×0.7" in state.text()
    view = live.state_dict_view()
    changed = sum(not torch.equal(view[k], before[k]) for k in view)
    assert 0 < changed <= res.details["keys"]      # the untrained module is written with its own value
    back = act.live_restore(host, state)
    assert back.ok and "Restored" in back.message
    assert all(torch.equal(view[k], before[k]) for k in view)
    assert "no merged LoRAs" in state.text()
    assert "Nothing to restore" in act.live_restore(host, state).message
    nohost = make_host(world, live=None)
    none = run(act.live_apply, host=nohost, jobs=None, live=act.LiveState(nohost), rows=rows)
    assert not none.ok and "no model is loaded" in none.message


# ------------------------------------------------------------------------------------------------ gradio

def _build(host):
    gr = pytest.importorskip("gradio")
    from lib_lora_train.ui.tools_section import build_tools_section
    with gr.Blocks() as demo:
        assert build_tools_section(host, None) is None
    return demo


def _by_elem(demo, elem_id):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_section_builds_with_prefixed_ids_and_every_string_translated(world):
    demo = _build(make_host(world, live=None))
    from lib_lora_train.ui import i18n
    ids = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) > 60 and all(i.startswith("lora_train_tools_") for i in ids)
    assert len(ids) == len(set(ids))
    with open(ZH, encoding="utf-8") as fh:
        zh = json.load(fh)
    strings = {t for t, _ in i18n.visible_strings(demo)}
    assert {"Merge into checkpoint", "Load into the live model (no file)", "Which block is which"} <= strings
    missing = sorted(strings - set(zh))
    assert not missing, f"no zh_CN translation for {missing}"
    assert all(v.strip() for v in zh.values())
    assert _by_elem(demo, "lora_train_tools_merge_live_group").visible is True
    choices = [c[0] if isinstance(c, (tuple, list)) else c
               for c in _by_elem(demo, "lora_train_tools_inspect_lora").choices]
    assert choices == act.list_loras(make_host(world)) and "proj/b.safetensors" in choices
    plain = _build(BasicHost(HostPaths(str(world / "projects"), str(world / "loras"), [str(world / "models")])))
    assert _by_elem(plain, "lora_train_tools_merge_live_group").visible is False


def test_section_buttons_run_the_actions(world):
    demo = _build(make_host(world))
    button = _by_elem(demo, "lora_train_tools_resize_run")
    # the config's dependency list has the same shape on Gradio 3.41 and 4.x; fns is a list (3.x) or a dict by id
    idx, dep = next((d.get("id", i), d) for i, d in enumerate(demo.get_config_file()["dependencies"])
                    if button._id in [t[0] if isinstance(t, (list, tuple)) else t for t in d["targets"]])
    values = ["proj/b.safetensors", "fixed", 3, 0, None, "float", "b_ui", False]
    assert len(dep["inputs"]) == len(values)
    updates = list(demo.fns[idx].fn(*values))
    status, result = updates[-1]
    assert result.startswith("Saved ") and "b_ui.safetensors" in result and "rank 3" in result, result
    assert "resize: done" in status
    again = list(demo.fns[idx].fn(*values))[-1][1]
    assert again.startswith("Error:") and "exists already" in again
