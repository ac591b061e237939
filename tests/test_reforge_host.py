"""The reForge host adapter on stand-ins: the A1111-shaped model with `forge_objects` is trained in memory (not
read from the file, as the A1111 adapter does for anything with forge_objects), a LoRA its memory manager left
merged is taken out by unloading through that manager first, and the model is bit-identical afterwards."""
import os
import shutil

import torch

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.hosts.reforge import ReForgeHost
from lib_lora_train.hosts.webui import WebUIHost
from lib_lora_train.jobs import JobManager
from lib_lora_train.prep.project import create_project
from forge_standins import make_reforge, reforge_lora_merged
from webui_standins import same_as, snapshot

FAST = {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "seed": 1, "cache_latents": True}


def write_junk_checkpoint(ns):
    """The API wants the checkpoint file to exist; reading it as one would fail, so a run that works never read it."""
    with open(ns.info.filename, "wb") as fh:
        fh.write(b"not a checkpoint")


def test_reforge_trains_on_the_loaded_model_with_the_merged_lora_taken_out(tmp_path):
    w, ns = make_reforge(tmp_path)
    host = ReForgeHost(w, memory=ns.memory)
    sd_model = ns.shared.sd_model
    clean = snapshot(sd_model)
    cfg = config_from_dict({**host.base_config(), **FAST})
    with WebUIHost(w).training_session(cfg) as model:
        assert model is None            # the A1111 adapter reads the file of a model with forge_objects
    with reforge_lora_merged(ns) as patcher:
        assert same_as(sd_model, clean)       # the LoRA is in the weights now
        with host.training_session(cfg) as model:
            assert same_as(sd_model, clean) == []       # unloaded through the manager: originals back
            assert ns.memory.unloads == 1 and not patcher.backup
            shared, total = model.info.extra["webui_shared_unet_tensors"]
            assert shared == total > 0                  # the loaded tensors themselves, no copy
            live = dict(sd_model.model.named_parameters())
            assert any(t.data_ptr() == live["diffusion_model.out.2.weight"].data_ptr()
                       for t in model.unet.parameters())
        assert not ns.call_queue.queue_lock.locked()


def test_a_reforge_run_leaves_the_model_bit_identical_and_refreshes_the_lora_list(tmp_path):
    w, ns = make_reforge(tmp_path)
    write_junk_checkpoint(ns)
    host = ReForgeHost(w, memory=ns.memory)
    jobs = JobManager(host)
    before = snapshot(ns.shared.sd_model)
    proj = create_project(host.paths.project_dir("toy"), "toy", trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=4)
    shutil.move(str(src / "10_zkz"), os.path.join(proj.train_dir, "1_zkz"))
    job = jobs.wait(jobs.submit("toy", dict(FAST)).id, timeout=120)
    assert job.status == "done", job.error
    assert same_as(ns.shared.sd_model, before) == []
    assert ns.networks.refreshes == 1
    assert os.path.isfile(os.path.join(ns.shared.cmd_opts.lora_dir, "toy", "toy.safetensors"))


def test_reforge_parts_go_to_the_device_and_back(tmp_path):
    w, ns = make_reforge(tmp_path)
    host = ReForgeHost(w, memory=ns.memory)
    sd_model = ns.shared.sd_model
    for part in (sd_model.model, sd_model.first_stage_model, sd_model.cond_stage_model):
        part.fake_move = True                     # records .to() without a second device
    w.devices.device = torch.device("meta")       # "the compute device" differs from where the parts are
    moved = host._to_device_for_medvram(sd_model)
    assert [str(d) for _p, d in moved] == ["cpu", "cpu", "cpu"]
    assert all(p.moves == [torch.device("meta")] for p, _d in moved)


def reforge_sdxl_model():
    """An SDXL model shaped as reForge leaves it: A1111's DiffusionEngine, but bigG (`conditioner.embedders.1`) is
    ldm_patched's transformers-layout CLIP at `wrapped.transformer`, its projection at `wrapped.text_projection`
    (x @ P, OpenCLIP's orientation). Seen in the real reForge: the file's `conditioner.embedders.1.model.*` is gone."""
    from forge_standins import module_from
    from webui_standins import family_state_dict, make_sd_model

    from lib_lora_train.models.openclip import openclip_to_transformers

    sd = family_state_dict("sdxl")
    oc_prefix = "conditioner.embedders.1.model."
    oc = {k[len(oc_prefix):]: t for k, t in sd.items() if k.startswith(oc_prefix)}
    hf, _ = openclip_to_transformers(oc, drop_last_layer=False, with_projection=True, label="bigG")
    hf.pop("text_projection.weight")
    model = make_sd_model({k: t for k, t in sd.items() if not k.startswith(oc_prefix)}, family="sdxl")
    wrapped = torch.nn.Module()
    wrapped.add_module("transformer", module_from({"g." + k: t.contiguous() for k, t in hf.items()}, "g."))
    wrapped.text_projection = torch.nn.Parameter(oc["text_projection"].clone(), requires_grad=False)
    embedder = torch.nn.Module()
    embedder.add_module("wrapped", wrapped)
    model.conditioner.embedders.add_module("1", embedder)
    return sd, model


def test_reforge_sdxl_bigg_in_transformers_layout_becomes_the_checkpoint_layout_on_the_same_tensors():
    from lib_lora_train.hosts.webui_model import engine_model, live_state_dict
    from lib_lora_train.models import load_sd_model

    sd, live = reforge_sdxl_model()
    tensors = live_state_dict(live)
    assert not any(k.startswith("conditioner.embedders.1.transformer.") for k in tensors)
    assert set(tensors) >= {k for k in sd if k.startswith("conditioner.embedders.1.model.")}
    model = engine_model(live, log=lambda _m: None)
    reference = load_sd_model(sd, device="cpu")
    for ours, ref in zip(model.text_encoders, reference.text_encoders):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shared, total = model.info.extra["webui_shared_text_encoder_tensors"]
    layers = sum(1 for k in sd if k.startswith("conditioner.embedders.1.model.") and k.endswith("attn.in_proj_weight"))
    # only bigG's q/k/v are new: the engine's q, k and v weights and biases are views of the fused copy
    assert total - shared == 6 * layers


def test_reforge_sd2_openclip_h_in_transformers_layout_becomes_the_checkpoint_layout():
    """SD 2.x on reForge: OpenCLIP-H as ldm_patched's transformers-layout CLIP with all of the file's layers
    (`cond_stage_model.wrapped.transformer`); the engine's model equals the one read from the file."""
    from forge_standins import module_from
    from webui_standins import family_state_dict, make_sd_model

    from lib_lora_train.hosts.webui_model import engine_model
    from lib_lora_train.models import load_sd_model
    from lib_lora_train.models.openclip import openclip_to_transformers

    sd = family_state_dict("sd2")
    oc_prefix = "cond_stage_model.model."
    oc = {k[len(oc_prefix):]: t for k, t in sd.items() if k.startswith(oc_prefix)}
    hf, _ = openclip_to_transformers(oc, drop_last_layer=False, with_projection=False, label="H")
    live = make_sd_model({k: t for k, t in sd.items() if not k.startswith(oc_prefix)}, family="sd2")
    if "wrapped" not in live.cond_stage_model._modules:
        live.cond_stage_model.add_module("wrapped", torch.nn.Module())
    live.cond_stage_model.wrapped.add_module("transformer",
                                             module_from({"h." + k: t.contiguous() for k, t in hf.items()}, "h."))
    model = engine_model(live, log=lambda _m: None)
    reference = load_sd_model(sd, device="cpu")
    assert model.info.family == reference.info.family == "sd2"
    a, b = model.text_encoder.state_dict(), reference.text_encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
