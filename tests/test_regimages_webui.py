"""Regularisation images inside the WebUI (hosts/webui_regimages.py), with stand-ins of its modules: drawn by its
txt2img with the class prompt (no LoRA), its sampler split, fixed seeds, nothing saved to its outputs, keyed by
the loaded checkpoint's sha256; the queue lock taken outside a run and not again inside one; an image cut short
by the WebUI's Interrupt never kept; a project run on the loaded model draws them through the WebUI."""
import os
import shutil

import pytest
from PIL import Image

from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.errors import Interrupted, ModelError
from lib_lora_train.hosts.webui import WebUIHost
from lib_lora_train.jobs import JobManager
from lib_lora_train.prep.project import create_project
from lib_lora_train.prep.regimages import RegRequest, generate_for_project, generate_reg_images
from test_webui_previews import ProcessingStandIn
from webui_standins import make_webui


@pytest.fixture
def webui(tmp_path):
    w, ns = make_webui(tmp_path)
    w.processing = ProcessingStandIn(ns)
    return w, ns


def test_drawn_by_the_webui_txt2img_under_its_lock(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    lock = ns.call_queue.queue_lock
    seen_locked = []
    original = w.processing.process_images

    def process(p):
        seen_locked.append(lock.locked())
        return original(p)
    w.processing.process_images = process
    ns.shared.opts.data["CLIP_stop_at_last_layers"] = 2
    proj = create_project(host.paths.project_dir("toy"), "toy")
    req = RegRequest(prompt="a photo of a woman", count=2, width=64, height=72, negative_prompt="blurry",
                     steps=3, cfg_scale=6, seed=40)
    out = generate_for_project(host, proj, req)
    calls = w.processing.calls
    assert [(p.prompt, p.negative_prompt, p.seed, p.steps, p.cfg_scale, p.width, p.height) for p in calls] == \
        [("a photo of a woman", "blurry", 40 + i, 3, 6.0, 64, 72) for i in range(2)]
    assert all((p.sampler_name, p.scheduler) == ("DPM++ 2M", "Karras") for p in calls)
    assert all(p.do_not_save_samples and p.do_not_save_grid and p.closed for p in calls)
    assert seen_locked == [True, True] and not lock.locked() and lock.acquired == 1
    assert out["backend"] == "webui" and out["model_id"] == "sha256:" + "ab" * 32 + ";CLIP_stop_at_last_layers=2"
    assert out["reg_data_dir"].startswith(os.path.join(proj.root, "reg_cache"))
    with Image.open(out["images"][1]) as im:
        assert im.convert("RGB").getpixel((0, 0)) == (10, 200, 30) and "Seed: 41" in im.info["parameters"]
    # cached: the second request draws nothing; another checkpoint is another key
    assert generate_for_project(host, proj, req)["generated"] == 0 and len(calls) == 2
    ns.shared.sd_model.sd_checkpoint_info.sha256 = "cd" * 32
    assert generate_for_project(host, proj, req)["generated"] == 2


def test_inside_a_run_the_lock_is_not_taken_again_and_an_interrupt_keeps_no_image(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    lock = ns.call_queue.queue_lock
    original = w.processing.process_images
    pressed = []

    def process(p):
        out = original(p)
        if p.seed == 2 and not pressed:
            pressed.append(1)
            ns.shared.state.interrupted = True        # the WebUI's Interrupt during the third image
        return out
    w.processing.process_images = process
    req = RegRequest(prompt="1girl", count=4, width=64, height=64, steps=2)
    lock.acquire()                                    # the training session holds it
    try:
        with host.reg_image_source(take_lock=False) as (model_id, backend, render):
            with pytest.raises(Interrupted, match="interrupted in the WebUI"):
                generate_reg_images(req, model_id=model_id, backend=backend, render=render,
                                    cache_root=str(tmp_path / "cache"))
    finally:
        lock.release()
    (key,) = os.listdir(tmp_path / "cache")
    folder = tmp_path / "cache" / key / "1_1girl"
    assert sorted(os.listdir(folder)) == ["reg_00000.png", "reg_00000.txt", "reg_00001.png", "reg_00001.txt"]
    with host.reg_image_source() as (model_id, backend, render):
        done = generate_reg_images(req, model_id=model_id, backend=backend, render=render,
                                   cache_root=str(tmp_path / "cache"))
    assert (done.reused, done.generated) == (2, 2)     # a new request starts clear of the old Interrupt


def test_no_loaded_checkpoint_is_a_clear_error(tmp_path, webui):
    w, ns = webui
    ns.shared.sd_model = None
    with pytest.raises(ModelError, match="no checkpoint loaded"):
        with WebUIHost(w).reg_image_source():
            pass
    assert not ns.call_queue.queue_lock.locked()


def test_a_project_run_on_the_loaded_model_draws_them_with_the_webui(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    jobs = JobManager(host)
    proj = create_project(host.paths.project_dir("toy"), "toy", trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=2)
    (first,) = [n for n in sorted(os.listdir(src)) if os.path.isdir(src / n)][:1]
    shutil.move(str(src / first), os.path.join(proj.train_dir, "1_zkz"))
    job = jobs.submit("toy", {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 2,
                              "network_alpha": 1, "learning_rate": 1e-3, "seed": 1,
                              "reg_images_prompt": "a toy", "reg_images_steps": 2, "prior_loss_weight": 0.5})
    job = jobs.wait(job.id, timeout=120)
    assert job.status == "done", job.error
    assert [p.prompt for p in w.processing.calls] == ["a toy", "a toy"]      # one epoch's 2 samples
    (key,) = os.listdir(os.path.join(proj.root, "reg_cache"))
    assert sorted(os.listdir(os.path.join(proj.root, "reg_cache", key, "1_a toy"))) == \
        ["reg_00000.png", "reg_00000.txt", "reg_00001.png", "reg_00001.txt"]
    assert any("drawn by the webui sampler" in line for line in job.log), job.log
