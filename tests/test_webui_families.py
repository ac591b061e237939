"""The WebUI host on SD 2.x and SDXL models as A1111 holds them (stand-ins built from the models' tiny
checkpoints under the hijacked keys): family and v-prediction taken from the WebUI, the resolution default,
every UNet / VAE / text-encoder tensor shared (OpenCLIP's q/k/v as views of in_proj), the Lora extension's
leftovers undone (incl. the MultiheadAttention it patches), the model bit-identical after a run, an Interrupt
and an error, --medvram moving each part once."""
import json
import os
import shutil

import pytest
import torch

from lib_lora_train.config import config_from_dict
from lib_lora_train.demo.toy import make_toy_dataset
from lib_lora_train.events import STEP
from lib_lora_train.hosts.webui import WebUIHost, live_state_dict
from lib_lora_train.hosts.webui_model import shared_count
from lib_lora_train.jobs import JobManager
from lib_lora_train.prep.project import create_project
from webui_standins import family_state_dict, make_webui, same_as, snapshot

FAST = {"resolution": 64, "max_train_epochs": 1, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2,
        "learning_rate": 1e-3, "seed": 1, "cache_latents": True}
EXPECTED = {"sd1": ("sd1", "epsilon", 512, "SD 1.x"), "sd2": ("sd2", "epsilon", 512, "SD 2.x"),
            "sd2v": ("sd2", "v_prediction", 768, "SD 2.x v-prediction"), "sdxl": ("sdxl", "epsilon", 1024, "SDXL")}


@pytest.fixture(scope="module")
def tiny_sds():
    return {}


def webui_for(tmp_path, family, cache, **cmd):
    if family not in cache:
        cache[family] = family_state_dict(family)
    from webui_standins import make_sd_model
    return make_webui(tmp_path, family=family, sd_model=make_sd_model(cache[family], family=family), **cmd)


def cfg_for(host, **kw):
    return config_from_dict({**host.base_config(), **kw})


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_resolution_and_label_come_from_the_loaded_model(tmp_path, tiny_sds, family):
    w, ns = webui_for(tmp_path, family, tiny_sds)
    host = WebUIHost(w)
    fam, _pred, res, label = EXPECTED[family]
    assert (host.model_family(), host.native_resolution()) == (fam, res)
    assert host.base_config()["resolution"] == str(res)
    assert host.checkpoint_label().endswith(f"tiny_{family}.safetensors ({label})")


@pytest.mark.parametrize("family", ["sd2", "sd2v", "sdxl"])
def test_session_shares_every_tensor_and_takes_the_webui_prediction_type(tmp_path, tiny_sds, family):
    w, ns = webui_for(tmp_path, family, tiny_sds)
    host, sd_model, lock = WebUIHost(w), ns.shared.sd_model, ns.call_queue.queue_lock
    live = live_state_dict(sd_model)
    assert not any("wrapped" in k or k.startswith("cond_stage_model.") and family == "sdxl" for k in live)
    assert set(live) == set(tiny_sds[family])        # the checkpoint's own keys, SDXL's alias left out
    with host.training_session(cfg_for(host)) as model:
        fam, pred, _res, _label = EXPECTED[family]
        assert lock.locked() and (model.info.family, model.info.prediction_type) == (fam, pred)
        webui_tensors = list(sd_model.state_dict().values())
        encoders = model.text_encoders if family == "sdxl" else [model.text_encoder]
        assert len(encoders) == (2 if family == "sdxl" else 1)
        for part in (model.unet, model.vae, *encoders):
            tensors = [t for k, t in part.state_dict().items() if not k.endswith("position_ids")]
            assert shared_count(tensors, webui_tensors) == (len(tensors), len(tensors)), type(part).__name__
        te_shared = model.info.extra["webui_shared_text_encoder_tensors"]
        assert te_shared[0] == te_shared[1] > 0
        assert not any(p.requires_grad for p in model.unet.parameters())
    assert not lock.locked()
    assert all(p.requires_grad for p in sd_model.parameters())          # the WebUI's own flags untouched


def _te_modules(sd_model, family):
    """A Linear of the UNet, and the text encoders' modules the Lora extension patches."""
    unet = next(m for n, m in sd_model.model.named_modules() if n.endswith("proj_in"))
    mhas = [m for m in sd_model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    linears = []
    if family == "sdxl":
        te1 = sd_model.conditioner.embedders._modules["0"].wrapped.transformer.text_model
        linears.append(te1.encoder.layers._modules["0"].self_attn.q_proj)
    return [unet, *linears, mhas[0], mhas[-1]]


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_lora_extension_leftovers_are_undone_incl_multihead_attention(tmp_path, tiny_sds, family):
    w, ns = webui_for(tmp_path, family, tiny_sds)
    host, sd_model, nets = WebUIHost(w), ns.shared.sd_model, ns.networks
    clean = snapshot(sd_model)
    baked = _te_modules(sd_model, family)
    assert any(isinstance(m, torch.nn.MultiheadAttention) for m in baked)
    for module in baked:
        nets.bake(module)
    changed = same_as(sd_model, clean)
    assert any(k.endswith("in_proj_weight") for k in changed) and any("out_proj" in k for k in changed)
    with host.training_session(cfg_for(host)) as model:
        assert same_as(sd_model, clean) == [] and nets.loaded_networks == []
        assert all(m.network_weights_backup is None and m.network_current_names == () for m in baked)
        assert model is not None


def toy_project(host, tmp_path, name="toy", n=4):
    proj = create_project(host.paths.project_dir(name), name, trigger="zkz")
    src = make_toy_dataset(tmp_path / "src", n_images=n)
    shutil.move(str(src / "10_zkz"), os.path.join(proj.train_dir, "1_zkz"))
    return proj


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_a_run_and_an_interrupt_leave_the_loaded_model_bit_identical(tmp_path, tiny_sds, family):
    w, ns = webui_for(tmp_path, family, tiny_sds)
    host = WebUIHost(w)
    jobs = JobManager(host)
    sd_model, lock = ns.shared.sd_model, ns.call_queue.queue_lock
    before = snapshot(sd_model)
    toy_project(host, tmp_path)
    job = jobs.wait(jobs.submit("toy", dict(FAST)).id, timeout=300)
    assert job.status == "done", job.error
    assert same_as(sd_model, before) == [] and not lock.locked()
    with open(job.record_path, encoding="utf-8") as fh:
        model = json.load(fh)["model"]
    assert (model["family"], model["prediction_type"]) == EXPECTED[family][:2]

    def listener(job, event):
        if event.kind == STEP and event.data["step"] == 1:
            ns.shared.state.interrupt()          # the WebUI's Interrupt button
    jobs.listeners.append(listener)
    job = jobs.wait(jobs.submit("toy", {**FAST, "train_batch_size": 1, "output_name": "again"}).id, timeout=300)
    assert job.status == "interrupted"
    assert same_as(sd_model, before) == [] and not lock.locked() and ns.shared.state.interrupted is False


def test_an_error_inside_an_sdxl_run_leaves_the_model_bit_identical(tmp_path, tiny_sds):
    w, ns = webui_for(tmp_path, "sdxl", tiny_sds)
    host = WebUIHost(w)
    before = snapshot(ns.shared.sd_model)

    def runner(cfg, model, sink, stop):
        for te in model.text_encoders:
            te.requires_grad_(True)
            te.train()
        model.unet.train()
        raise RuntimeError("out of memory (pretend)")
    jobs = JobManager(host, runner=runner)
    toy_project(host, tmp_path)
    job = jobs.wait(jobs.submit("toy", dict(FAST)).id, timeout=120)
    assert job.status == "failed" and "out of memory" in job.error
    assert same_as(ns.shared.sd_model, before) == [] and not ns.call_queue.queue_lock.locked()


def test_medvram_moves_each_sdxl_part_once_and_back(tmp_path, tiny_sds):
    w, ns = webui_for(tmp_path, "sdxl", tiny_sds, medvram_sdxl=True)
    sd_model = ns.shared.sd_model
    sd_model.lowvram = True
    ns.devices.device = torch.device("cuda")       # never touched for real: the parts only record the move
    parts = [sd_model.model, sd_model.first_stage_model, sd_model.conditioner]
    for p in parts:
        p.fake_move = True
    host = WebUIHost(w)
    with pytest.raises(RuntimeError, match="boom"):
        with host.training_session(cfg_for(host, device="cpu")):
            assert [p.moves for p in parts] == [[torch.device("cuda")]] * 3     # the alias is not moved twice
            raise RuntimeError("boom")
    assert [p.moves for p in parts] == [[torch.device("cuda"), torch.device("cpu")]] * 3


def test_live_merge_view_of_an_sdxl_model_uses_the_checkpoint_keys(tmp_path, tiny_sds):
    """The Tools section's live merge sees SDXL's weights under the file's keys (no `.wrapped`, no
    cond_stage_model alias), so the tools' SDXL merge finds them; and the view is the live tensors themselves."""
    w, ns = webui_for(tmp_path, "sdxl", tiny_sds)
    host = WebUIHost(w)
    view = host.live_model.state_dict_view()
    floats = {k for k, t in tiny_sds["sdxl"].items() if t.is_floating_point()}
    assert floats <= set(view) and not any(k.startswith("cond_stage_model.") or "wrapped" in k for k in view)
    key = next(k for k in view if k.endswith("attn.in_proj_weight"))
    with torch.no_grad():
        view[key].add_(1.0)
    assert torch.equal(live_state_dict(ns.shared.sd_model)[key], view[key])


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_live_merge_into_the_loaded_model_and_restore_exactly(tmp_path, tiny_sds, family):
    """The Tools section's "Load into the live model" on SD 2.x / SDXL: the family's LoRA changes the U-Net and the
    text encoders (OpenCLIP's fused in_proj too), restore gives the bits back; an SD 1.x LoRA is refused with the
    tools' message and changes nothing."""
    from lib_lora_train.errors import LoraTrainError
    from lib_lora_train.hosts.live_merge import LiveMerger
    from lib_lora_train.models import load_sd_model, tiny_sd1_state_dict
    from lib_lora_train.networks import save_network_file
    from test_compare_families import _random_lora

    w, ns = webui_for(tmp_path, family, tiny_sds)
    host, sd_model = WebUIHost(w), ns.shared.sd_model
    clean = snapshot(sd_model)
    fam = EXPECTED[family][0]
    lora, other = tmp_path / "mine.safetensors", tmp_path / "sd1.safetensors"
    versions = {"sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}      # what a trained file says (ss_base_model_version)
    save_network_file(str(lora), _random_lora(load_sd_model(tiny_sds[family]), fam, 4),
                      {"ss_base_model_version": versions[fam]})
    save_network_file(str(other), _random_lora(load_sd_model(tiny_sd1_state_dict(seed=0)), "sd1", 5),
                      {"ss_base_model_version": "sd_v1"})
    merger = LiveMerger(lambda: host.live_model)
    handle = merger.apply([str(lora)], [1.0], None)
    changed = same_as(sd_model, clean)
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    assert any(k.endswith("attn.in_proj_weight") for k in changed)          # OpenCLIP's q/k/v
    merger.restore(handle)
    assert same_as(sd_model, clean) == []
    with pytest.raises(LoraTrainError, match="family|SD 1"):
        merger.apply([str(other)], [1.0], None)
    assert same_as(sd_model, clean) == []
