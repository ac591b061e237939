"""Preprocess images into a training folder: flatten, rotate, RGB, resize / crop, optional mirrored copies.

Originals are only read. Every output name is chosen up front in the main process, so results do not depend on
the number of workers or on which finishes first; each output is written atomically. A file that cannot be used
is skipped with its reason and the others go on.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from PIL import Image

from ..dataset.images import ORIENTATION_OPS, TRANSPOSED_ORIENTATIONS, exif_orientation, resize_filter
from ..errors import ConfigError, DiskFull
from ..fsutil import atomic_write, atomic_write_bytes
from .crop import (SIZE_STEP, FocalHook, apply_focal_hook, bucket_geometry, center_offset, cover_geometry,
                   focal_offset)
from .history import write_json
from .imageio import (BACKGROUNDS, DEFAULT_MAX_PIXELS, MIN_SHORT_SIDE, ImageProblem, decode, displayed_size, frame_count,
                      open_image, orient, to_rgb)
from .parallel import resolve_workers, run_jobs

MODES = ("bucket", "center", "focal")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}
FLIP_SUFFIX = "_flip"
MANIFEST = ".preprocess_outputs.json"   # which source each output came from (hidden: training skips it)
PNG_COMPRESS_LEVEL = 3   # lossless either way; Pillow's default 6 took ~2x as long here for ~8% smaller photos


@dataclass
class PreprocessOptions:
    resolution: int = 512               # any multiple of 64: 512, 768, 1024, ...
    mode: str = "bucket"                # bucket: keep aspect, downscale only | center | focal
    size: tuple[int, int] | None = None  # (width, height) for center / focal; default resolution x resolution
    background: str = "white"           # transparent pixels become white or black
    flip: bool = False                  # also write a mirrored copy (name + _flip)
    format: str = "png"                 # png | jpg | webp
    quality: int = 95                   # jpg / webp
    copy_captions: bool = True          # copy name.txt beside each output
    caption_extension: str = ".txt"
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None          # None: all cores
    start_method: str | None = None     # multiprocessing start method; None: fork when safe, else spawn
    focal_hook: FocalHook | None = field(default=None, repr=False, compare=False)  # the host's focal crop

    def target(self) -> tuple[int, int]:
        return tuple(self.size) if self.size else (self.resolution, self.resolution)  # type: ignore[return-value]

    def validate(self) -> None:
        def multiple(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < SIZE_STEP or v > 8192 or v % SIZE_STEP:
                raise ConfigError(f"{name} must be a multiple of {SIZE_STEP} between {SIZE_STEP} and 8192 "
                                  f"(e.g. 512, 768, 1024), got {v!r}")
        multiple("resolution", self.resolution)
        if self.size is not None:
            if len(tuple(self.size)) != 2:
                raise ConfigError(f"size must be (width, height), got {self.size!r}")
            multiple("size width", self.size[0])
            multiple("size height", self.size[1])
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.format.lower() not in FORMATS:
            raise ConfigError(f"format must be one of png, jpg, webp, got {self.format!r}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be an integer from 1 to 100, got {self.quality!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        if self.focal_hook is not None and not callable(self.focal_hook):
            raise ConfigError("focal_hook must be callable (image, (width, height)) -> image or (left, top)")
        resolve_workers(self.workers, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("focal_hook")
        d["focal_hook"] = self.focal_hook is not None
        return d


@dataclass
class PreprocessItem:
    source: str
    outputs: list[str] = field(default_factory=list)
    status: str = "ok"                  # ok | skipped
    code: str | None = None             # why it was skipped (imageio / check codes)
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # written size
    source_size: tuple[int, int] | None = None


@dataclass
class PreprocessResult:
    out_dir: str
    items: list[PreprocessItem]
    options: dict
    seconds: float
    workers: int

    @property
    def written(self) -> list[str]:
        return [p for it in self.items for p in it.outputs]

    @property
    def skipped(self) -> list[PreprocessItem]:
        return [it for it in self.items if it.status != "ok"]

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "options": self.options, "seconds": round(self.seconds, 3),
                "workers": self.workers, "processed": len(self.items) - len(self.skipped),
                "skipped": len(self.skipped), "written": len(self.written), "items": [asdict(i) for i in self.items]}

    def summary_text(self) -> str:
        ok = len(self.items) - len(self.skipped)
        lines = [f"{ok} of {len(self.items)} files processed into {self.out_dir} ({len(self.written)} images "
                 f"written, {self.seconds:.1f} s, {self.workers} worker{'s' if self.workers != 1 else ''})"]
        for it in self.skipped:
            lines.append(f"  skipped {it.source}: {it.reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------- sources and names


def collect_sources(src: str | Sequence[str], *, recursive: bool = False, caption_extension: str = ".txt",
                    exclude: Sequence[str] = ()) -> list[str]:
    """Files to process: a folder's files (not hidden, not captions; sorted), or the given list as is."""
    if not isinstance(src, (str, os.PathLike)):
        return [os.fspath(p) for p in src]
    src = os.fspath(src)
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise ConfigError(f"source not found: {src}")
    skip = {os.path.realpath(e) for e in exclude}
    out: list[str] = []
    for folder, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) not in skip)
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(caption_extension.lower()):
                continue
            out.append(os.path.join(folder, name))
        if not recursive:
            break
    return out


def _load_manifest(out_dir: str) -> dict[str, str]:
    """{output file name (lower case): the source it was made from} for what earlier runs wrote here."""
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
        return {str(k).lower(): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def plan_names(sources: Sequence[str], out_dir: str, ext: str, flip: bool, root: str | None = None,
               caption_extension: str = ".txt") -> list[list[str]]:
    """Output paths per source (main, then mirrored): the source's stem (with its sub-folder when `root` is
    given), numbered on a clash. A file already in `out_dir` is only replaced when an earlier run made it from
    the same source (a re-run); anything else there (another import's output, the user's own files) keeps its
    name. The same sources and folder contents always give the same names."""
    owners = _load_manifest(out_dir)
    try:
        existing = {n.lower() for n in os.listdir(out_dir)}
    except OSError:
        existing = set()
    taken: set[str] = set()
    plans = []
    for src in sources:
        if root is not None:
            rel = os.path.splitext(os.path.relpath(src, root))[0]
            stem = rel.replace(os.sep, "_").replace("/", "_")
        else:
            stem = os.path.splitext(os.path.basename(src))[0]
        stem = stem or "image"
        me = os.path.realpath(src)
        candidate, k = stem, 2
        while True:
            stems = [candidate] + ([candidate + FLIP_SUFFIX] if flip else [])
            names = [st + ext for st in stems]
            files = [n.lower() for n in names + [st + caption_extension for st in stems]]
            if not any(f in taken or (f in existing and owners.get(f) != me) for f in files):
                break
            candidate, k = f"{stem}-{k}", k + 1
        taken.update(files)
        plans.append([os.path.join(out_dir, n) for n in names])
    return plans


def _save_manifest(out_dir: str, items: Sequence["PreprocessItem"], caption_extension: str) -> None:
    owners = _load_manifest(out_dir)
    for it in items:
        for p in it.outputs:
            base = os.path.basename(p)
            owners[base.lower()] = os.path.realpath(it.source)
            owners[(os.path.splitext(base)[0] + caption_extension).lower()] = os.path.realpath(it.source)
    if owners:
        write_json(os.path.join(out_dir, MANIFEST), dict(sorted(owners.items())))


def _guard_out_dir(sources: Sequence[str], out_dir: str) -> None:
    out_real = os.path.realpath(out_dir)
    for src in sources:
        if os.path.realpath(os.path.dirname(os.path.abspath(src))) == out_real:
            raise ConfigError(f"the output folder {out_dir} holds the source {src}; choose another output folder "
                              f"(originals are never overwritten)")


# ---------------------------------------------------------------- one file (runs in a worker)


@dataclass
class _Job:
    source: str
    outputs: list[str]
    caption: str | None
    opts: dict


def _save(img: Image.Image, path: str, fmt: str, quality: int) -> None:
    params = {"quality": quality} if fmt in ("JPEG", "WEBP") else {"compress_level": PNG_COMPRESS_LEVEL}
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **params))


def _copy_caption(src: str, outputs: Sequence[str], ext: str, notes: list[str]) -> None:
    try:
        with open(src, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        notes.append(f"caption {os.path.basename(src)} not copied: not UTF-8 text")
        return
    except OSError as exc:
        notes.append(f"caption {os.path.basename(src)} not copied: {exc}")
        return
    if not text.strip():
        notes.append(f"caption {os.path.basename(src)} not copied: it is empty")
        return
    for out in outputs:
        atomic_write_bytes(os.path.splitext(out)[0] + ext, text.encode("utf-8"))


def _process(job: _Job, hook: FocalHook | None = None) -> PreprocessItem:
    o = job.opts
    item = PreprocessItem(job.source)
    bg = BACKGROUNDS[o["background"]]
    mode = o["mode"]
    try:
        with open_image(job.source, o["max_pixels"]) as img:
            orientation = exif_orientation(img)
            w, h = displayed_size(img)
            item.source_size = (w, h)
            frames = frame_count(img)
            if frames > 1:
                img.seek(0)
                item.notes.append(f"animated ({frames} frames): only the first frame is used")
            if orientation in ORIENTATION_OPS:
                item.notes.append(f"EXIF orientation {orientation} applied")
            if min(w, h) < MIN_SHORT_SIDE:
                item.notes.append(f"small source: {w}x{h} (short side under {MIN_SHORT_SIDE} px)")
            if mode == "bucket":
                resized_size, final = bucket_geometry(w, h, o["resolution"])
            else:
                final = tuple(o["size"]) if o["size"] else (o["resolution"], o["resolution"])
                resized_size = cover_geometry(w, h, final)
                if resized_size[0] > w:
                    item.notes.append(f"upscaled x{resized_size[0] / w:.2f} (the source is smaller than "
                                      f"{final[0]}x{final[1]})")
            if resized_size[0] * resized_size[1] > o["max_pixels"]:
                raise ImageProblem("extreme_aspect", f"extreme aspect ratio {w}x{h}: covering {final[0]}x{final[1]} "
                                                     f"would need {resized_size[0]}x{resized_size[1]} pixels; crop "
                                                     f"it by hand or use bucket mode")
            need = resized_size[::-1] if orientation in TRANSPOSED_ORIENTATIONS else resized_size
            decode(img, need)
            rgb, notes = to_rgb(img, bg)
            item.notes += notes
            rgb = orient(rgb, orientation)
            if rgb.size != tuple(resized_size):
                rgb = rgb.resize(resized_size, resize_filter(rgb.size, resized_size, None))
            if mode == "focal" and hook is not None:
                out = apply_focal_hook(hook, rgb, final)
            else:
                left, top = focal_offset(rgb, final) if mode == "focal" else center_offset(rgb.size, final)
                out = rgb if (left, top, *final) == (0, 0, *rgb.size) else rgb.crop((left, top, left + final[0],
                                                                                   top + final[1]))
            fmt = FORMATS[o["format"].lower()][0]
            _save(out, job.outputs[0], fmt, o["quality"])
            if len(job.outputs) > 1:
                _save(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT), job.outputs[1], fmt, o["quality"])
            item.outputs = list(job.outputs)
            item.size = tuple(out.size)  # type: ignore[assignment]
        if job.caption is not None:
            _copy_caption(job.caption, job.outputs, o["caption_extension"], item.notes)
    except ImageProblem as p:
        item.status, item.code, item.reason = "skipped", p.code, p.message
    except Exception as exc:  # noqa: BLE001 - a bad file is reported, never fatal
        item.status, item.code = "skipped", "error"
        item.reason = f"could not be processed ({type(exc).__name__}: {exc})"
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:   # not this file's fault: preprocess() stops
            item.code, item.reason = "disk_full", f"could not be written: the disk is full ({exc.strerror})"
    if item.status != "ok":
        item.outputs, item.notes = [], [n for n in item.notes if not n.startswith("upscaled")]
    return item


def _lost(job: _Job, why: str) -> PreprocessItem:
    return PreprocessItem(job.source, status="skipped", code="error", reason=why)


class _HookRunner:
    """Picklable wrapper binding the focal hook to `_process` (when the hook itself pickles)."""

    def __init__(self, hook: FocalHook):
        self.hook = hook

    def __call__(self, job: _Job) -> PreprocessItem:
        return _process(job, self.hook)


# ---------------------------------------------------------------- public


def preprocess(src: str | Sequence[str], out_dir: str, options: PreprocessOptions | None = None, *,
               recursive: bool = False, progress: Callable[[int, int, PreprocessItem], None] | None = None,
               stop: threading.Event | None = None) -> PreprocessResult:
    """Process a folder (or a list of files) into `out_dir`; see PreprocessOptions. Never raises for a bad file."""
    opts = options or PreprocessOptions()
    opts.validate()
    out_dir = os.fspath(out_dir)
    sources = collect_sources(src, recursive=recursive, caption_extension=opts.caption_extension,
                              exclude=[out_dir])
    _guard_out_dir(sources, out_dir)
    root = os.fspath(src) if recursive and isinstance(src, (str, os.PathLike)) and os.path.isdir(src) else None
    ext = FORMATS[opts.format.lower()][1]
    plans = plan_names(sources, out_dir, ext, opts.flip, root, opts.caption_extension)
    src_real = {os.path.realpath(s) for s in sources}
    for outs in plans:
        for p in outs:
            if os.path.realpath(p) in src_real:
                raise ConfigError(f"{p} would overwrite a source file; choose another output folder")
    os.makedirs(out_dir, exist_ok=True)
    o = opts.to_dict()
    jobs = []
    for s, outs in zip(sources, plans):
        cap = os.path.splitext(s)[0] + opts.caption_extension
        jobs.append(_Job(s, outs, cap if opts.copy_captions and os.path.isfile(cap) else None, o))

    fn: Callable[[_Job], PreprocessItem] = _process
    workers = opts.workers
    if opts.focal_hook is not None:
        fn = _HookRunner(opts.focal_hook)
        try:
            pickle.dumps(fn)
        except Exception:  # noqa: BLE001 - a host hook holding models stays in this process
            workers = 1
    n = resolve_workers(workers, max(1, len(jobs)))
    done = [0]

    def on_result(i: int, item: PreprocessItem) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(jobs), item)

    t0 = time.perf_counter()
    items = run_jobs(fn, jobs, workers=n, start_method=opts.start_method, on_result=on_result, stop=stop,
                     on_lost=_lost)
    _save_manifest(out_dir, items, opts.caption_extension)
    full = [it for it in items if it.code == "disk_full"]
    if full:
        ok = sum(it.status == "ok" for it in items)
        raise DiskFull(f"the disk is full: {len(full)} of {len(items)} images could not be written to {out_dir} "
                       f"({ok} were, completely; no partial file is left and the originals are untouched). Free "
                       f"some space and run preprocess again")
    return PreprocessResult(out_dir, items, o, time.perf_counter() - t0, n)
