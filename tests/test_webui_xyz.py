"""Our X/Y/Z axes and the Compare grid through the WebUI's X/Y/Z plot script, against a stand-in of the script
(tests/xyz_standins.py) that builds and checks its arguments the way A1111 1.10's does."""
import json
import threading
import time
import types
from copy import copy
from types import SimpleNamespace

import pytest

from lib_lora_train.compare_api import CompareRequest
from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.hosts import webui_xyz as wx
from lib_lora_train.hosts.webui_xyz_runtime import addnet_refresh
from xyz_standins import RunnerStandIn, make_webui, make_xyz_module


def make_run(root, project, name, epochs, created, *, val=None):
    folder = root / project
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for e in range(1, epochs + 1):
        stem = name if e == epochs else f"{name}-{e:06d}"
        path = folder / f"{stem}.safetensors"
        path.write_bytes(b"not a real lora")
        outputs.append({"name": stem, "path": str(path), "epoch": e, "step": 10 * e,
                        "kind": "final" if e == epochs else "epoch"})
    val = val or [0.30 - 0.01 * e for e in range(1, epochs + 1)]
    record = {"run_id": f"{name}-id", "output_name": name, "created": created, "status": "done", "outputs": outputs,
              "config": {"resolution": "64", "metadata_trigger_phrase": "zkz"},
              "epochs": [{"epoch": e, "avg_loss": 0.2, "step": 10 * e} for e in range(1, epochs + 1)],
              "validation": [{"epoch": e, "step": 10 * e, "loss": v, "at": "epoch"} for e, v in enumerate(val, 1)],
              "validation_source": {"source": "held_out"}}
    path = folder / f"{name}.run.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return str(path)


def networks_for(root):
    """The built-in Lora extension's `networks`: stems of the files under root, found by a rescan."""
    nets = types.ModuleType("networks")
    nets.available_networks = {}
    nets.rescans = 0

    def rescan():
        nets.rescans += 1
        nets.available_networks.clear()
        for f in root.rglob("*.safetensors"):
            nets.available_networks[f.stem] = SimpleNamespace(filename=str(f))
    nets.list_available_networks = rescan
    return nets


def web_with_axes(tmp_path, **kw):
    root = tmp_path / "Lora"
    root.mkdir(exist_ok=True)
    return make_webui(tmp_path, lora_dir=root, networks=kw.pop("networks", networks_for(root)),
                      before_ui=lambda scripts: wx.ensure_axes(scripts, lambda: str(root)), **kw), root


# ---------------------------------------------------------------------------------------------- registering
def test_axes_are_added_once_at_the_end_and_again_on_a_fresh_module(tmp_path):
    mod = make_xyz_module(extra_axes=["AddNet Model 1", "AddNet Weight 1"])
    before = [o.label for o in mod.axis_options]
    first = wx.register_axes(mod, lambda: str(tmp_path))
    again = wx.register_axes(mod, lambda: str(tmp_path))        # import + on_before_ui, or a second call
    labels = [o.label for o in mod.axis_options]
    assert labels == before + [wx.EPOCH_AXIS, wx.WEIGHT_AXIS]
    assert mod.axis_options[-2] is again[0] and first[0] is not again[0]    # replaced in place, not added
    assert type(again[0]) is mod.AxisOption                   # plain AxisOption: offered in txt2img and img2img
    fresh = make_xyz_module()                                  # "Reload UI" loads xyz_grid.py again
    scripts = SimpleNamespace(scripts_data=[SimpleNamespace(path="/x/scripts/xyz_grid.py", module=fresh)])
    assert wx.ensure_axes(scripts, lambda: str(tmp_path))
    assert [o.label for o in fresh.axis_options][-2:] == [wx.EPOCH_AXIS, wx.WEIGHT_AXIS]
    assert not wx.ensure_axes(SimpleNamespace(scripts_data=[]), lambda: str(tmp_path))


def test_epoch_choices_are_our_files_per_run_newest_first(tmp_path):
    root = tmp_path / "Lora"
    make_run(root, "cat", "old", 2, created=100)
    make_run(root, "dog", "new", 3, created=200)
    (root / "dog" / "new-step00000005.safetensors").write_bytes(b"x")      # a file no record lists
    (root / "users_own.safetensors").write_bytes(b"x")                      # the user's LoRAs: not ours
    (root / "styles").mkdir()
    (root / "styles" / "watercolor.safetensors").write_bytes(b"x")
    epoch_axis, _ = wx.register_axes(make_xyz_module(), lambda: str(root))
    assert epoch_axis.choices() == ["new-000001", "new-000002", "new", "old-000001", "old",
                                    "new-step00000005"]
    assert epoch_axis.format_value(None, epoch_axis, "new-000002") == "new-000002 (epoch 2)"
    assert epoch_axis.format_value(None, epoch_axis, "other") == "other"


def test_the_two_axes_combine_in_either_order_on_cell_copies(tmp_path):
    root = tmp_path / "Lora"
    make_run(root, "p", "run", 2, created=1)
    epoch, weight = wx.register_axes(make_xyz_module(), lambda: str(root))
    p = SimpleNamespace(prompt="zkz, 1girl", negative_prompt="")
    stems = ["run-000001", "run"]

    def cell(*applies):
        pc = copy(p)
        for axis, x, xs in applies:
            axis.apply(pc, x, xs)
        return pc.prompt

    want = "zkz, 1girl <lora:run-000001:0.6>"
    assert cell((epoch, "run-000001", stems), (weight, 0.6, [0.6, 1.0])) == want
    assert cell((weight, 0.6, [0.6, 1.0]), (epoch, "run-000001", stems)) == want
    assert cell((epoch, "run", stems)) == "zkz, 1girl <lora:run:1>"              # weight 1 when alone
    assert p.prompt == "zkz, 1girl" and not hasattr(p, wx.STATE_ATTR)          # the template is untouched
    p.prompt = "zkz <lora:run-000001:0.8>, 1girl"                               # the user wrote the token
    assert cell((epoch, "run", stems)) == "zkz <lora:run:0.8>, 1girl"
    assert cell((weight, 0.3, [0.3]), (epoch, "run", stems)) == "zkz <lora:run:0.3>, 1girl"
    assert cell((weight, 0.3, [0.3])) == "zkz <lora:run-000001:0.3>, 1girl"      # weight axis alone
    p.prompt = "zkz <lora:style:0.5>"                                            # someone else's LoRA stays
    assert cell((weight, 0.7, [0.7]), (epoch, "run", stems)) == "zkz <lora:style:0.5> <lora:run:0.7>"


# ---------------------------------------------------------------------------------------------- the arguments
@pytest.mark.parametrize("extra", [(), ("AddNet Model 1", "AddNet Weight 1", "AddNet UNet Weight 1")])
@pytest.mark.parametrize("signature", ["1.10", "1.5"])
def test_built_arguments_are_what_the_scripts_run_expects(tmp_path, extra, signature):
    web, root = web_with_axes(tmp_path, xyz_module=make_xyz_module(extra_axes=extra, signature=signature))
    make_run(root, "p", "run", 2, created=1)
    args = wx.build_xyz_args(web.script, wx.Axis(wx.WEIGHT_AXIS, ["0.4", "1"]),
                             wx.Axis(wx.EPOCH_AXIS, ["run-000001", "run"]))
    labels = [o.label for o in web.script.current_axis_options]
    assert len(args) == (18 if signature == "1.10" else 14) == len(web.script.controls)
    assert args[0] == labels.index(wx.WEIGHT_AXIS) and args[3] == labels.index(wx.EPOCH_AXIS)
    assert args[6] == labels.index("Nothing")
    p = web.processing.StableDiffusionProcessingTxt2Img(prompt="zkz", seed=5)
    out = web.script.run(p, *args)
    assert web.standin.prompts == ["zkz <lora:run-000001:0.4>", "zkz <lora:run-000001:1>",
                                   "zkz <lora:run:0.4>", "zkz <lora:run:1>"]
    assert web.script.last.x_labels == ["LoRA weight: 0.4", "LoRA weight: 1.0"]
    assert web.script.last.y_labels == ["run-000001 (epoch 1)", "run (epoch 2)"]
    assert out.images[0].size == (32, 32)


def test_the_ui_defaults_alone_fail_and_indices_differ_per_tab(tmp_path):
    web, _ = web_with_axes(tmp_path)
    p = web.processing.StableDiffusionProcessingTxt2Img(prompt="zkz")
    with pytest.raises(TypeError):                          # labels where run() indexes: the API users' trap
        web.script.run(p, *[c.value for c in web.script.controls])
    img2img = web.xyz.Script()
    RunnerStandIn(img2img, is_img2img=True)
    a = wx.build_xyz_args(web.script, wx.Axis(wx.EPOCH_AXIS, ["x"]))
    b = wx.build_xyz_args(img2img, wx.Axis(wx.EPOCH_AXIS, ["x"]))
    assert web.script.current_axis_options[a[0]].label == img2img.current_axis_options[b[0]].label == wx.EPOCH_AXIS
    assert a[0] != b[0]                                     # a hard-coded index would be wrong in one tab


def test_builder_errors_say_what_is_wrong(tmp_path):
    web, _ = web_with_axes(tmp_path)
    with pytest.raises(ConfigError, match="no axis 'Nope'"):
        wx.build_xyz_args(web.script, wx.Axis("Nope", [1]))
    bare = web.xyz.Script()
    with pytest.raises(ModelError, match="no axis list yet"):
        wx.build_xyz_args(bare, wx.Axis(wx.EPOCH_AXIS, ["x"]))
    web.script.controls = web.script.controls[:-1]
    with pytest.raises(ModelError, match="controls but its run"):
        wx.build_xyz_args(web.script, wx.Axis(wx.EPOCH_AXIS, ["x"]))


def test_full_vector_selects_the_script_and_keeps_other_defaults(tmp_path):
    web, _ = web_with_axes(tmp_path)
    xyz_args = wx.build_xyz_args(web.script, wx.Axis(wx.WEIGHT_AXIS, ["1"]))
    vector = wx.full_script_args(web.runner, web.script, xyz_args)
    assert vector[0] == 2                                   # "Prompts from file" is selectable script 1
    seed = web.runner.scripts[0]
    assert vector[seed.args_from:seed.args_to] == [-1, False]
    assert vector[web.script.args_from:web.script.args_to] == xyz_args
    assert len(vector) == web.script.args_to
    with pytest.raises(ModelError):
        wx.full_script_args(web.runner, web.script, xyz_args[:-1])


# ---------------------------------------------------------------------------------------------- the grid
def test_compare_grid_through_the_script(tmp_path):
    web, root = web_with_axes(tmp_path)
    record = make_run(root, "p", "run", 3, created=1, val=[0.30, 0.20, 0.25])
    state = web.shared.state
    state.job_count, state.job_no, state.textinfo, state.job = 7, 3, "Train LoRA: done", ""
    req = CompareRequest(record_path=record, epochs=[1, 2], weights=[0.5, 1.0], prompt="zkz, smile",
                         negative_prompt="blurry", seed=77, steps=3, width=64, height=64)
    res = wx.run_compare_grid(web, req)
    assert res.method == "lora_train" and not res.interrupted
    assert [c["prompt"] for c in web.standin.cells] == [
        "zkz, smile <lora:run-000001:0.5>", "zkz, smile <lora:run-000001:1>",
        "zkz, smile <lora:run-000002:0.5>", "zkz, smile <lora:run-000002:1>"]
    # the Seed script's UI default (-1) did not replace the request's seed: p.is_api was set in time
    assert {c["seed"] for c in web.standin.cells} == {77} and res.seed == 77
    assert {(c["steps"], c["size"], c["sampler"]) for c in web.standin.cells} == {(3, (64, 64), "DPM++ 2M Karras")}
    assert res.row_labels == ["run-000001 (epoch 1)", "run-000002 (epoch 2)"]
    assert res.col_labels == ["LoRA weight: 0.5", "LoRA weight: 1.0"]
    assert res.epochs == [1, 2] and res.weights == [0.5, 1.0] and res.image.size == (32, 32)
    assert res.ranking.suggested_epoch == 2 and "X Type: LoRA weight" in res.infotext
    assert res.saved == str(tmp_path / "grids")
    assert (state.job_count, state.job_no, state.textinfo) == (7, 3, "Train LoRA: done")   # given back
    assert state.begun == 1 and state.ended == 1 and not state.interrupted
    assert not web.call_queue.queue_lock.locked()
    d = res.to_dict()
    assert d["validation"]["suggested_epoch"] == 2 and "<- suggested" in d["table"]


def test_prompt_defaults_to_the_trigger_and_epochs_are_checked(tmp_path):
    web, root = web_with_axes(tmp_path)
    record = make_run(root, "p", "run", 2, created=1)
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[1], seed=1, steps=2))
    assert web.standin.prompts == ["zkz <lora:run-000001:1>", "zkz <lora:run:1>"]
    assert web.standin.cells[0]["size"] == (64, 64)                   # the run's resolution
    assert res.col_labels == ["LoRA weight: 1.0"]
    with pytest.raises(ConfigError, match="no file for epoch 5"):
        wx.run_compare_grid(web, CompareRequest(record_path=record, epochs=[5]))
    with pytest.raises(ConfigError, match="steps"):
        wx.run_compare_grid(web, CompareRequest(record_path=record, steps=0))


def test_interrupt_stops_cleanly_and_busy_or_training_is_refused(tmp_path):
    web, root = web_with_axes(tmp_path)
    record = make_run(root, "p", "run", 2, created=1)
    stop = threading.Event()
    seen = []

    def on_cell(n):
        if n == 1:
            stop.set()
            deadline = time.monotonic() + 120   # ends as soon as the watcher has seen it
            while not web.shared.state.interrupted and time.monotonic() < deadline:
                time.sleep(0.02)      # the watcher turns `stop` into the WebUI's Interrupt
    web.standin.on_cell = on_cell
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[0.5, 1.0], seed=1, steps=2),
                              stop=stop, progress=lambda done, total: seen.append((done, total)))
    assert res.interrupted and len(web.standin.prompts) == 1
    assert not web.shared.state.interrupted and not web.call_queue.queue_lock.locked()
    assert seen and seen[-1][1] == 4

    web.shared.state.job = "task(lora-train-abc)"
    with pytest.raises(ConfigError, match="training run"):
        wx.run_compare_grid(web, CompareRequest(record_path=record))
    web.shared.state.job = ""
    holder = threading.Thread(target=web.call_queue.queue_lock.acquire)
    holder.start()
    holder.join()
    try:
        with pytest.raises(ConfigError, match="busy"):
            wx.run_compare_grid(web, CompareRequest(record_path=record), wait_s=0.3)
    finally:
        web.call_queue.queue_lock._lock.release()


def test_files_the_lora_extension_cannot_load_are_reported(tmp_path):
    nets = types.ModuleType("networks")
    nets.available_networks = {}
    nets.list_available_networks = lambda: None
    web, root = web_with_axes(tmp_path, networks=nets)
    record = make_run(root, "p", "run", 1, created=1)
    with pytest.raises(ConfigError, match="does not find run"):
        wx.run_compare_grid(web, CompareRequest(record_path=record))
    nets.available_networks["run"] = SimpleNamespace(filename=str(tmp_path / "elsewhere" / "run.safetensors"))
    with pytest.raises(ConfigError, match="two LoRA files are called run"):
        wx.run_compare_grid(web, CompareRequest(record_path=record))


def test_prompt_sr_fallback_without_our_axes(tmp_path):
    root = tmp_path / "Lora"
    web = make_webui(tmp_path, lora_dir=root, networks=networks_for(root))      # axes never registered
    record = make_run(root, "p", "run", 2, created=1)
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[0.5, 1.0], prompt="zkz 0.5",
                                                  seed=3, steps=2))
    assert res.method == "prompt_sr"
    assert web.standin.prompts == ["zkz 0.5 <lora:run-000001:0.5>", "zkz 0.5 <lora:run-000001:1>",
                                   "zkz 0.5 <lora:run:0.5>", "zkz 0.5 <lora:run:1>"]
    with pytest.raises(ConfigError, match="no axes for 'lora_train'"):
        wx.run_compare_grid(web, CompareRequest(record_path=record), method="lora_train")


def test_additional_networks_axes_see_our_files_after_a_refresh(tmp_path):
    root = tmp_path / "Lora"
    mod = make_xyz_module()
    util = types.ModuleType("model_util")
    util.lora_models, util.updates = {}, 0

    def update_models():            # AddNet scans its own folder plus the extra paths setting
        util.updates += 1
        util.lora_models.clear()
        for folder in [f.strip().strip('"') for f in web.shared.opts.data.get(
                "additional_networks_extra_lora_path", "").split(",") if f.strip()]:
            for f in sorted((tmp_path / folder).glob("*.safetensors")):
                util.lora_models[f"{f.stem}(abcdef123456)"] = str(f)
    util.update_models = update_models
    util.find_closest_lora_model_name = lambda s: next((k for k, v in util.lora_models.items() if v == s), None)
    addnet = types.ModuleType("additional_networks")
    addnet.model_util = util
    mod.axis_options += [
        mod.AxisOption("AddNet Model 1", str, lambda p, x, xs: setattr(p, "addnet", (x, getattr(p, "addnet",
                       (None, 1.0))[1])), choices=lambda: list(util.lora_models)),
        mod.AxisOption("AddNet Weight 1", float, lambda p, x, xs: setattr(p, "addnet", (getattr(p, "addnet",
                       (None, 1.0))[0], x)))]
    web = make_webui(tmp_path, xyz_module=mod, lora_dir=root)
    web.scripts.scripts_data.append(SimpleNamespace(path="/ext/addnet/scripts/additional_networks.py",
                                                    module=addnet))
    record = make_run(root, "p", "run", 2, created=1)
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[0.5], seed=1, steps=2))
    assert res.method == "addnet" and util.updates >= 1
    assert str(root / "p") in web.shared.opts.data["additional_networks_extra_lora_path"]
    assert [c["addnet"] for c in web.standin.cells] == [("run-000001(abcdef123456)", 0.5),
                                                       ("run(abcdef123456)", 0.5)]
    assert addnet_refresh(web, [str(root / "p")]) and util.updates >= 2
    assert web.shared.opts.data["additional_networks_extra_lora_path"].count(str(root / "p")) == 1


def test_sampler_names_leave_hidden_ones_out(tmp_path):
    from lib_lora_train.hosts.webui_xyz_runtime import sampler_names
    web, _ = web_with_axes(tmp_path)
    web.processing.sd_samplers = SimpleNamespace(samplers=[SimpleNamespace(name=n) for n in ("DPM++ 2M", "Euler a",
                                                                                            "LMS")])
    web.shared.opts.hide_samplers = ["LMS"]
    assert sampler_names(web) == ["DPM++ 2M", "Euler a"]


def test_failed_cells_are_marked_not_black_in_the_grid_and_the_result(tmp_path):
    """A cell whose process_images raised (the WebUI's NansException) or gave a NaN (all-black) image: the real
    X/Y/Z script leaves it black; through our axes it is a grey "failed" tile, listed in the result."""
    web, root = web_with_axes(tmp_path)
    record = make_run(root, "p", "run", 2, created=1)

    def on_cell(n):
        if n == 2:
            raise RuntimeError("A tensor with all NaNs was produced in Unet.")
    web.standin.on_cell = on_cell
    web.standin.nan_cells = {3}
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[0.5, 1.0], seed=1, steps=2))
    failed = sorted(((f.epoch, f.weight, f.reason) for f in res.failed), key=lambda t: t[:2])
    assert failed == [(1, 1.0, "RuntimeError: A tensor with all NaNs was produced in Unet."),
                      (2, 0.5, "NaN image (the sampler produced NaNs: an all-black picture)")]
    assert {f.file for f in res.failed} == {str(root / "p" / "run-000001.safetensors"),
                                            str(root / "p" / "run.safetensors")}
    cells = web.script.last.cell_images
    assert set(cells) == {(0, 0), (1, 0), (0, 1), (1, 1)}          # every cell drawn, none left black
    for xy in ((1, 0), (0, 1)):                                     # the failed tile: grey with a red cross
        colours = set(cells[xy].convert("RGB").getdata())
        assert (96, 96, 96) in colours and (220, 40, 40) in colours
    assert cells[(1, 0)].size == (64, 64)                           # an error: a tile of the cell's size
    assert cells[(0, 0)].getpixel((0, 0))[0] > 0                    # the good cells are the sampler's own
    d = res.to_dict()
    assert [f["weight"] for f in d["failed"]] in ([1.0, 0.5], [0.5, 1.0]) and "NaN" in json.dumps(d["failed"])


def test_cells_without_our_axes_are_left_to_the_webui(tmp_path):
    """Other X/Y/Z plots are not changed: the wrapped process_images passes their cells straight through."""
    web, root = web_with_axes(tmp_path)
    wrapped = web.xyz.process_images
    assert getattr(wrapped, "__wrapped__", None) is web.standin.process_images
    web.standin.nan_cells = {1}
    p = SimpleNamespace(prompt="a cat", seed=1, steps=2, width=8, height=8, sampler_name="Euler", standin=web.standin)
    res = wrapped(p)
    assert res.images[0].getextrema()[0] == (0, 0)                   # untouched: the WebUI's own result
    wx.register_axes(web.xyz, lambda: str(root))
    assert web.xyz.process_images is wrapped                         # wrapped once, however often registered


def test_a_lora_that_matched_no_layer_is_a_failed_cell(tmp_path):
    """A LoRA of another family loads in the WebUI's Lora extension with no layer matched (it says so only in a
    debug log) and the cell looks like the base model: read from loaded_networks, it is marked failed."""
    root = tmp_path / "Lora"
    root.mkdir()
    nets = networks_for(root)
    nets.loaded_networks = []
    web, _ = web_with_axes(tmp_path, networks=nets)
    record = make_run(root, "p", "run", 2, created=1)

    def on_cell(n):                                  # what the extension loaded for this cell's <lora:...>
        stem = "run-000001" if n == 1 else "run"
        nets.loaded_networks[:] = [SimpleNamespace(name=stem, modules={} if n == 1 else {"layer": object()})]
    web.standin.on_cell = on_cell
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[1.0], seed=1, steps=2))
    assert [(f.epoch, f.weight) for f in res.failed] == [(1, 1.0)]
    assert "run-000001 matched no layer of the loaded model" in res.failed[0].reason


def test_on_forge_and_reforge_an_empty_modules_list_is_not_a_failed_cell(tmp_path):
    """Forge's and reForge's Lora extensions (they have `load_lora_state_dict`) patch weights through their model
    patchers and never fill a network's `modules`: in the real Forge every Compare cell came out grey "failed"
    although Forge had loaded all 264 keys of the LoRA into each cell."""
    root = tmp_path / "Lora"
    root.mkdir()
    nets = networks_for(root)
    nets.loaded_networks = []
    nets.load_lora_state_dict = lambda filename: {}
    web, _ = web_with_axes(tmp_path, networks=nets)
    record = make_run(root, "p", "run", 2, created=1)

    def on_cell(n):
        nets.loaded_networks[:] = [SimpleNamespace(name="run-000001" if n == 1 else "run", modules={})]
    web.standin.on_cell = on_cell
    res = wx.run_compare_grid(web, CompareRequest(record_path=record, weights=[1.0], seed=1, steps=2))
    assert res.failed == []
