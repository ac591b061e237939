"""Training previews made by the WebUI's own pipeline (hosts/webui_previews.py) and the engine's hook for them
(train(preview_renderer=...)): the prompt gets <lora:STEM:W>, the sampler name is split the WebUI's way, the
progress fields and the weights the run trains on are put back exactly, a failure falls back to the built-in
sampler with a warning, and the renderer sees the network as it is at that moment."""
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.errors import ModelError
from lib_lora_train.events import WARNING
from lib_lora_train.hosts.webui import WebUIHost
from lib_lora_train.hosts.webui_previews import make_preview_renderer
from lib_lora_train.jobs import JobManager
from lib_lora_train.models import write_tiny_checkpoint
from lib_lora_train.networks import read_network_file
from lib_lora_train.prep.project import create_project
from lib_lora_train.record import read_events, read_run_record
from lib_lora_train.sampling.prompts import PromptSpec
from lib_lora_train.training.loop import train
from webui_standins import make_webui, same_as, snapshot

LORA_TOKEN = re.compile(r"<lora:([^:>]+):([^>]+)>")


class SamplersStandIn:
    """modules.sd_samplers: names and the scheduler-suffix split (A1111 1.10 rules, convert_automatic=False)."""
    schedulers = ["Automatic", "Uniform", "Karras", "Exponential"]

    def __init__(self):
        self.samplers = [SimpleNamespace(name=n) for n in ("DPM++ 2M", "Euler a", "Euler", "DDIM")]
        self.samplers_map = {s.name.lower(): s.name for s in self.samplers}

    def get_sampler_and_scheduler(self, name, scheduler, *, convert_automatic=True):
        found = "Automatic"
        for label in self.schedulers:
            if name.endswith(" " + label):
                found, name = label, name[:-(len(label) + 1)]
                break
        return self.samplers_map.get(name.lower(), "DPM++ 2M"), found


class ProcessingStandIn:
    """modules.processing: process_images records p, changes shared.state as the real one does, and the Lora
    extension "applies" the LoRA named in the prompt (when its file is in the Lora folder) by merging a change
    into a layer of the loaded model, in place, originals backed up."""

    def __init__(self, ns, fail=False):
        self.ns, self.fail, self.calls = ns, fail, []
        self.sd_samplers = SamplersStandIn()
        processing = self

        class Txt2Img:
            def __init__(self, **kw):
                self.__dict__.update(kw)
                self.closed = False

            def close(self):
                self.closed = True
        self.StableDiffusionProcessingTxt2Img = Txt2Img
        self.processing = processing

    def _find(self, stem):
        for root, _, files in os.walk(self.ns.shared.cmd_opts.lora_dir):
            if stem + ".safetensors" in files:
                return os.path.join(root, stem + ".safetensors")
        return None

    def process_images(self, p):
        self.calls.append(p)
        state, nets = self.ns.shared.state, self.ns.networks
        state.job_count, state.job_no, state.textinfo = 1, 1, "Batch 1 out of 1"
        state.sampling_step, state.sampling_steps = p.steps, p.steps
        names = [m.group(1) for m in LORA_TOKEN.finditer(p.prompt)]
        nets.load_networks([n for n in names if self._find(n)])
        layer = _layer(p.sd_model)
        for name in nets.loaded_networks:     # like the extension: merged once while the same set stays wanted
            if getattr(layer, "network_current_names", ()) != ((name, 1.0, 1.0, None),):
                nets.bake(layer, name=name, scale=0.5)
        if self.fail:
            raise RuntimeError("sampler exploded (pretend)")
        img = Image.new("RGB", (p.width, p.height), (10, 200, 30))
        return SimpleNamespace(images=[img], infotexts=[f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}"
                                                        f", Schedule type: {p.scheduler}, Seed: {p.seed}"],
                               all_seeds=[p.seed if p.seed != -1 else 1234])


def _layer(sd_model):
    """A UNet attention projection of the loaded model (its tensor is shared with the engine's UNet)."""
    return next(m for n, m in sd_model.named_modules() if n.startswith("model.diffusion_model.")
                and n.endswith("attn1.to_q"))


@pytest.fixture
def webui(tmp_path):
    w, ns = make_webui(tmp_path)
    w.processing = ProcessingStandIn(ns)
    return w, ns


def _busy_state(state):
    state.job, state.job_no, state.job_count, state.textinfo = "lora-train", 3, 10, "step 3/10"
    state.sampling_step, state.sampling_steps = 0, 0
    return {k: getattr(state, k) for k in ("job", "job_no", "job_count", "textinfo", "sampling_step",
                                           "sampling_steps")}


def test_renderer_prompt_sampler_state_and_weights(tmp_path, webui):
    w, ns = webui
    proc = w.processing
    lora = os.path.join(ns.shared.cmd_opts.lora_dir, "toy", "sample", ".preview-toy.safetensors")
    os.makedirs(os.path.dirname(lora))
    open(lora, "wb").close()
    render = WebUIHost(w).preview_renderer
    specs = [PromptSpec("zkz, thing", negative_prompt="blurry", width=64, height=72, steps=3, seed=5, scale=6.0,
                        sampler="dpm++_2m_karras"),
             PromptSpec("tag1", steps=2, sampler="euler_a", index=1)]
    before = snapshot(ns.shared.sd_model)
    saved = _busy_state(ns.shared.state)
    lock = ns.call_queue.queue_lock
    lock.acquire()            # the training session holds it: the renderer must not take it again
    try:
        images = render(lora, specs, 0.8)
    finally:
        lock.release()
    assert [p.prompt for p in proc.calls] == ["zkz, thing <lora:.preview-toy:0.8>", "tag1 <lora:.preview-toy:0.8>"]
    first, second = proc.calls
    assert (first.sampler_name, first.scheduler) == ("DPM++ 2M", "Karras")
    assert (second.sampler_name, second.scheduler) == ("Euler a", "Automatic")
    assert (first.negative_prompt, first.steps, first.cfg_scale, first.seed, first.width, first.height) == \
        ("blurry", 3, 6.0, 5, 64, 72)
    assert second.seed == -1 and (second.width, second.height) == (512, 512)
    assert all(p.do_not_save_samples and p.do_not_save_grid and p.closed for p in proc.calls)
    assert first.sd_model is ns.shared.sd_model
    assert len(images) == 2 and images[0].size == (64, 72)
    assert "Schedule type: Karras" in images[0].info["parameters"] and images[0].info["seed"] == 5
    # the LoRA was merged while rendering; afterwards every tensor is bit-identical and nothing stays loaded
    assert same_as(ns.shared.sd_model, before) == []
    assert ns.networks.loaded_networks == [] and _layer(ns.shared.sd_model).network_weights_backup is None
    assert {k: getattr(ns.shared.state, k) for k in saved} == saved


def test_renderer_error_and_lora_outside_the_folder_restore_everything(tmp_path, webui):
    w, ns = webui
    lora = os.path.join(ns.shared.cmd_opts.lora_dir, "toy", ".preview-toy.safetensors")
    os.makedirs(os.path.dirname(lora))
    open(lora, "wb").close()
    before = snapshot(ns.shared.sd_model)
    saved = _busy_state(ns.shared.state)
    w.processing.fail = True
    with pytest.raises(RuntimeError, match="exploded"):
        make_preview_renderer(w, WebUIHost(w)._clear_networks)(lora, [PromptSpec("x", steps=2)], 1.0)
    assert same_as(ns.shared.sd_model, before) == [] and ns.networks.loaded_networks == []
    assert {k: getattr(ns.shared.state, k) for k in saved} == saved
    w.processing.fail = False
    outside = tmp_path / "elsewhere" / ".preview-toy2.safetensors"
    outside.parent.mkdir()
    outside.write_bytes(b"")
    with pytest.raises(ModelError, match="did not load"):
        make_preview_renderer(w, WebUIHost(w)._clear_networks)(str(outside), [PromptSpec("x", steps=2)], 1.0)


# ------------------------------------------------------------------ the engine's hook


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    write_tiny_checkpoint(str(path), seed=0)
    return str(path)


def test_engine_calls_the_renderer_with_the_network_of_that_moment(ckpt, tmp_path):
    src = make_toy_dataset(tmp_path / "src", n_images=2)
    (tmp_path / "prompts.txt").write_text("zkz, thing --w 64 --h 64 --s 2 --d 5\ntag1 --s 2 --ss euler_a\n")
    seen = []

    def renderer(path, specs, weight):
        tensors, meta = read_network_file(path)
        seen.append((path, [s.sampler for s in specs], weight, int(meta["ss_epoch"]), meta["ss_output_name"],
                     {k: v.clone() for k, v in tensors.items()}))
        if len(seen) == 1:
            raise RuntimeError("the WebUI is busy (pretend)")
        return [Image.new("RGB", (64, 64), (len(seen), 0, 0)) for _ in specs]

    cfg = config_from_dict(dict(
        pretrained_model_name_or_path=ckpt, train_data_dir=str(src), output_dir=str(tmp_path / "out"),
        output_name="demo", resolution="64", network_dim=4, network_alpha=2, learning_rate=1e-2,
        max_train_epochs=2, train_batch_size=2, seed=1, cache_latents=True, device="cpu", save_every_n_epochs=1,
        save_precision="fp16", sample_prompts=str(tmp_path / "prompts.txt"), sample_every_n_epochs=1,
        sample_at_first=True))
    result = train(cfg, preview_renderer=renderer)
    assert [s[3] for s in seen] == [0, 1, 2]
    preview = os.path.join(str(tmp_path / "out"), "sample", ".preview-demo.safetensors")
    assert all(s[0] == preview for s in seen) and not os.path.exists(preview)
    assert seen[1][1] == ["dpm++_2m_karras", "euler_a"] and seen[1][2] == 1.0 and seen[1][4] == "demo"
    for (_, _, _, epoch, _, tensors), name in zip(seen[1:], ["demo-000001", "demo"]):
        saved, _ = read_network_file(str(tmp_path / "out" / f"{name}.safetensors"))
        assert tensors.keys() == saved.keys() and all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert not all(torch.equal(seen[1][5][k], seen[2][5][k]) for k in seen[1][5])   # it trained in between
    warnings = [e for e in read_events(result.record_path.replace(".run.json", ".events.jsonl"))
                if e["kind"] == WARNING and e["message"].startswith("previews")]
    assert len(warnings) == 1 and "busy" in warnings[0]["message"]
    samples = read_run_record(result.record_path)["samples"]
    assert [s["epoch"] for s in samples] == [0, 1, 2] and all(len(s["paths"]) == 2 for s in samples)
    for s in samples:
        for path in s["paths"]:
            with Image.open(path) as im:
                px = im.convert("RGB").getpixel((0, 0))
            if s["epoch"] == 0:       # the fallback: the built-in sampler's image, not the renderer's
                assert px not in [(1, 0, 0)]
            else:
                assert px == (s["epoch"] + 1, 0, 0)


def test_a_webui_run_makes_its_previews_with_the_webui_and_leaves_the_model_bit_identical(tmp_path, webui):
    w, ns = webui
    host = WebUIHost(w)
    jobs = JobManager(host)
    proj = create_project(host.paths.project_dir("toy"), "toy", trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=2)
    shutil.move(str(src / "10_zkz"), os.path.join(proj.train_dir, "1_zkz"))
    prompts = os.path.join(host.paths.project_dir("toy"), "prompts.txt")
    with open(prompts, "w") as f:
        f.write("zkz --w 64 --h 64 --s 3 --d 7\n")
    before = snapshot(ns.shared.sd_model)
    job = jobs.submit("toy", {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 4,
                              "network_alpha": 2, "learning_rate": 1e-3, "seed": 1, "cache_latents": True,
                              "sample_prompts": prompts, "sample_every_n_epochs": 1,
                              "sample_weight": 0.7, "clip_skip": 2})
    job = jobs.wait(job.id, timeout=120)
    assert job.status == "done", job.error
    # the run's preview settings, not the WebUI's: the LoRA at sample_weight, the run's clip skip
    assert [p.prompt for p in w.processing.calls] == ["zkz <lora:.preview-toy:0.7>"]
    assert w.processing.calls[0].override_settings == {"CLIP_stop_at_last_layers": 2}
    assert w.processing.calls[0].override_settings_restore_afterwards is True
    assert (w.processing.calls[0].sampler_name, w.processing.calls[0].scheduler) == ("DPM++ 2M", "Karras")
    paths = [p for s in job.samples for p in s["paths"]]
    assert len(paths) == 1 and os.path.exists(paths[0])
    with Image.open(paths[0]) as im:
        assert "Schedule type: Karras" in im.info["parameters"]
    assert same_as(ns.shared.sd_model, before) == [] and ns.networks.loaded_networks == []
    assert not any(n.startswith(".preview") for n in os.listdir(os.path.join(host.lora_dir(), "toy", "sample")))


def test_preview_settings_are_checked_with_the_config():
    from lib_lora_train.errors import ConfigError

    cfg = config_from_dict({"sample_weight": "0.5", "sample_clip_skip": "2"})
    assert (cfg.sample_weight, cfg.sample_clip_skip) == (0.5, 2)
    assert config_from_dict({}).sample_weight == 1.0 and config_from_dict({}).sample_clip_skip is None
    for bad in ({"sample_weight": 9}, {"sample_weight": float("nan")}, {"sample_clip_skip": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            config_from_dict(bad)


def test_an_sdxl_run_makes_its_previews_with_the_webui_and_leaves_the_model_bit_identical(tmp_path):
    """The same on the WebUI's loaded SDXL model: the LoRA (lora_te1_ / lora_te2_ / sgm U-Net names, as the
    WebUI's Lora extension reads them) goes through its txt2img, and the model comes back bit for bit."""
    w, ns = make_webui(tmp_path, family="sdxl")
    w.processing = ProcessingStandIn(ns)
    host = WebUIHost(w)
    jobs = JobManager(host)
    proj = create_project(host.paths.project_dir("toy"), "toy", trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=2)
    shutil.move(str(src / "10_zkz"), os.path.join(proj.train_dir, "1_zkz"))
    prompts = os.path.join(host.paths.project_dir("toy"), "prompts.txt")
    with open(prompts, "w") as f:
        f.write("zkz --w 64 --h 64 --s 2 --d 7\n")
    before = snapshot(ns.shared.sd_model)
    seen = []

    def process(p):
        lora = os.path.join(host.lora_dir(), "toy", "sample", ".preview-toy.safetensors")
        tensors, meta = read_network_file(lora)
        encoders = sorted({k.split("_")[1] for k in tensors if k.startswith("lora_te")})
        seen.append((encoders, meta["ss_base_model_version"]))
        return original(p)
    original, w.processing.process_images = w.processing.process_images, process
    job = jobs.wait(jobs.submit("toy", {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2,
                                        "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "seed": 1,
                                        "cache_latents": True, "sample_prompts": prompts,
                                        "sample_every_n_epochs": 1}).id, timeout=300)
    assert job.status == "done", job.error
    assert [p.prompt for p in w.processing.calls] == ["zkz <lora:.preview-toy:1>"]
    assert seen == [(["te1", "te2"], "sdxl_base_v1-0")]
    assert same_as(ns.shared.sd_model, before) == [] and ns.networks.loaded_networks == []
