"""Regularisation images for prior preservation, made by the base model itself and cached.

N class images from one class prompt ("a photo of a woman", "1girl"), image i with seed `seed + i`, in
sd-scripts' reg folder form: `<cache>/<key>/<repeats>_<class>/reg_00000.png` + `reg_00000.txt` (the caption:
the class prompt), so `<cache>/<key>` is a `reg_data_dir`. The key is a digest of what decides the pixels: the
model (its checkpoint's sha256), the prompt, the negative prompt, the size, the sampler, steps, CFG scale, the
seed base and who draws (the WebUI's txt2img or the engine's own sampler, which do not give the same pixels).
Neither the count nor the repeats are in the key: a second request reuses the images that exist and a larger
count only adds the missing ones.

Every file is written atomically (fsutil), the PNG before its caption, and an image counts as present only when
both exist: an interrupted request leaves whole images only, and the next one completes it.

Who draws is a `render(spec) -> PIL image` callable: `engine_renderer` (sampling/pipeline.py, any family), or a
host's own (hosts/webui_regimages.py: the WebUI's txt2img). `reg_images_for_run` is the training run's use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..config_schema import check_reg_prompt, check_reg_settings, parse_resolution
from ..errors import ConfigError, Interrupted
from ..fsutil import atomic_write_bytes, atomic_write_json, remove_stale_temp_files

META_FILE = "regimages.json"
CACHE_FOLDER = "reg_images"          # the default cache: <output_dir>/reg_images (a project's: <project>/reg_cache)
PROJECT_CACHE_FOLDER = "reg_cache"
KEY_VERSION = 1
_SUBFOLDER = re.compile(r"^(\d+)_(.+)$")

Render = Callable[[Any], Any]        # PromptSpec -> PIL image


@dataclass(frozen=True)
class RegRequest:
    """What to draw. `count` and `repeats` are not part of the cache key."""
    prompt: str
    count: int
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    sampler: str = "dpm++_2m_karras"
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = 0
    repeats: int = 1

    def __post_init__(self) -> None:
        from ..sampling.pipeline import sampler_key
        object.__setattr__(self, "prompt", check_reg_prompt(self.prompt))
        object.__setattr__(self, "negative_prompt", check_reg_prompt(self.negative_prompt,
                                                                     "negative_prompt", required=False))
        object.__setattr__(self, "sampler", sampler_key(self.sampler))
        check_reg_settings(self.count, (self.width, self.height), self.steps, self.cfg_scale, self.seed,
                           self.repeats)

    def spec(self, index: int):
        from ..sampling.prompts import PromptSpec
        return PromptSpec(prompt=self.prompt, negative_prompt=self.negative_prompt, width=self.width,
                          height=self.height, steps=int(self.steps), seed=int(self.seed) + index,
                          scale=float(self.cfg_scale), sampler=self.sampler, index=index)

    def key_fields(self, model_id: str, backend: str) -> dict[str, Any]:
        return {"version": KEY_VERSION, "model": model_id, "backend": backend, "prompt": self.prompt,
                "negative_prompt": self.negative_prompt, "width": int(self.width), "height": int(self.height),
                "sampler": self.sampler, "steps": int(self.steps), "cfg_scale": float(self.cfg_scale),
                "seed": int(self.seed)}


def cache_key(req: RegRequest, model_id: str, backend: str) -> str:
    if not model_id:
        raise ConfigError("regularisation images: the model has no identity (no checkpoint hash)")
    text = json.dumps(req.key_fields(model_id, backend), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def class_folder_name(prompt: str) -> str:
    """The `<class>` of the `N_<class>` folder: the prompt's letters and digits, words joined by spaces, at most
    60 characters (the caption files carry the full prompt)."""
    words = re.findall(r"[A-Za-z0-9]+", prompt)
    name = " ".join(words)[:60].strip()
    return name or "class"


def image_name(index: int) -> str:
    return f"reg_{index:05d}"


@dataclass
class RegResult:
    reg_data_dir: str                 # <cache>/<key>: what a run takes as reg_data_dir
    folder: str                       # <reg_data_dir>/<repeats>_<class>
    key: str
    backend: str
    model_id: str
    count: int                        # images requested (all present now)
    generated: int                    # made by this call
    reused: int                       # found in the cache
    images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _subfolder(reg_dir: str, repeats: int, cls: str) -> str:
    """`<reg_dir>/<repeats>_<cls>`; an existing `M_<cls>` of an earlier request with other repeats is renamed."""
    wanted = os.path.join(reg_dir, f"{repeats}_{cls}")
    if not os.path.isdir(wanted):
        for name in sorted(os.listdir(reg_dir)):
            m = _SUBFOLDER.match(name)
            if m and m.group(2) == cls and os.path.isdir(os.path.join(reg_dir, name)):
                os.replace(os.path.join(reg_dir, name), wanted)
                break
    os.makedirs(wanted, exist_ok=True)
    return wanted


def _present(folder: str, index: int) -> bool:
    base = os.path.join(folder, image_name(index))
    return os.path.isfile(base + ".png") and os.path.isfile(base + ".txt")


def _png_bytes(image: Any) -> bytes:
    import io
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    params = image.info.get("parameters") if hasattr(image, "info") else None
    if params:
        info.add_text("parameters", str(params))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def generate_reg_images(req: RegRequest, *, model_id: str, backend: str, render: Render, cache_root: str,
                        progress: Callable[[int, int], None] | None = None,
                        stop: threading.Event | None = None) -> RegResult:
    """Make the missing images of `req` in the cache under `cache_root`; returns where they are."""
    key = cache_key(req, model_id, backend)
    reg_dir = os.path.join(os.path.abspath(cache_root), key)
    os.makedirs(reg_dir, exist_ok=True)
    folder = _subfolder(reg_dir, int(req.repeats), class_folder_name(req.prompt))
    remove_stale_temp_files(folder)           # temp files of a process killed mid-write
    meta_path = os.path.join(reg_dir, META_FILE)
    meta = req.key_fields(model_id, backend)
    meta["key"] = key
    if not os.path.isfile(meta_path):
        atomic_write_json(meta_path, meta)
    missing = [i for i in range(req.count) if not _present(folder, i)]
    done = req.count - len(missing)
    caption = (req.prompt + "\n").encode("utf-8")
    for n, i in enumerate(missing):
        if stop is not None and stop.is_set():
            raise Interrupted(f"regularisation images: stopped after {done + n} of {req.count}; run it again to "
                              f"complete them")
        base = os.path.join(folder, image_name(i))
        if not os.path.isfile(base + ".png"):
            image = render(req.spec(i))
            atomic_write_bytes(base + ".png", _png_bytes(image))
        atomic_write_bytes(base + ".txt", caption)    # after the image: a caption means a whole image
        if progress is not None:
            progress(done + n + 1, req.count)
    images = [os.path.join(folder, image_name(i) + ".png") for i in range(req.count)]
    return RegResult(reg_data_dir=reg_dir, folder=folder, key=key, backend=backend, model_id=model_id,
                     count=req.count, generated=len(missing), reused=done, images=images)


# ---------------------------------------------------------------- who draws
def weights_digest(model: Any) -> str:
    """sha256 over a model's parameters (a model built in memory has no file to hash)."""
    import torch
    h = hashlib.sha256()
    parts = [getattr(model, "unet", None), getattr(model, "vae", None),
             *(getattr(model, "text_encoders", None) or [getattr(model, "text_encoder", None)])]
    for part in parts:
        if part is None:
            continue
        for name, tensor in sorted(part.state_dict().items()):
            h.update(name.encode("utf-8"))
            h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def engine_model_id(model: Any) -> str:
    """The checkpoint's sha256 (computed once per file), else a digest of the weights."""
    info = getattr(model, "info", None)
    if info is not None and getattr(info, "sha256", None):
        return f"sha256:{info.sha256}"
    if info is not None and getattr(info, "path", None) and os.path.isfile(info.path):
        from ..models.loader import ensure_hashes
        return f"sha256:{ensure_hashes(info).sha256}"
    return f"weights:{weights_digest(model)}"


def engine_renderer(model: Any, device: Any = "cpu", *, clip_skip: int | None = None) -> Render:
    """Draw with the engine's own sampler (DPM++ 2M Karras unless the request names another)."""
    from ..sampling.pipeline import generate

    def render(spec: Any) -> Any:
        return generate(model, [spec], device=device, clip_skip=clip_skip)[0]
    return render


@contextlib.contextmanager
def engine_source(model: Any, device: Any = "cpu", *, clip_skip: int | None = None) -> Iterator[tuple]:
    model_id = engine_model_id(model) + (f";clip_skip={clip_skip}" if clip_skip and clip_skip > 1 else "")
    yield model_id, "engine", engine_renderer(model, device, clip_skip=clip_skip)


def _device(name: str):
    """auto: CUDA, else MPS, else the CPU (as a run's `device`; not imported from training/, which imports us)."""
    import torch
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = "cuda" if torch.cuda.is_available() else "mps" if mps is not None and mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but PyTorch sees no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def checkpoint_source(path: str, device: Any = "auto") -> Iterator[tuple]:
    """The engine's sampler on a checkpoint file loaded for the purpose (half precision on a GPU)."""
    import torch

    from ..models import load_sd_model
    if not path or not os.path.isfile(path):
        raise ConfigError(f"model: checkpoint file not found: {path!r}")
    dev = _device(str(device))
    model = load_sd_model(path, device=dev, dtype=torch.float16 if dev.type == "cuda" else None)
    try:
        yield engine_model_id(model), "engine", engine_renderer(model, dev)
    finally:
        del model


def user_cache_dir() -> str:
    """Where the CLI caches reg images by default: $LORA_TRAIN_CACHE, else $XDG_CACHE_HOME/lora_train, else
    ~/.cache/lora_train; then reg_images/."""
    base = os.environ.get("LORA_TRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora_train")
    return os.path.join(base, CACHE_FOLDER)


# ---------------------------------------------------------------- a host's (the tab, the HTTP API)
_HOST_LOCK = threading.Lock()        # one request at a time per process: two would fight over the model


def source_for_host(host: Any):
    """The host's own txt2img when it has one (the WebUI), else the engine's sampler on the host's default
    checkpoint file."""
    own = getattr(host, "reg_image_source", None)
    if own is not None:
        return own(take_lock=True)
    base = host.base_config()
    return checkpoint_source(base.get("pretrained_model_name_or_path") or "", base.get("device") or "auto")


def default_size_for_host(host: Any) -> tuple[int, int]:
    """The size a project's run trains at unless told otherwise: the host's resolution, else the family's."""
    res = host.base_config().get("resolution")
    return parse_resolution(res) if res else (host.native_resolution(),) * 2


def generate_for_project(host: Any, project: Any, req: RegRequest, *,
                         progress: Callable[[int, int], None] | None = None,
                         stop: threading.Event | None = None) -> dict[str, Any]:
    """Draw (or find) `req` in the project's cache, where its runs look (jobs.py sets reg_images_dir to it).
    Returns the result and the run keys that use these images."""
    root = os.path.join(project.root, PROJECT_CACHE_FOLDER)
    with _HOST_LOCK, source_for_host(host) as (model_id, backend, render):
        result = generate_reg_images(req, model_id=model_id, backend=backend, render=render, cache_root=root,
                                     progress=progress, stop=stop)
    out = result.to_dict()
    out["config"] = run_keys(req)
    return out


def run_keys(req: RegRequest) -> dict[str, Any]:
    """The run-config keys that ask a run for exactly these images."""
    return {"reg_images_prompt": req.prompt, "reg_images_count": req.count,
            "reg_images_negative_prompt": req.negative_prompt, "reg_images_size": f"{req.width},{req.height}",
            "reg_images_sampler": req.sampler, "reg_images_steps": req.steps, "reg_images_cfg_scale": req.cfg_scale,
            "reg_images_seed": req.seed, "reg_images_repeats": req.repeats}


# ---------------------------------------------------------------- a training run's
def training_sample_count(cfg: Any) -> int:
    """One epoch's training samples of a folder dataset (images x repeats): the default count."""
    from ..dataset import datasets_from_folders
    from ..dataset.images import list_images
    total = 0
    general = {"resolution": list(cfg.resolution_wh), "caption_extension": cfg.caption_extension}
    for ds in datasets_from_folders(cfg.train_data_dir, None, general):
        for sub in ds.subsets:
            if not sub.is_reg and os.path.isdir(sub.image_dir):
                total += max(0, int(sub.num_repeats)) * len(list_images(sub.image_dir))
    return max(1, total)


def request_for_run(cfg: Any) -> RegRequest:
    width, height = parse_resolution(cfg.reg_images_size) if cfg.reg_images_size else cfg.resolution_wh
    count = cfg.reg_images_count or min(training_sample_count(cfg), 10000)
    return RegRequest(prompt=cfg.reg_images_prompt, count=count, width=width, height=height,
                      negative_prompt=cfg.reg_images_negative_prompt or "", sampler=cfg.reg_images_sampler,
                      steps=cfg.reg_images_steps, cfg_scale=cfg.reg_images_cfg_scale, seed=cfg.reg_images_seed,
                      repeats=cfg.reg_images_repeats)


def cache_root_for_run(cfg: Any) -> str:
    return cfg.reg_images_dir or os.path.join(cfg.output_dir, CACHE_FOLDER)


def reg_images_for_run(cfg: Any, model: Any, device: Any, emit: Callable[[Any], None], *,
                       stop: threading.Event | None = None, source: Callable[[], Any] | None = None,
                       clip_skip: int | None = None):
    """Before the data is read: the run's class images (cached), and the config with reg_data_dir on them.
    `source()`: a host's context manager yielding (model_id, backend, render); None: the engine's sampler on
    the run's model."""
    from ..events import LOG, Event
    req = request_for_run(cfg)
    root = cache_root_for_run(cfg)
    step = max(1, req.count // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            emit(Event(LOG, {"message": f"regularisation images: {done}/{total}"}))

    with (source() if source is not None else engine_source(model, device, clip_skip=clip_skip)) as (mid, be, rd):
        result = generate_reg_images(req, model_id=mid, backend=be, render=rd, cache_root=root,
                                     progress=progress, stop=stop)
    emit(Event(LOG, {"message": f"regularisation images: {result.count} of '{req.prompt}' in {result.folder} "
                                f"({result.reused} from the cache, {result.generated} drawn by the {be} sampler)"}))
    return dataclasses.replace(cfg, reg_data_dir=result.reg_data_dir), result
