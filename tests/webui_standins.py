"""Small stand-ins of the WebUI objects the extension's glue touches (A1111 1.10 names and behaviour).

They hold only what lib_lora_train.hosts.webui and scripts/lora_train.py use: a LatentDiffusion-shaped model
whose state dict has the hijack's `.wrapped` levels, shared.state / opts / cmd_opts, the non-re-entrant queue
lock, the progress task registry, and the built-in Lora extension's `networks` functions that matter here.
"""
import os
import threading
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
        with torch.no_grad():
            if getattr(module, "network_weights_backup", None) is not None:
                module.weight.copy_(module.network_weights_backup)
            if getattr(module, "network_bias_backup", None) is not None:
                module.bias.copy_(module.network_bias_backup)

    @staticmethod
    def network_reset_cached_weight(module):
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None

    def bake(self, module, name="some_lora", scale=0.5):
        """What a generation with <lora:name:1> leaves behind: weights changed in place, originals backed up."""
        with torch.no_grad():
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


def _child(parent, name, cls=torch.nn.Module):
    if name not in parent._modules:
        parent.add_module(name, cls())
    return parent._modules[name]


def live_key(key: str) -> str:
    """File key -> the key the hijacked WebUI model's state_dict() shows (SD1)."""
    if key.startswith(TE):
        key = "cond_stage_model.wrapped.transformer." + key[len(TE):]
        key = key.replace("embeddings.token_embedding.weight", "embeddings.token_embedding.wrapped.weight")
    return key


class LatentDiffusionStandIn(torch.nn.Module):
    pass


def make_sd_model(state_dict=None, *, dtype=torch.float32, seed=0, checkpoint=None):
    """A LatentDiffusion-shaped module holding a tiny SD1 checkpoint's tensors under the live (hijacked) keys.
    Float tensors are Parameters with requires_grad=True: the WebUI does not freeze its model."""
    sd = state_dict if state_dict is not None else tiny_sd1_state_dict(seed=seed)
    root = LatentDiffusionStandIn()
    for part in ("model", "first_stage_model", "cond_stage_model"):
        root.add_module(part, TrackedPart())
    for key, tensor in sd.items():
        live = live_key(key)
        *path, leaf = live.split(".")
        owner = root
        for name in path:
            owner = _child(owner, name)
        t = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if t.is_floating_point() and path:
            owner.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=True))
        else:
            owner.register_buffer(leaf, t.clone())
    root.lowvram = False
    root.is_sd1, root.is_sd2, root.is_sdxl = True, False, False
    root.sd_checkpoint_info = checkpoint
    return root


def checkpoint_info(filename, sha256="ab" * 32, legacy="0badf00d"):
    return SimpleNamespace(filename=filename, sha256=sha256, hash=legacy, title=os.path.basename(filename),
                           name_for_extra=os.path.splitext(os.path.basename(filename))[0])


def make_webui(tmp_path, *, sd_model=None, device="cpu", dtype=torch.float32, **cmd):
    """(WebUI bundle, namespace of the stand-ins) with a WebUI data folder under tmp_path."""
    from lib_lora_train.hosts.webui import WebUI

    data = tmp_path / "webui"
    models = data / "models"
    ckpt_dir = models / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # The checkpoint file is never read (the model comes from memory), so it need not exist.
    info = checkpoint_info(str(ckpt_dir / "tiny_sd1.safetensors"))
    if sd_model is None:
        sd_model = make_sd_model(dtype=dtype, checkpoint=info)
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
