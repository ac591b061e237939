"""The WebUI host on stand-ins of the WebUI's objects: folders, the loaded model shared (not copied), the queue lock,
the Lora extension's leftovers cleared, the model bit-identical after a run / an interrupt / an error, progress in
shared.state, the Lora list refresh, the taggers, and --api-auth."""
import os
import shutil
import threading
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.events import LOG, SAMPLE, START, STEP, Event
from lib_lora_train.hosts import webui as webui_host
from lib_lora_train.hosts.webui import WebUIHost, live_state_dict, step_text
from lib_lora_train.hosts.webui_support import api_auth_dependencies
from lib_lora_train.jobs import JobManager
from lib_lora_train.prep.project import create_project
from webui_standins import NOT_A_CHECKPOINT, make_webui, same_as, snapshot

FAST = {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "seed": 1, "cache_latents": True}


@pytest.fixture
def webui(tmp_path):
    return make_webui(tmp_path)


def cfg_for(host, **kw):
    return config_from_dict({**host.base_config(), **kw})


def toy_project(host, tmp_path, name="toy", n=4):
    proj = create_project(host.paths.project_dir(name), name, trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=n)
    shutil.move(str(src / "10_zkz"), os.path.join(proj.train_dir, "1_zkz"))
    return proj


def test_folders_settings_and_base_config(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    data = ns.paths.data_path
    assert host.paths.projects == os.path.join(data, "lora_train", "projects")
    assert host.paths.loras == ns.shared.cmd_opts.lora_dir
    assert ns.sd_models.model_path in host.paths.models and ns.shared.cmd_opts.lora_dir in host.paths.models
    ns.shared.opts.data.update(lora_train_output_dir="my_loras", lora_train_projects_dir=str(tmp_path / "p"))
    assert host.paths.loras == os.path.join(data, "my_loras") and os.path.isdir(host.paths.loras)
    assert host.paths.projects == str(tmp_path / "p")
    assert host.base_config() == {"pretrained_model_name_or_path": ns.info.filename, "device": "cpu",
                                  "mixed_precision": "no", "resolution": "512"}
    assert "tiny_sd1.safetensors" in host.checkpoint_label() and "(SD 1.x)" in host.checkpoint_label()
    assert (host.model_family(), host.native_resolution()) == ("sd1", 512)
    ns.devices.device, ns.devices.dtype_unet = torch.device("cuda"), torch.float16
    assert host.base_config()["device"] == "cuda" and host.base_config()["mixed_precision"] == "fp16"
    ns.devices.device, ns.devices.dtype_unet = torch.device("cuda", 1), torch.bfloat16
    assert host.base_config()["device"] == "cuda:1" and host.base_config()["mixed_precision"] == "bf16"
    ns.devices.dtype_unet = torch.float32
    assert host.base_config()["mixed_precision"] == "no"


def test_session_shares_the_loaded_tensors_and_takes_the_queue_lock(webui):
    w, ns = webui
    host, sd_model, lock = WebUIHost(w), ns.shared.sd_model, ns.call_queue.queue_lock
    live = live_state_dict(sd_model)
    assert not any("wrapped" in k for k in live) and "cond_stage_model.transformer.text_model.embeddings." \
        "token_embedding.weight" in live
    ptrs = {t.data_ptr() for t in sd_model.state_dict().values()}
    with host.training_session(cfg_for(host)) as model:
        assert lock.locked() and ns.shared.state.begun == 1
        for part in (model.unet, model.vae):
            assert all(t.data_ptr() in ptrs for t in part.state_dict().values())     # no second copy
        te = {k: t for k, t in model.text_encoder.state_dict().items() if not k.endswith("position_ids")}
        assert all(t.data_ptr() in ptrs for t in te.values())
        assert model.info.path == ns.info.filename and model.info.sha256 == ns.info.sha256
        assert model.info.legacy_hash == ns.info.hash and model.info.name == "tiny_sd1.safetensors"
        assert not any(p.requires_grad for p in model.unet.parameters())
    assert not lock.locked() and ns.shared.state.ended == 1 and ns.shared.state.job == ""
    assert all(p.requires_grad for p in sd_model.model.parameters())     # the WebUI's own flags untouched


def test_session_clears_networks_left_applied_and_trains_on_clean_weights(webui):
    w, ns = webui
    host, sd_model, nets = WebUIHost(w), ns.shared.sd_model, ns.networks
    clean = snapshot(sd_model)
    a = sd_model.model.diffusion_model.input_blocks._modules["1"]._modules["1"].proj_in
    b = sd_model.cond_stage_model.wrapped.transformer.text_model.encoder.layers._modules["0"].self_attn.q_proj
    nets.bake(a)
    nets.bake(b)
    assert same_as(sd_model, clean) and nets.loaded_networks == ["some_lora"]
    with host.training_session(cfg_for(host)) as model:
        assert nets.loaded_networks == [] and same_as(sd_model, clean) == []
        assert a.network_weights_backup is None and a.network_current_names == ()
        unet_w = model.unet.down_blocks[0].attentions[0].proj_in.weight
        assert torch.equal(unet_w, clean["model.diffusion_model.input_blocks.1.1.proj_in.weight"][3])


@pytest.mark.parametrize("trap, message", [
    ({"lowvram": True}, "--lowvram"),
    ("sd3", "SD 3"),
    ("ssd", "SSD-1B"),
    ("fp8", "FP8"),
])
def test_refusals_take_nothing_and_leave_nothing(tmp_path, trap, message):
    w, ns = make_webui(tmp_path, **(trap if isinstance(trap, dict) else {}))
    if trap in ("sd3", "ssd"):
        setattr(ns.shared.sd_model, f"is_{trap}", True)
    if trap == "fp8":
        ns.devices.fp8 = True
    host = WebUIHost(w)
    with pytest.raises((ConfigError, ModelError), match=message):
        with host.training_session(cfg_for(host)):
            pass
    assert not ns.call_queue.queue_lock.locked() and ns.shared.state.job == ""


def test_medvram_moves_the_parts_to_the_device_and_back_also_after_an_error(tmp_path):
    w, ns = make_webui(tmp_path, medvram=True)
    sd_model = ns.shared.sd_model
    sd_model.lowvram = True
    ns.devices.device = torch.device("cuda")       # never touched for real: the parts only record the move
    parts = [sd_model.model, sd_model.first_stage_model, sd_model.cond_stage_model]
    for p in parts:
        p.fake_move = True
    host = WebUIHost(w)
    with pytest.raises(RuntimeError, match="boom"):
        with host.training_session(cfg_for(host, device="cpu")):
            assert [p.moves for p in parts] == [[torch.device("cuda")]] * 3
            raise RuntimeError("boom")
    assert [p.moves for p in parts] == [[torch.device("cuda"), torch.device("cpu")]] * 3
    assert not ns.call_queue.queue_lock.locked()


def test_a_config_naming_another_checkpoint_gets_no_model(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    with host.training_session(cfg_for(host, pretrained_model_name_or_path=str(tmp_path / "other.ckpt"))) as m:
        assert m is None and ns.call_queue.queue_lock.locked()
    assert not ns.call_queue.queue_lock.locked()
    ns.shared.sd_model.forge_objects = object()      # Forge: no ldm modules to share; the engine reads the file
    with host.training_session(cfg_for(host)) as m:
        assert m is None and ns.call_queue.queue_lock.locked()


def run_job(host, jobs, tmp_path, listener=None, **config):
    toy_project(host, tmp_path)
    if listener:
        jobs.listeners.append(listener)
    job = jobs.submit("toy", {**FAST, **config})
    return jobs.wait(job.id, timeout=120)


def test_a_run_on_the_loaded_model_leaves_it_bit_identical(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    jobs = JobManager(host)
    sd_model, state, lock = ns.shared.sd_model, ns.shared.state, ns.call_queue.queue_lock
    before = snapshot(sd_model)
    seen = []
    make_sink = host.progress_sink

    def progress_sink(job, stop):         # what shared.state holds right after each step's event
        sink = make_sink(job, stop)

        def record(event):
            sink(event)
            if event.kind == STEP:
                seen.append((lock.locked(), state.job_count, state.job_no, state.textinfo, state.job))
        return record
    host.progress_sink = progress_sink
    prompts = os.path.join(host.paths.projects, "toy_prompts.txt")
    with open(prompts, "w") as fh:
        fh.write("zkz --w 64 --h 64 --s 2 --d 3\n")
    job = run_job(host, jobs, tmp_path, sample_prompts=prompts, sample_every_n_epochs=1)
    assert job.status == "done", job.error
    assert same_as(sd_model, before) == []        # bits, dtype, device, requires_grad of every tensor
    with open(ns.info.filename, "rb") as fh:      # the checkpoint file was never needed (model from memory):
        assert fh.read() == NOT_A_CHECKPOINT       # it is no checkpoint at all
    assert seen and all(s[0] for s in seen)       # generations waited for the whole run
    assert [s[2] for s in seen] == list(range(1, len(seen) + 1)) and seen[-1][1] == len(seen)
    assert seen[0][3].startswith("Epoch 1/1 · step 1/") and "\n" not in seen[0][3]
    assert "ETA" not in seen[0][3]          # one ETA on the bar: the WebUI's, computed to equal ours
    assert seen[0][4] == webui_host.task_id(job.id) and ns.progress.finished == [webui_host.task_id(job.id)]
    assert isinstance(state.current_image, Image.Image)       # the epoch's sample became the live preview
    assert not lock.locked() and state.job == "" and state.job_count == 0
    out = os.path.join(ns.shared.cmd_opts.lora_dir, "toy", "toy.safetensors")
    assert [o["path"] for o in job.outputs] == [out] and os.path.exists(out[:-12] + ".json")
    assert ns.networks.refreshes == 1                          # the Lora list knows the new file at once
    with safe_open(out, framework="pt") as fh:
        meta = fh.metadata()
    assert meta["ss_new_sd_model_hash"] == ns.info.sha256 and meta["ss_sd_model_hash"] == ns.info.hash
    assert meta["ss_sd_model_name"] == "tiny_sd1.safetensors"


def test_the_webui_interrupt_stops_the_run_and_the_model_is_unchanged(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    jobs = JobManager(host)
    before = snapshot(ns.shared.sd_model)

    def listener(job, event):
        if event.kind == STEP and event.data["step"] == 1:
            ns.shared.state.interrupt()          # the WebUI's Interrupt button / POST /sdapi/v1/interrupt
    job = run_job(host, jobs, tmp_path, listener, train_batch_size=1)
    assert job.status == "interrupted" and job.step < 4 and job.state_dir and os.path.isdir(job.state_dir)
    assert same_as(ns.shared.sd_model, before) == []
    assert not ns.call_queue.queue_lock.locked() and ns.shared.state.interrupted is False


def test_the_webui_stop_after_this_image_also_stops_the_run(tmp_path, webui):
    """With "Don't Interrupt in the middle" the WebUI's Interrupt first sets only stopping_generation."""
    w, ns = webui
    host = WebUIHost(w)
    jobs = JobManager(host)

    def listener(job, event):
        if event.kind == STEP and event.data["step"] == 1:
            ns.shared.state.stopping_generation = True
    job = run_job(host, jobs, tmp_path, listener, train_batch_size=1)
    assert job.status == "interrupted" and job.step < 4
    assert ns.shared.state.stopping_generation is False


def test_a_failing_run_releases_the_lock_and_restores_the_state(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    before = snapshot(ns.shared.sd_model)

    def runner(cfg, model, sink, stop):
        model.unet.requires_grad_(True)
        model.unet.train()
        raise RuntimeError("out of memory (pretend)")
    jobs = JobManager(host, runner=runner)
    job = run_job(host, jobs, tmp_path)
    assert job.status == "failed" and "out of memory" in job.error
    assert same_as(ns.shared.sd_model, before) == []
    assert not ns.call_queue.queue_lock.locked() and ns.shared.state.job == "" and ns.shared.state.ended == 1


def test_state_sink_and_interrupt_watcher(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    job = type("J", (), {"id": "abc", "output_name": "toy"})()
    stop = threading.Event()
    img = tmp_path / "s.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(img)
    with host.training_session(cfg_for(host, pretrained_model_name_or_path=str(tmp_path / "x.ckpt"))):
        sink = host.progress_sink(job, stop)
        st = ns.shared.state
        sink(Event(LOG, {"message": "caching latents\nsecond line"}))
        assert st.textinfo == "caching latents"
        sink(Event(START, {"total_steps": 20, "start_step": 0}))
        assert st.job_count == 20 and st.job_no == 0
        before = time.time()
        sink(Event(STEP, {"step": 3, "total_steps": 20, "epoch": 1, "epochs": 2, "loss": 0.123456,
                          "it_per_s": 0.25, "eta_s": 68.0}))
        after = time.time()
        assert st.job_no == 3 and st.textinfo == "Epoch 1/2 · step 3/20 · loss 0.1235 · 4.0 s/it"
        # the bar's one ETA is the engine's: 68 s at the moment the sink set it (the bar's ETA grows with the
        # clock, so it is <= 68 just before that moment and >= 68 just after, however long the call took)
        assert webui_bar_eta(st, before) <= 68.0 + 1e-6 and webui_bar_eta(st, after) >= 68.0 - 1e-6
        sink(Event(STEP, {"step": 4, "total_steps": 20, "epoch": 1, "epochs": 2, "eta_s": None}))
        assert webui_bar_eta(st) is not None                          # no estimate yet: the bar keeps its own
        sink(Event(SAMPLE, {"paths": [str(img)], "epoch": 1, "step": 3}))
        assert st.current_image.getpixel((0, 0)) == (255, 0, 0)
        assert not stop.is_set()
        st.interrupt()                               # no event needed: the watcher sees it
        assert stop.wait(5)
    assert "it/s" in step_text({"it_per_s": 2.5, "eta_s": 4000})


def webui_bar_eta(state, now=None):
    """The ETA the WebUI's /internal/progress computes (modules/progress.py, A1111 1.10), from shared.state, at
    the time `now` (default: the clock)."""
    progress = state.job_no / state.job_count if state.job_count > 0 else 0
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed = (time.time() if now is None else now) - state.time_start
    return elapsed / progress - elapsed if progress > 0 else None


class FakeDeepBooru:
    def __init__(self, lock):
        self.lock, self.calls = lock, []
        self.model = torch.nn.Module()
        self.model.tags = ["1girl", "rating:safe", "red_background"]
        self.model.forward = lambda x: torch.tensor([[0.9, 0.99, 0.4]])

    def start(self):
        self.calls.append(("start", self.lock.locked()))

    def stop(self):
        self.calls.append(("stop", self.lock.locked()))


class FakeInterrogator:
    def __init__(self, state):
        self.state, self.loaded = state, 0

    def load(self):
        self.loaded += 1

    def unload(self):
        self.loaded -= 1

    def generate_caption(self, image):
        self.state.begin("interrogate")       # what interrogate() does to an outer job's progress
        return "a red square"


def test_taggers_use_the_webui_models_under_the_lock_and_keep_the_progress(webui):
    w, ns = webui
    lock, st = ns.call_queue.queue_lock, ns.shared.state
    assert WebUIHost(w).taggers() is None
    w.deepbooru = type("M", (), {"model": FakeDeepBooru(lock)})()
    ns.shared.interrogator = FakeInterrogator(st)
    taggers = WebUIHost(w).taggers()
    st.job_count, st.job_no, st.textinfo = 10, 4, "Epoch 1"
    img = Image.new("RGB", (32, 32), (200, 0, 0))
    tags = taggers.deepbooru_tags(img)
    assert [t for t, _ in tags] == ["1girl", "red_background"] and tags[0][1] == pytest.approx(0.9)
    assert w.deepbooru.model.calls == [("start", True), ("stop", True)] and not lock.locked()
    assert taggers.blip_caption(img) == "a red square" and ns.shared.interrogator.loaded == 0
    assert (st.job_count, st.job_no, st.textinfo) == (10, 4, "Epoch 1")


def test_api_auth_dependency_like_the_webui():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    assert api_auth_dependencies(None) == [] and api_auth_dependencies("") == []
    app = FastAPI()
    app.add_api_route("/x", lambda: {"ok": True}, dependencies=[
        __import__("fastapi").Depends(d) for d in api_auth_dependencies("user:pass,other:pa:ss")])
    client = TestClient(app)
    assert client.get("/x").status_code == 401
    assert client.get("/x", auth=("user", "wrong")).status_code == 401
    assert client.get("/x", auth=("user", "pass")).json() == {"ok": True}
    assert client.get("/x", auth=("other", "pa:ss")).status_code == 200


def test_live_merge_through_the_webui_host_clears_lora_leftovers_and_restores_exactly(tmp_path, webui):
    """The Tools section's "Load into the live model": the WebUI host's live model merges into the loaded
    weights under the queue lock, starting from the checkpoint's own weights (the Lora extension's baked-in
    leftovers undone first), refuses while training, and restores bit for bit."""
    from lib_lora_train.hosts.live_merge import LiveMerger
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.networks import save_network_file
    from test_tools_support import random_network

    w, ns = webui
    host, sd_model, nets = WebUIHost(w), ns.shared.sd_model, ns.networks
    clean = snapshot(sd_model)
    proj_in = sd_model.model.diffusion_model.input_blocks._modules["1"]._modules["1"].proj_in
    nets.bake(proj_in)                                   # a generation with <lora:...> left this behind
    lora = tmp_path / "l.safetensors"
    base = load_sd_model(live_state_dict(sd_model))
    save_network_file(lora, random_network(base, "networks.lora", 4, 4, [], seed=3).save_tensors(), {})

    live = host.live_model
    assert live is not None and live.label()
    merger = LiveMerger(lambda: host.live_model)
    handle = merger.apply([str(lora)], [1.0], None)
    assert nets.loaded_networks == [] and proj_in.network_weights_backup is None
    changed = same_as(sd_model, clean)
    assert changed and all(k.startswith(("model.", "cond_stage_model.")) for k in changed)
    assert not w.call_queue.queue_lock.locked()          # taken for the write only
    merger.restore(handle)
    assert same_as(sd_model, clean) == []                # the checkpoint's weights, not the baked-in ones

    host._session = object()                              # a training run holds the model
    try:
        with pytest.raises(ConfigError, match="training"):
            merger.apply([str(lora)], [1.0], None)
    finally:
        host._session = None
    assert same_as(sd_model, clean) == []


def test_merged_checkpoints_are_listed_by_the_webui(webui):
    w, ns = webui
    calls = []
    w.sd_models.list_models = lambda: calls.append(1)
    WebUIHost(w).checkpoints_written(["x.safetensors"])
    assert calls == [1]


def test_live_merge_and_restore_drop_the_webui_cond_cache(tmp_path, webui, monkeypatch):
    """The WebUI caches the last prompt's conds keyed by prompt and settings, not by weights ("Persistent cond
    cache", on by default): after the text encoder changes in place, a repeated prompt must be encoded again
    (seen in the real v1.10.1: without this the merge's text-encoder part had no effect on the same prompt)."""
    import sys
    import types

    from lib_lora_train.hosts.live_merge import LiveMerger
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.networks import save_network_file
    from test_tools_support import random_network

    class StableDiffusionProcessing:
        cached_c, cached_uc = ["key", "c"], ["key", "uc"]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        cached_hr_c, cached_hr_uc = ["key", "hr_c"], ["key", "hr_uc"]

    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    monkeypatch.setitem(sys.modules, "modules.processing", processing)

    def caches():
        return [StableDiffusionProcessing.cached_c, StableDiffusionProcessing.cached_uc,
                StableDiffusionProcessingTxt2Img.cached_hr_c, StableDiffusionProcessingTxt2Img.cached_hr_uc]

    w, ns = webui
    host, sd_model = WebUIHost(w), ns.shared.sd_model
    lora = tmp_path / "l.safetensors"
    save_network_file(lora, random_network(load_sd_model(live_state_dict(sd_model)), "networks.lora", 4, 4, [],
                                           seed=3).save_tensors(), {})
    merger = LiveMerger(lambda: host.live_model)
    handle = merger.apply([str(lora)], [1.0], None)
    assert caches() == [[None, None]] * 4
    StableDiffusionProcessing.cached_c = ["key", "conds of the merged weights"]
    merger.restore(handle)
    assert caches() == [[None, None]] * 4


def test_tools_show_in_the_webui_progress_and_stop_on_its_interrupt(webui):
    """The Tools section's long jobs use the WebUI's progress state and Interrupt, as training does."""
    from lib_lora_train.events import PROGRESS
    from lib_lora_train.ui.tools_runner import ActionResult, ToolRunner

    w, ns = webui
    host = WebUIHost(w)
    state = ns.shared.state
    seen = []

    def tool(sink, stop):
        for i in range(200):
            if stop.is_set():
                return ActionResult(False, f"stopped at {i}")
            sink(Event(PROGRESS, {"stage": "merging", "done": i, "total": 200}))
            seen.append((state.job_count, state.job_no, state.textinfo))
            if i == 3:
                state.interrupt()                 # the WebUI's Interrupt button
                stop.wait(120)                    # the watcher turns it into `stop` (however loaded the machine)
            time.sleep(0.02)
        return ActionResult(True, "done")

    run = ToolRunner(host).start("Merge", tool)
    run.thread.join(180)
    assert run.result is not None and not run.result.ok and "stopped" in run.result.message
    assert seen[2] == (200, 2, "Merge: merging 2/200")
    assert state.interrupted is False and state.job_count == 0       # left clean for the next job

    host._session = object()                                          # a training run owns shared.state
    try:
        run = ToolRunner(host).start("Resize", lambda sink, stop: ActionResult(True, "ok"))
        run.thread.join(10)
        assert run.result.ok and state.job == ""
    finally:
        host._session = None
