"""The Forge 2.x host adapter on stand-ins (tests/forge_standins.py): host detection by structure, the lazy model
loaded through Forge's own reload entry point, training on Forge's loaded weights with its LoRA patches taken out,
quantized storage refused, Forge's model exactly as before after a run / an Interrupt, and the next generation's
LoRA patches exactly as before."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.errors import ConfigError, ModelError
from lib_lora_train.events import STEP
from lib_lora_train.hosts import detect
from lib_lora_train.hosts.forge import ForgeHost
from lib_lora_train.hosts.reforge import ReForgeHost
from lib_lora_train.hosts.webui import WebUIHost
from lib_lora_train.jobs import JobManager
from lib_lora_train.prep.project import create_project
from forge_standins import FakeInitialModel, forge_diff, forge_snapshot, forge_tensors, make_forge

FAST = {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "seed": 1, "cache_latents": True}


def spec_finder(*present):
    return lambda name: SimpleNamespace(name=name) if name in present else None


def test_host_kind_by_structure_not_version():
    forge_sd_models = SimpleNamespace(forge_model_reload=lambda: None)
    assert detect.host_kind(forge_sd_models, find_spec=spec_finder(
        "modules_forge", "backend", detect.FORGE_MEMORY)) == detect.FORGE
    # reForge: modules_forge + ldm_patched, A1111's sd_models (no forge_model_reload)
    assert detect.host_kind(SimpleNamespace(), find_spec=spec_finder(
        "modules_forge", "ldm_patched", detect.REFORGE_MEMORY)) == detect.REFORGE
    assert detect.host_kind(SimpleNamespace(), find_spec=spec_finder()) == detect.A1111
    # an unrelated `backend` package or a lone forge_model_reload does not make a Forge
    assert detect.host_kind(forge_sd_models, find_spec=spec_finder("backend")) == detect.A1111
    assert detect.host_kind(SimpleNamespace(), find_spec=spec_finder(
        "modules_forge", "backend", detect.FORGE_MEMORY)) == detect.A1111

    def broken(name):
        raise ValueError(name)
    assert detect.host_kind(forge_sd_models, find_spec=broken) == detect.A1111
    from lib_lora_train.hosts.adapters import host_class
    assert host_class(detect.FORGE) is ForgeHost and host_class(detect.REFORGE) is ReForgeHost
    assert host_class(detect.A1111) is WebUIHost


@pytest.fixture
def forge(tmp_path):
    return make_forge(tmp_path)


def toy_job(host, jobs, tmp_path, listener=None, **config):
    proj = create_project(host.paths.project_dir("toy"), "toy", trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=4)
    from lib_lora_train.demo.toy import FOLDER
    shutil.move(str(src / FOLDER), os.path.join(proj.train_dir, "1_zkz"))
    if listener:
        jobs.listeners.append(listener)
    job = jobs.submit("toy", {**FAST, **config})
    return jobs.wait(job.id, timeout=900)     # a safety net on a loaded machine, not a speed check


def test_the_session_loads_through_forge_and_trains_on_its_weights_without_lora_patches(forge):
    w, ns = forge
    host = ForgeHost(w, memory=ns.memory)
    assert isinstance(ns.shared.sd_model, FakeInitialModel) and host.model_family() == "sd1"
    cfg = config_from_dict({**host.base_config(), **FAST})
    with host.training_session(cfg) as model:
        assert ns.call_queue.queue_lock.locked()
        engine = ns.reloads[0]                  # Forge's own entry point loaded the selected checkpoint
        assert ns.shared.sd_model is engine
        original = forge_snapshot(engine)
    assert ns.reloads == [engine]
    engine.apply_lora()                          # a generation with <lora:x> patched the weights
    patched = forge_snapshot(engine)
    assert forge_diff(engine, original)         # the patches are in Forge's weights now
    with host.training_session(cfg) as model:
        assert ns.reloads == [engine]           # already loaded: not loaded again
        assert forge_diff(engine, original) == []     # the originals are back before the run
        unet_file = {k[len("model.diffusion_model."):]: t for k, t in ns.state_dict.items()
                     if k.startswith("model.diffusion_model.")}
        from lib_lora_train.models.convert import unet_ldm_to_diffusers
        expected = unet_ldm_to_diffusers(unet_file)
        got = model.unet.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert not any(t.is_inference() for t in got.values())    # autograd can save them for backward
        # ... and they are Forge's memory, not a copy (a copy would double the model's RAM: SDXL would not fit)
        unet_shared, unet_total = model.info.extra["webui_shared_unet_tensors"]
        te_shared, te_total = model.info.extra["webui_shared_text_encoder_tensors"]
        assert unet_shared == unet_total == len(got) and te_shared == te_total > 0
        assert model.info.extra["forge_new_tensors"] == 0 and model.info.family == "sd1"
    assert ns.memory.unloads == 2 and ns.memory.empties >= 4    # one unload per run, cache emptied after
    assert not ns.call_queue.queue_lock.locked()
    # The next generation asks for the same LoRA: the loader patches again and gets the same weights.
    for patcher in (engine.forge_objects.unet, engine.forge_objects.clip.patcher):
        patcher.model.lora_loader.refresh(patcher.lora_patches)
    assert forge_diff(engine, patched) == []


def test_a_forge_run_leaves_forge_model_bit_identical_and_writes_what_forge_reads(tmp_path, forge):
    w, ns = forge
    host = ForgeHost(w, memory=ns.memory)
    jobs = JobManager(host)
    ns.sd_models.forge_model_reload()
    engine = ns.shared.sd_model
    before = forge_snapshot(engine)
    seen = []
    make_sink = host.progress_sink

    def progress_sink(job, stop):            # shared.state right after each step's event went through the sink
        sink = make_sink(job, stop)

        def record(event):
            sink(event)
            if event.kind == STEP:
                seen.append((ns.shared.state.job_no, ns.shared.state.job_count, ns.call_queue.queue_lock.locked()))
        return record
    host.progress_sink = progress_sink
    job = toy_job(host, jobs, tmp_path)
    assert job.status == "done", job.error
    assert forge_diff(engine, before) == []
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and seen[-1][1] == len(seen)
    assert all(s[2] for s in seen)               # Forge's generations waited for the run (its queue lock)
    assert ns.progress.finished == [host.progress_task_id(job.id)]
    assert ns.networks.refreshes == 1            # Forge's Lora list (networks.list_available_networks)
    out = os.path.join(ns.shared.cmd_opts.lora_dir, "toy", "toy.safetensors")
    with safe_open(out, framework="pt") as fh:
        meta = fh.metadata()
    # Forge's Lora list decides a file's version from these keys (sd_forge_lora/network.py detect_version)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" or meta["modelspec.implementation"].startswith("https")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_new_sd_model_hash"] == ns.info.sha256


def test_forge_interrupt_stops_the_run_and_the_model_is_unchanged(tmp_path, forge):
    w, ns = forge
    host = ForgeHost(w, memory=ns.memory)
    jobs = JobManager(host)
    engine, _ = ns.sd_models.forge_model_reload()
    before = forge_snapshot(engine)

    def listener(job, event):
        if event.kind == STEP and event.data["step"] == 1:
            ns.shared.state.interrupt()
    job = toy_job(host, jobs, tmp_path, listener, train_batch_size=1)
    assert job.status == "interrupted" and job.step < 4
    assert forge_diff(engine, before) == []
    assert not ns.call_queue.queue_lock.locked() and ns.shared.state.interrupted is False


@pytest.mark.parametrize("storage, message", [("nf4", "nf4"), ("gguf", "gguf"),
                                              (torch.float8_e4m3fn, "fp8 (float8_e4m3fn)")])
def test_quantized_storage_is_refused_with_what_to_change(tmp_path, storage, message):
    if isinstance(storage, str):
        w, ns = make_forge(tmp_path, storage_dtype=storage)
    else:
        w, ns = make_forge(tmp_path, dtype=storage)
    host = ForgeHost(w, memory=ns.memory)
    cfg = config_from_dict({**host.base_config(), **FAST})
    with pytest.raises(ConfigError, match="Diffusion in Low Bits") as err:
        with host.training_session(cfg):
            pass
    assert message in str(err.value)
    assert not ns.call_queue.queue_lock.locked() and ns.shared.state.job == ""


def test_another_engine_is_refused_and_a_named_file_is_read_instead(tmp_path, forge):
    w, ns = forge
    host = ForgeHost(w, memory=ns.memory)
    engine, _ = ns.sd_models.forge_model_reload()
    engine.is_sd1 = False                          # e.g. Flux: none of the SD flags
    cfg = config_from_dict({**host.base_config(), **FAST})
    with pytest.raises(ModelError, match="SD 1.x, SD 2.x and SDXL"):
        with host.training_session(cfg):
            pass
    other = config_from_dict({**host.base_config(), **FAST,
                              "pretrained_model_name_or_path": str(tmp_path / "other.safetensors")})
    with host.training_session(other) as model:
        assert model is None                      # the engine reads that file itself
    assert not ns.call_queue.queue_lock.locked()


def test_forge_tensors_are_inference_tensors_like_forge_loads_them(forge):
    _w, ns = forge
    engine, reloaded = ns.sd_models.forge_model_reload()
    assert reloaded and all(t.is_inference() for t in forge_tensors(engine).values())
    assert ns.sd_models.forge_model_reload() == (engine, False)


def test_forge_sdxl_model_is_rebuilt_under_the_checkpoint_keys(tmp_path):
    """SDXL in Forge: the UNet, the VAE, CLIP-L and bigG (transformers layout) give the engine the sgm state dict
    the file has, bigG's fused attention and projection included."""
    from lib_lora_train.hosts.forge_model import forge_state_dict
    from lib_lora_train.models import load_sd_model, tiny_sdxl_state_dict
    from forge_standins import ForgeSDXLStandIn

    sd = tiny_sdxl_state_dict(seed=0)
    engine = ForgeSDXLStandIn(sd, None)
    tensors, new = forge_state_dict(engine)
    assert not any(t.is_inference() for t in tensors.values())
    # only bigG's fused q/k/v and its [w, p] projection are new; everything else is Forge's memory
    fused = [k for k in tensors if k.endswith(("in_proj_weight", "in_proj_bias", "model.text_projection"))]
    assert len(fused) == 2 * 3 + 1 and new == len(fused)
    forge_ptrs = {t.untyped_storage().data_ptr() for t in forge_tensors(engine).values()}
    assert all(tensors[k].untyped_storage().data_ptr() in forge_ptrs for k in tensors if k not in fused)
    for key, t in sd.items():
        if key.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.")) \
                and not key.endswith("position_ids"):
            assert key in tensors and torch.equal(tensors[key], t), key
    model = load_sd_model(tensors)
    assert model.info.family == "sdxl" and model.text_encoder_2 is not None


def test_forge_sd2_trains_on_forge_model_whose_text_encoder_is_one_layer_short():
    """SD 2.x in Forge: OpenCLIP-H is held with the file's last layer already cut (as the engine's loader cuts it);
    the engine's model built from Forge's memory equals the one read from the file, every tensor shared."""
    from lib_lora_train.hosts.forge_model import engine_model
    from lib_lora_train.models import load_sd_model, tiny_sd2_state_dict
    from forge_standins import ForgeSD2StandIn

    sd = tiny_sd2_state_dict(seed=0, v_pred=True)
    engine = ForgeSD2StandIn(sd, None)
    engine.forge_objects.unet.model.predictor.prediction_type = "v_prediction"
    lines = []
    model = engine_model(engine, lines.append)
    from_file = load_sd_model(sd, overrides={"prediction_type": "v_prediction"})
    assert model.info.family == "sd2" and model.info.prediction_type == "v_prediction"
    for mine, ref in ((model.text_encoder, from_file.text_encoder), (model.unet, from_file.unet),
                      (model.vae, from_file.vae)):
        a, b = mine.state_dict(), ref.state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    unet_shared, unet_total = model.info.extra["webui_shared_unet_tensors"]
    te_shared, te_total = model.info.extra["webui_shared_text_encoder_tensors"]
    assert unet_shared == unet_total
    # q/k/v come from OpenCLIP's fused tensor, which Forge does not hold (built for the run); the rest is shared
    qkv = sum(1 for k in model.text_encoder.state_dict() if ".self_attn." in k and "out_proj" not in k)
    assert qkv > 0 and te_shared == te_total - qkv
    assert "sd2" in lines[0] and "no copy" in lines[0]


def test_an_inference_tensor_is_re_viewed_for_autograd_without_a_copy():
    """What lets the run share Forge's weights: the alias is a plain tensor on the same memory, autograd can save
    it for backward (the inference tensor itself cannot), and gradients through it are the same."""
    from lib_lora_train.hosts.forge_model import plain_alias

    with torch.inference_mode():
        lin = torch.nn.Linear(3, 2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        torch.nn.functional.linear(x, lin.weight.detach()).sum().backward()
    w = plain_alias(lin.weight)
    assert not w.is_inference() and w.data_ptr() == lin.weight.data_ptr() and torch.equal(w, lin.weight)
    torch.nn.functional.linear(x, w).sum().backward()
    assert torch.equal(x.grad, lin.weight.detach().sum(0).expand(4, 3))   # d/dx sum(x W^T) = column sums of W
    plain = torch.ones(2)
    assert plain_alias(plain) is not None and plain_alias(plain).data_ptr() == plain.data_ptr()


def test_reforge_cpu_text_encoder_dtypes_explain_the_unshared_tensors(tmp_path):
    """reForge on a CPU: its memory manager puts CLIP in fp16 (text_encoder_dtype) while ldm_patched's sd1_clip
    keeps the token and position embeddings in fp32. The engine's text encoder has one dtype (the one holding most
    elements), so exactly the tensors of the other dtype are cast for the run and every other one stays shared. In
    the full-size CLIP-L the fp16 layers hold most elements: the two fp32 embeddings are cast (the 194/196 seen in
    the real reForge); in this tiny CLIP the 49408-token embedding is the bigger part, so the layers are."""
    from lib_lora_train.hosts.webui_model import engine_model
    from forge_standins import make_reforge

    _w, ns = make_reforge(tmp_path)
    sd_model = ns.shared.sd_model
    te = sd_model.cond_stage_model
    te.half()
    embeddings = [m for n, m in te.named_modules() if n.endswith("text_model.embeddings")]
    assert len(embeddings) == 1
    embeddings[0].float()
    live = {k: t for k, t in te.state_dict().items() if not k.endswith("position_ids")}
    elements = {dt: sum(t.numel() for t in live.values() if t.dtype == dt) for dt in (torch.float16, torch.float32)}
    dominant = max(elements, key=elements.get)
    model = engine_model(sd_model, lambda line: None)
    assert model.text_encoder.dtype == dominant
    unet_shared, unet_total = model.info.extra["webui_shared_unet_tensors"]
    te_shared, te_total = model.info.extra["webui_shared_text_encoder_tensors"]
    other = sum(1 for t in live.values() if t.dtype != dominant)
    assert unet_shared == unet_total and 0 < other < te_total and te_total - te_shared == other
