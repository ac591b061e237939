"""Stand-ins of Forge 2.x's and reForge's objects that the host adapters touch (names and behaviour as read in
their sources; no code of theirs). Built on the tiny SD 1.x checkpoint.

Forge: a `ForgeDiffusionEngine`-shaped object (not a torch module) with `forge_objects` = UNet / CLIP / VAE
patchers; weights made under torch.inference_mode() as Forge's loader does; each patched model has a LoraLoader
that merges LoRA deltas by replacing the Parameter (originals kept in `backup`) and restores on refresh; a memory
manager (`unload_all_models`, `soft_empty_cache`); `sd_models.forge_model_reload()` loading lazily what
`model_data.forge_loading_parameters` names, after a `FakeInitialModel`.

reForge: the A1111 stand-in model plus a ComfyUI-style memory manager whose loaded patchers merged a LoRA into the
weights in place (originals in the patcher's `backup`) until `unload_all_models()` unpatches.
"""
import contextlib
from types import SimpleNamespace

import torch

from lib_lora_train.hosts.webui import WebUI
from lib_lora_train.models import tiny_sd1_state_dict
from webui_standins import make_webui

UNET, VAE, TE = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def module_from(sd: dict, prefix: str, *, dtype=torch.float32) -> torch.nn.Module:
    """A module tree holding the tensors of `sd` under `prefix` as Parameters (floats) / buffers, keys kept."""
    root = torch.nn.Module()
    for key, t in sd.items():
        if not key.startswith(prefix):
            continue
        *path, leaf = key[len(prefix):].split(".")
        owner = root
        for name in path:
            if name not in owner._modules:
                owner.add_module(name, torch.nn.Module())
            owner = owner._modules[name]
        if t.is_floating_point():
            owner.register_parameter(leaf, torch.nn.Parameter(t.to(dtype).clone(), requires_grad=False))
        else:
            owner.register_buffer(leaf, t.clone())
    return root


def _attr(module, key):
    *path, leaf = key.split(".")
    for name in path:
        module = getattr(module, name)
    return module, leaf


class LoraLoaderStandIn:
    """backend/patcher/lora.py LoraLoader: refresh() restores the backed-up Parameters, then merges the given
    patches ({key: delta}) into new Parameters, keeping each original once in `backup`."""

    def __init__(self, model):
        self.model = model
        self.backup, self.online_backup = {}, []
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        for key, original in self.backup.items():
            owner, leaf = _attr(self.model, key)
            setattr(owner, leaf, original)
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                owner, leaf = _attr(self.model, key)
                weight = getattr(owner, leaf)
                self.backup.setdefault(key, weight)
                setattr(owner, leaf, torch.nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = hashes


class PatcherStandIn:
    def __init__(self, model):
        self.model = model
        self.load_device = self.offload_device = torch.device("cpu")
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoaderStandIn(model)
        self.lora_patches = {}


class MemoryStandIn:
    """backend.memory_management / ldm_patched.modules.model_management: what the adapters call."""

    def __init__(self):
        self.unloads = self.empties = 0
        self.current_loaded_models = []

    def unload_all_models(self):
        self.unloads += 1
        for loaded in self.current_loaded_models:
            loaded.model.unpatch_model()
        self.current_loaded_models = []

    def soft_empty_cache(self, force=False):
        self.empties += 1


class FakeInitialModel:
    """Forge's placeholder before the first load (no checkpoint info, no weights)."""
    cond_stage_model = None
    sd_checkpoint_info = None


class ForgeEngineStandIn:
    """A ForgeDiffusionEngine for SD 1.x: not an nn.Module; cond_stage_model / first_stage_model are None."""

    def __init__(self, sd: dict, info, *, dtype=torch.float32, storage_dtype=None):
        with torch.inference_mode():           # Forge's forge_model_reload runs under inference mode
            diffusion_model = module_from(sd, UNET, dtype=dtype)
            vae = module_from(sd, VAE, dtype=dtype)
            clip_l = torch.nn.Module()
            clip_l.add_module("transformer", module_from(sd, TE, dtype=dtype))
            embeddings = clip_l.transformer.text_model.embeddings    # wrapped for textual inversion, as Forge does
            wrapper = torch.nn.Module()
            wrapper.add_module("wrapped", embeddings.token_embedding)
            embeddings.token_embedding = wrapper
            text = torch.nn.ModuleDict({"clip_l": clip_l})
        kmodel = torch.nn.Module()
        kmodel.add_module("diffusion_model", diffusion_model)
        kmodel.predictor = SimpleNamespace(prediction_type="epsilon")
        kmodel.storage_dtype = storage_dtype or dtype
        unet = PatcherStandIn(kmodel)
        clip = SimpleNamespace(cond_stage_model=text, patcher=PatcherStandIn(text))
        vae_obj = SimpleNamespace(first_stage_model=vae, patcher=PatcherStandIn(vae))
        self.forge_objects = SimpleNamespace(unet=unet, clip=clip, vae=vae_obj, clipvision=None)
        self.forge_objects_original = self.forge_objects_after_applying_lora = self.forge_objects
        self.cond_stage_model = self.first_stage_model = None
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = True, False, False, False
        self.sd_checkpoint_info = info

    def apply_lora(self, scale=0.5, seed=3):
        """What a generation with <lora:x> leaves: the UNet and text encoder patched through their loaders."""
        g = torch.Generator().manual_seed(seed)
        for patcher, prefix in ((self.forge_objects.unet, "diffusion_model."),
                                (self.forge_objects.clip.patcher, "clip_l.transformer.")):
            keys = [k for k, p in patcher.model.named_parameters() if k.startswith(prefix) and p.ndim == 2][:4]
            patches = {k: torch.randn(dict(patcher.model.named_parameters())[k].shape, generator=g) * scale
                       for k in keys}
            patcher.lora_patches = {("x.safetensors", 1.0, 1.0, False): patches}
            patcher.model.lora_loader.refresh(patcher.lora_patches)
        return self


class ForgeSDXLStandIn(ForgeEngineStandIn):
    """Forge's SDXL engine: CLIP-L and OpenCLIP-bigG held as transformers models (`clip_l`, `clip_g`; bigG's
    projection at `transformer.text_projection`), made from a tiny sgm checkpoint."""

    def __init__(self, sd: dict, info):
        from lib_lora_train.models.openclip import openclip_to_transformers

        oc = {k[len("conditioner.embedders.1.model."):]: t for k, t in sd.items()
              if k.startswith("conditioner.embedders.1.model.")}
        g, _unused = openclip_to_transformers(oc, drop_last_layer=False, with_projection=True, label="bigG")
        flat = {UNET + k[len(UNET):]: t for k, t in sd.items() if k.startswith(UNET)}
        flat.update({k: t for k, t in sd.items() if k.startswith(VAE)})
        flat.update({TE + k[len("conditioner.embedders.0.transformer."):]: t for k, t in sd.items()
                     if k.startswith("conditioner.embedders.0.transformer.")})
        super().__init__(flat, info)
        with torch.inference_mode():
            clip_g = torch.nn.Module()
            clip_g.add_module("transformer", module_from({"g." + k: t.contiguous() for k, t in g.items()}, "g."))
            self.forge_objects.clip.cond_stage_model["clip_g"] = clip_g
        self.is_sd1, self.is_sdxl = False, True


class ForgeSD2StandIn(ForgeEngineStandIn):
    """Forge's SD 2.x engine: OpenCLIP-H held as a transformers model (`clip_h`) one layer short of the file's (the
    penultimate-layer cut Forge's loader makes), made from a tiny SD 2.x checkpoint."""

    def __init__(self, sd: dict, info):
        from lib_lora_train.models.openclip import openclip_to_transformers

        oc = {k[len("cond_stage_model.model."):]: t for k, t in sd.items() if k.startswith("cond_stage_model.model.")}
        h, _unused = openclip_to_transformers(oc, drop_last_layer=True, with_projection=False, label="ViT-H")
        flat = {k: t for k, t in sd.items() if k.startswith((UNET, VAE))}
        flat.update({TE + k: t for k, t in h.items()})
        super().__init__(flat, info)
        text = self.forge_objects.clip.cond_stage_model
        text["clip_h"] = text.pop("clip_l")
        self.is_sd1, self.is_sd2 = False, True


def forge_tensors(engine) -> dict:
    """Every tensor of the Forge model by a flat key (UNet / VAE / text), as it is now."""
    o = engine.forge_objects
    out = {}
    for name, module in (("unet", o.unet.model), ("vae", o.vae.first_stage_model), ("text", o.clip.cond_stage_model)):
        for k, t in module.state_dict(keep_vars=True).items():
            out[f"{name}.{k}"] = t
    return out


def forge_snapshot(engine) -> dict:
    with torch.inference_mode():
        return {k: t.detach().clone() for k, t in forge_tensors(engine).items()}


def forge_diff(engine, snap) -> list:
    now = forge_tensors(engine)
    bad = sorted(set(now) ^ set(snap))
    with torch.inference_mode():
        bad += [k for k, v in snap.items() if k in now and (now[k].dtype != v.dtype or not torch.equal(now[k], v))]
    return bad


def make_forge(tmp_path, *, storage_dtype=None, dtype=torch.float32, loaded=False):
    """(WebUI bundle, namespace) of a Forge stand-in; the model loads at the first forge_model_reload() unless
    `loaded`."""
    placeholder = FakeInitialModel()
    w, ns = make_webui(tmp_path, sd_model=placeholder)
    del placeholder.sd_checkpoint_info          # make_webui filled it in; Forge's placeholder has none
    sd = tiny_sd1_state_dict(seed=0)
    info = ns.info
    with open(info.filename, "wb") as fh:      # exists (the API checks), but reading it as a checkpoint fails:
        fh.write(b"not a checkpoint")        # a run that trains on Forge's loaded model never reads it
    memory = MemoryStandIn()
    model_data = SimpleNamespace(sd_model=ns.shared.sd_model, forge_loading_parameters={"checkpoint_info": info},
                                 forge_hash="")
    reloads = []

    def forge_model_reload():
        key = str(model_data.forge_loading_parameters)
        if model_data.forge_hash == key:
            return model_data.sd_model, False
        engine = ForgeEngineStandIn(sd, info, dtype=dtype, storage_dtype=storage_dtype)
        model_data.sd_model = ns.shared.sd_model = engine
        model_data.forge_hash = key
        reloads.append(engine)
        return engine, True

    ns.sd_models.model_data = model_data
    ns.sd_models.forge_model_reload = forge_model_reload
    ns.memory, ns.reloads, ns.state_dict = memory, reloads, sd
    if loaded:
        forge_model_reload()
    webui = WebUI(shared=w.shared, devices=w.devices, call_queue=w.call_queue, paths=w.paths,
                  sd_models=ns.sd_models, progress=w.progress, networks=w.networks)
    return webui, ns


class ComfyPatcherStandIn:
    """ldm_patched ModelPatcher: patch_model merges its patches into the weights in place (originals copied to
    `backup`), unpatch_model copies them back."""

    def __init__(self, module, patches):
        self.module, self.patches, self.backup = module, patches, {}

    @torch.no_grad()
    def patch_model(self):
        for key, delta in self.patches.items():
            owner, leaf = _attr(self.module, key)
            w = getattr(owner, leaf)
            self.backup.setdefault(key, w.detach().clone())
            w.add_(delta)

    @torch.no_grad()
    def unpatch_model(self):
        for key, original in self.backup.items():
            owner, leaf = _attr(self.module, key)
            getattr(owner, leaf).copy_(original)
        self.backup.clear()


def make_reforge(tmp_path):
    """(WebUI bundle, namespace) of a reForge stand-in: the A1111-shaped model with `forge_objects`, and a
    memory manager whose loaded UNet patcher has a LoRA merged in (as after a generation with <lora:x>)."""
    w, ns = make_webui(tmp_path)
    sd_model = ns.shared.sd_model
    sd_model.forge_objects = SimpleNamespace(unet=SimpleNamespace(model=sd_model.model))
    sd_model.forge_objects_original = sd_model.forge_objects_after_applying_lora = sd_model.forge_objects
    sd_model.current_lora_hash = str([])
    memory = MemoryStandIn()
    ns.memory = memory
    return w, ns


@contextlib.contextmanager
def reforge_lora_merged(ns, scale=0.5, seed=5):
    """Merge a LoRA into the reForge stand-in's UNet the way its memory manager does at a generation."""
    g = torch.Generator().manual_seed(seed)
    unet = ns.shared.sd_model.model
    keys = [k for k, p in unet.named_parameters() if p.ndim == 2][:4]
    params = dict(unet.named_parameters())
    patcher = ComfyPatcherStandIn(unet, {k: torch.randn(params[k].shape, generator=g) * scale for k in keys})
    patcher.patch_model()
    ns.memory.current_loaded_models.append(SimpleNamespace(model=patcher))
    yield patcher
