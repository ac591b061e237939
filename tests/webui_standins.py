"""Small stand-ins of the WebUI objects the extension's glue touches (A1111 1.10 names and behaviour).

They hold only what lib_lora_train.hosts.webui and scripts/lora_train.py use: a LatentDiffusion-shaped model
whose state dict has the hijack's `.wrapped` levels, shared.state / opts / cmd_opts, the non-re-entrant queue
lock, the progress task registry, and the built-in Lora extension's `networks` functions that matter here.
"""
import os
import threading
import time
import types
from types import SimpleNamespace

import torch

from lib_lora_train.models import tiny_sd1_state_dict

TE = "cond_stage_model.transformer."


class FIFOLockStandIn:
    """Like modules.fifo_lock.FIFOLock: not re-entrant. The real one deadlocks when its holder takes it again;
    this one raises, so a test fails instead of hanging."""

    def __init__(self):
        self._lock = threading.Lock()
        self.owner = None
        self.acquired = 0

    def acquire(self, blocking=True):
        if self.owner == threading.get_ident():
            raise RuntimeError("queue_lock taken twice by the same thread (the WebUI would deadlock)")
        ok = self._lock.acquire(blocking)
        if ok:
            self.owner = threading.get_ident()
            self.acquired += 1
        return ok

    def release(self):
        self.owner = None
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class StateStandIn:
    """modules.shared_state.State: the fields and methods the progress mechanism uses."""

    def __init__(self):
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.interrupted = self.skipped = self.stopping_generation = False
        self.sampling_step = self.sampling_steps = 0
        self.time_start, self.job_timestamp = None, "0"
        self.current_image, self.id_live_preview = None, 0
        self.begun = self.ended = 0

    def begin(self, job="(unknown)"):
        self.job, self.job_no, self.job_count, self.textinfo = job, 0, -1, None
        self.interrupted = self.skipped = self.stopping_generation = False
        self.current_image, self.id_live_preview = None, 0
        self.time_start = time.time()
        self.begun += 1

    def end(self):
        self.job, self.job_count = "", 0
        self.ended += 1

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1


class OptionInfoStandIn:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.section, self.category_id = default, label, section, category_id
        self.comment_after = ""

    def info(self, text):
        self.comment_after += text
        return self


class OptsStandIn:
    def __init__(self):
        self.data = {}
        self.data_labels = {}

    def add_option(self, key, info):
        elem_id, text = info.section        # what the settings page does with it (a 3-tuple breaks the WebUI)
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)


class ProgressStandIn:
    def __init__(self):
        self.current_task = None
        self.finished = []

    def start_task(self, id_task):
        self.current_task = id_task

    def finish_task(self, id_task):
        if self.current_task == id_task:
            self.current_task = None
        self.finished.append(id_task)


class NetworksStandIn(types.ModuleType):
    """The built-in Lora extension's `networks`: LoRAs are merged into the weights in place, the originals kept
    in network_weights_backup / network_bias_backup until the next forward with another set restores them."""

    def __init__(self):
        super().__init__("networks")
        self.loaded_networks = []
        self.refreshes = 0

    def load_networks(self, names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        self.loaded_networks.clear()
        self.loaded_networks.extend(names)

    def list_available_networks(self):
        self.refreshes += 1

    @staticmethod
    def network_restore_weights_from_backup(module):
        """As the real one: MultiheadAttention keeps (in_proj_weight, out_proj.weight) and out_proj's bias."""
        weights, bias = getattr(module, "network_weights_backup", None), getattr(module, "network_bias_backup", None)
        mha = isinstance(module, torch.nn.MultiheadAttention)
        with torch.no_grad():
            if weights is not None:
                if mha:
                    module.in_proj_weight.copy_(weights[0])
                    module.out_proj.weight.copy_(weights[1])
                else:
                    module.weight.copy_(weights)
            if bias is not None:
                (module.out_proj if mha else module).bias.copy_(bias)

    @staticmethod
    def network_reset_cached_weight(module):
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None

    def bake(self, module, name="some_lora", scale=0.5):
        """What a generation with <lora:name:1> leaves behind: weights changed in place, originals backed up (for
        OpenCLIP's MultiheadAttention the in_proj and out_proj weights and out_proj's bias, as the real one)."""
        with torch.no_grad():
            if isinstance(module, torch.nn.MultiheadAttention):
                module.network_weights_backup = (module.in_proj_weight.detach().to("cpu", copy=True),
                                                 module.out_proj.weight.detach().to("cpu", copy=True))
                module.network_bias_backup = module.out_proj.bias.detach().to("cpu", copy=True)
                for t in (module.in_proj_weight, module.out_proj.weight, module.out_proj.bias):
                    t.add_(torch.randn_like(t) * scale)
            else:
                module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
                module.network_bias_backup = None
                module.weight.add_(torch.randn_like(module.weight) * scale)
        module.network_current_names = ((name, 1.0, 1.0, None),)
        if name not in self.loaded_networks:
            self.loaded_networks.append(name)


class TrackedPart(torch.nn.Module):
    """A model part that records .to() calls (to check --medvram moves without a second device)."""

    def __init__(self):
        super().__init__()
        self.moves = []
        self.fake_move = False

    def to(self, *args, **kwargs):
        self.moves.append(args[0] if args else kwargs.get("device"))
        return self if self.fake_move else super().to(*args, **kwargs)


def _child(parent, name, make=torch.nn.Module):
    if name not in parent._modules:
        parent.add_module(name, make())
    return parent._modules[name]


def live_key(key: str) -> str:
    """File key -> the key the hijacked WebUI model's state_dict() shows: the text encoders one `.wrapped` deeper
    (SD1 / SD2 `cond_stage_model.wrapped.…`, SDXL `conditioner.embedders.N.wrapped.…`), token embeddings once more."""
    parts = key.split(".")
    if parts[0] == "cond_stage_model":
        parts.insert(1, "wrapped")
    elif parts[:2] == ["conditioner", "embedders"]:
        parts.insert(3, "wrapped")
    else:
        return key
    return ".".join(parts).replace("token_embedding.weight", "token_embedding.wrapped.weight")


class LatentDiffusionStandIn(torch.nn.Module):
    pass


FAMILIES = ("sd1", "sd2", "sd2v", "sdxl")
NOT_A_CHECKPOINT = b"the WebUI's model is in memory; this file must never be read"


def family_state_dict(family: str, seed: int = 0) -> dict:
    """A tiny checkpoint (ldm / sgm layout) of a family: "sd1", "sd2" (epsilon), "sd2v" (768-v), "sdxl"."""
    from lib_lora_train import models

    if family == "sd1":
        return tiny_sd1_state_dict(seed=seed)
    if family in ("sd2", "sd2v"):
        return models.tiny_sd2_state_dict(seed=seed, v_pred=family == "sd2v")
    return models.tiny_sdxl_state_dict(seed=seed)


def _mha_paths(sd) -> dict:
    """live module path -> embed dim of OpenCLIP's attention blocks (real nn.MultiheadAttention, as in the WebUI)."""
    suffix = ".in_proj_weight"
    return {live_key(k)[:-len(suffix)]: t.shape[1] for k, t in sd.items() if k.endswith(suffix)}


def make_sd_model(state_dict=None, *, dtype=torch.float32, seed=0, checkpoint=None, family="sd1"):
    """A LatentDiffusion- (SD1 / SD2) or DiffusionEngine- (SDXL) shaped module holding a tiny checkpoint's tensors
    under the live (hijacked) keys. Float tensors are Parameters with requires_grad=True: the WebUI does not
    freeze its model. SDXL also gets the hijack's `cond_stage_model` alias of its conditioner and the empty
    `conditioner.wrapped` of extend_sdxl; SD 2.x 768-v says `parameterization = "v"`."""
    sd = state_dict if state_dict is not None else family_state_dict(family, seed)
    sdxl = family == "sdxl" or any(k.startswith("conditioner.") for k in sd)
    root = LatentDiffusionStandIn()
    for part in ("model", "first_stage_model", "conditioner" if sdxl else "cond_stage_model"):
        root.add_module(part, TrackedPart())
    mha = _mha_paths(sd)
    for key, tensor in sd.items():
        live = live_key(key)
        *path, leaf = live.split(".")
        owner, walked = root, []
        for name in path:
            walked.append(name)
            here = ".".join(walked)
            owner = _child(owner, name, (lambda d=mha[here]: torch.nn.MultiheadAttention(d, 1)) if here in mha
                           else torch.nn.Module)
        t = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if t.is_floating_point() and path:
            owner.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=True))
        else:
            owner.register_buffer(leaf, t.clone())
    if sdxl:
        root.conditioner.add_module("wrapped", torch.nn.Module())
        root.cond_stage_model = root.conditioner          # registered last, as sd_hijack does
    root.lowvram = False
    root.is_sd1, root.is_sd2, root.is_sdxl = family == "sd1" and not sdxl, family in ("sd2", "sd2v"), sdxl
    root.is_sd3 = root.is_ssd = False
    root.parameterization = "v" if family == "sd2v" else "eps"
    root.sd_checkpoint_info = checkpoint
    return root


def checkpoint_info(filename, sha256="ab" * 32, legacy="0badf00d"):
    return SimpleNamespace(filename=filename, sha256=sha256, hash=legacy, title=os.path.basename(filename),
                           name_for_extra=os.path.splitext(os.path.basename(filename))[0])


def make_webui(tmp_path, *, sd_model=None, device="cpu", dtype=torch.float32, family="sd1", **cmd):
    """(WebUI bundle, namespace of the stand-ins) with a WebUI data folder under tmp_path."""
    from lib_lora_train.hosts.webui import WebUI

    data = tmp_path / "webui"
    models = data / "models"
    ckpt_dir = models / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # The checkpoint file is never read (the model comes from memory): it holds bytes no loader accepts, so a run
    # that read it would fail (it exists because a submitted run's checkpoint path is checked).
    info = checkpoint_info(str(ckpt_dir / f"tiny_{family}.safetensors"))
    with open(info.filename, "wb") as fh:
        fh.write(NOT_A_CHECKPOINT)
    if sd_model is None:
        sd_model = make_sd_model(dtype=dtype, checkpoint=info, family=family)
    elif sd_model.sd_checkpoint_info is None:
        sd_model.sd_checkpoint_info = info
    cmd_opts = SimpleNamespace(lowvram=False, medvram=False, medvram_sdxl=False, api_auth=None, ckpt_dir=None,
                               lora_dir=str(models / "Lora"))
    cmd_opts.__dict__.update(cmd)
    shared = SimpleNamespace(sd_model=sd_model, cmd_opts=cmd_opts, opts=OptsStandIn(), state=StateStandIn(),
                             OptionInfo=OptionInfoStandIn, interrogator=None)
    devices = SimpleNamespace(device=torch.device(device), dtype=dtype, dtype_unet=dtype, fp8=False,
                              torch_gc=lambda: None)
    networks = NetworksStandIn()
    ns = SimpleNamespace(
        shared=shared, devices=devices, call_queue=SimpleNamespace(queue_lock=FIFOLockStandIn()),
        paths=SimpleNamespace(data_path=str(data), models_path=str(models)),
        sd_models=SimpleNamespace(model_path=str(ckpt_dir), model_data=SimpleNamespace(sd_model=sd_model)),
        progress=ProgressStandIn(), networks=networks, info=info)
    webui = WebUI(shared=shared, devices=devices, call_queue=ns.call_queue, paths=ns.paths,
                  sd_models=ns.sd_models, progress=ns.progress, networks=lambda: networks)
    return webui, ns


def snapshot(module):
    """Every tensor of a module (parameters and buffers) as (dtype, device, requires_grad, copy)."""
    return {k: (t.dtype, t.device, t.requires_grad, t.detach().clone())
            for k, t in module.state_dict(keep_vars=True).items()}


def same_as(module, snap) -> list:
    """Keys whose tensor differs from `snap` in any way (bits, dtype, device, requires_grad, presence)."""
    now = module.state_dict(keep_vars=True)
    bad = sorted(set(now) ^ set(snap))
    for k, (dtype, device, grad, value) in snap.items():
        t = now.get(k)
        if t is None:
            continue
        if t.dtype != dtype or t.device != device or t.requires_grad != grad or t.shape != value.shape or \
                not torch.equal(_bits(t.detach()), _bits(value)):
            bad.append(k)
    return bad


def _bits(t):
    t = t.reshape(-1).contiguous()
    return t.view(torch.uint8) if t.is_floating_point() else t
