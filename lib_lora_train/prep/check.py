"""The dataset check ("lint"): every file named with a reason for each problem, folder mistakes with their fix,
near-duplicates, image counts against the guide, and whether training can start.

Run on import (`lint_files`), before every training and as `python -m lib_lora_train check DIR`
(`check_dataset`; `project.check_path` for a project folder). Files are only read; images are decoded in worker processes with the pixel
limit checked from the header first, so a decompression bomb or a broken file is a line in the report, never a
crash or an out-of-memory in the caller.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..dataset.images import IMAGE_EXTENSIONS, exif_orientation
from .imageio import (DEFAULT_MAX_PIXELS, MIN_SHORT_SIDE, ImageProblem, alpha_min, decode, displayed_size,
                      frame_count, has_alpha, is_convertible_image, is_training_image, open_image, orient,
                      perceptual_hash, to_rgb)
from .layout import check_layout
from .parallel import run_jobs
from .report import ERROR, INFO, WARNING, CheckReport, FileReport

# the guide users follow: 20-50 images for a character (more overfits), 50-80 for a style
GUIDANCE = {"character": (20, 50), "style": (50, 80)}
DUP_MAX_BITS = 5        # dHash bits that may differ between near-duplicates
DUP_MAX_THUMB = 10.0    # and mean grey difference (0-255) of their 8x8 thumbnails
MAX_ASPECT = 4          # sd-scripts' buckets (256-1024 at 512) go from 1:4 to 4:1
HASH_DRAFT = (64, 64)   # JPEGs are decoded at a reduced scale for the check (the whole file is still read)
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_NOTED_MODES = {"P": "palette (P)", "LA": "grey with alpha (LA)", "PA": "palette with alpha (PA)",
                "1": "1-bit (1)", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV", "L": "greyscale (L)"}


@dataclass
class _Job:
    path: str
    max_pixels: int
    min_side: int
    training: bool      # inside a training folder (the engine reads it as is) or a source to be preprocessed


def inspect_image(job: _Job) -> FileReport:
    """Everything the check says about one image file; never raises."""
    rep = FileReport(job.path, "image")
    try:
        with open_image(job.path, job.max_pixels) as img:
            rep.format, rep.mode = img.format, img.mode
            rep.size = displayed_size(img)
            orientation = exif_orientation(img)
            frames = frame_count(img)
            if frames > 1:
                img.seek(0)
            decode(img, HASH_DRAFT)
            if img.mode in _HIGH_BIT:
                rep.add("unusual_mode", WARNING,
                        f"high bit depth mode {img.mode}: training would clip it to white; preprocess scales it to "
                        f"8-bit RGB")
            elif img.mode == "CMYK":
                rep.add("unusual_mode", WARNING, "CMYK (print) colours: converted to RGB without a colour profile, "
                                                 "colours may shift; re-save it as RGB to be sure")
            elif has_alpha(img):
                if alpha_min(img) < 255:
                    rep.add("transparency", WARNING,
                            "real transparency (the guide says never transparent): it will be flattened onto white "
                            "(training) or the background you choose (preprocess)")
                else:
                    rep.add("unusual_mode", INFO, f"{img.mode} with an unused alpha channel: converted to RGB")
            elif img.mode in _NOTED_MODES and img.mode != "L":
                rep.add("unusual_mode", INFO, f"{_NOTED_MODES[img.mode]}: converted to RGB")
            elif img.mode not in ("RGB", "L"):
                rep.add("unsupported_mode", WARNING, f"unusual mode {img.mode}: converted to RGB, check the result")
            if frames > 1:
                rep.add("animated", WARNING, f"animated ({frames} frames): only the first frame is used")
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                rep.add("exif_orientation", INFO, f"EXIF orientation {orientation}: the rotation will be applied "
                                                  f"(it is used as {rep.size[0]}x{rep.size[1]})")
            rgb, _ = to_rgb(img)
            rep.phash = perceptual_hash(orient(rgb, orientation))
    except ImageProblem as p:
        rep.add(p.code, ERROR, p.message + ("; remove it from the training folder" if job.training else ""))
        return rep
    except Exception as exc:  # noqa: BLE001 - the check reports, it never stops
        rep.add("unreadable", ERROR, f"cannot be checked ({type(exc).__name__}: {exc})")
        return rep
    w, h = rep.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        rep.add("extreme_aspect", WARNING, f"extreme aspect ratio {w}x{h} (over {MAX_ASPECT}:1): buckets reach "
                                           f"4:1 at most, so most of it will be cropped away")
    if min(w, h) < job.min_side:
        rep.add("too_small", WARNING, f"too small: {w}x{h} (short side {min(w, h)} px < {job.min_side} px); it will "
                                      f"be upscaled and look soft; use a larger image or drop it")
    return rep


def _lost(job: _Job, why: str) -> FileReport:
    rep = FileReport(job.path, "image")
    rep.add("unreadable", ERROR, why)
    return rep


def check_caption(path: str, image_stems: set[str], caption_extension: str) -> FileReport:
    """Caption file problems as the engine would meet them (`dataset.captions.read_caption_file`)."""
    rep = FileReport(path, "caption")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        rep.add("unreadable", ERROR, f"caption cannot be read: {exc}")
        return rep
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        rep.add("caption_not_utf8", ERROR, f"caption is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                           f"training stops on it: re-save it as UTF-8")
        text = None
    if text is not None and not text.splitlines():
        rep.add("caption_empty", ERROR, "empty caption file: training stops on it; write tags into it or delete it "
                                        "(then the folder's class tokens are used)")
    elif text is not None and not text.splitlines()[0].strip():
        rep.add("caption_blank", WARNING, "the caption's first line is blank: the image trains with no caption")
    stem = os.path.splitext(path)[0]
    if os.path.normcase(stem) not in image_stems:
        rep.add("caption_orphan", WARNING, f"caption with no image (no {os.path.basename(stem)}.png/.jpg/... beside "
                                           f"it): delete it or add the image")
    return rep


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def find_near_duplicates(reports: Sequence[FileReport]) -> list[list[FileReport]]:
    """Groups (2 or more) of images whose perceptual hashes are close; in file order."""
    hashed = [r for r in reports if r.phash is not None]
    if len(hashed) < 2:
        return []
    bits = np.array([r.phash[0] for r in hashed], dtype=np.uint64)
    thumbs = np.stack([np.frombuffer(r.phash[1], dtype=np.uint8).astype(np.int16) for r in hashed])
    parent = list(range(len(hashed)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(hashed) - 1):
        dist = _popcount(bits[i + 1:] ^ bits[i])
        close = np.nonzero(dist <= DUP_MAX_BITS)[0]
        if close.size:
            diff = np.abs(thumbs[i + 1 + close] - thumbs[i]).mean(axis=1)
            for j in close[diff <= DUP_MAX_THUMB]:
                parent[find(i + 1 + int(j))] = find(i)
    groups: dict[int, list[FileReport]] = {}
    for i, r in enumerate(hashed):
        groups.setdefault(find(i), []).append(r)
    return [g for g in groups.values() if len(g) > 1]


def _mark_duplicates(reports: Sequence[FileReport]) -> int:
    n = 0
    for group in find_near_duplicates(reports):
        for r in group:
            others = ", ".join(os.path.basename(o.path) if os.path.dirname(o.path) == os.path.dirname(r.path)
                               else o.path for o in group if o is not r)
            r.add("near_duplicate", WARNING, f"near-duplicate of {others}: duplicates weigh the same picture "
                                             f"twice; keep one")
            n += 1
    return n


def _folder_files(folder: str, caption_extension: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(images incl. other image types, captions, other files, broken links) directly inside `folder`, sorted."""
    images, captions, other, broken = [], [], [], []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return images, captions, other, broken
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        if os.path.islink(path) and not os.path.exists(path):
            broken.append(path)
            continue
        if name.lower().endswith(caption_extension.lower()):
            captions.append(path)
        elif is_training_image(name) or is_convertible_image(name):
            images.append(path)
        else:
            other.append(path)
    return images, captions, other, broken


def _lint_folders(folders: Sequence[str], report: CheckReport, *, training: bool, caption_extension: str,
                  max_pixels: int, min_side: int, workers: int | None, stop: threading.Event | None,
                  progress: Callable[[int, int], None] | None) -> None:
    jobs, captions, others, links = [], [], [], []
    for folder in folders:
        images, caps, other, broken = _folder_files(folder, caption_extension)
        links += broken
        jobs += [_Job(p, max_pixels, min_side, training) for p in images]
        stems = {os.path.normcase(os.path.splitext(p)[0]) for p in images}
        captions += [(c, stems) for c in caps]
        others += other
    done = [0]

    def on_result(i: int, _r: FileReport) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(jobs))

    reports = run_jobs(inspect_image, jobs, workers=workers, on_result=on_result, stop=stop, on_lost=_lost)
    for rep in reports:
        if not is_training_image(rep.path):
            ext = os.path.splitext(rep.path)[1].lower()
            rep.add("not_training_format", WARNING if training else INFO,
                    f"training does not read {ext} files (only {' '.join(IMAGE_EXTENSIONS)}); preprocess converts "
                    f"it" + (" — or training ignores it" if training else ""))
    _mark_duplicates(reports)
    report.files += reports
    for path, stems in captions:
        report.files.append(check_caption(path, stems, caption_extension))
    for path in others:
        rep = FileReport(path, "other")
        rep.add("ignored_file", INFO, "not an image or caption file: ignored")
        report.files.append(rep)
    for path in links:
        rep = FileReport(path, "other")
        rep.add("broken_link", WARNING, f"broken link (to {os.readlink(path)}): training ignores it; delete it or "
                                        f"copy the real file here")
        report.files.append(rep)


def _count(report: CheckReport, train_paths: set[str]) -> None:
    images = [f for f in report.files if f.kind == "image"]
    report.counts = {
        "images": len(images),
        "usable_images": sum(1 for f in images if f.usable and is_training_image(f.path)),
        "train_images": sum(1 for f in images if os.path.dirname(f.path) in train_paths),
        "usable_train_images": sum(1 for f in images if os.path.dirname(f.path) in train_paths and f.usable
                                   and is_training_image(f.path)),
        "captions": sum(1 for f in report.files if f.kind == "caption"),
        "other": sum(1 for f in report.files if f.kind == "other"),
    }


def check_counts(n: int, purpose: str | None, report: CheckReport) -> None:
    """The guide's image counts as warnings: character 20-50 (more overfits), style 50-80."""
    if purpose is not None and purpose not in GUIDANCE:
        raise ValueError(f"purpose must be one of {', '.join(GUIDANCE)}, got {purpose!r}")
    if purpose:
        lo, hi = GUIDANCE[purpose]
        if n < lo:
            report.add("count_low", WARNING, f"{n} training images: the guide suggests {lo}-{hi} clear images for "
                                             f"a {purpose}; add more if you can")
        elif n > hi:
            report.add("count_high", WARNING, f"{n} training images: more than the {lo}-{hi} the guide suggests "
                                              f"for a {purpose} (more tends to overfit); keep the best {hi}")
        return
    words = "; ".join(f"{lo}-{hi} for a {p}" for p, (lo, hi) in GUIDANCE.items())
    if n < GUIDANCE["character"][0] or n > GUIDANCE["style"][1]:
        report.add("count_outside_guide", WARNING, f"{n} training images: the guide suggests {words}")
    else:
        report.add("count_guide", INFO, f"{n} training images (the guide suggests {words})")


def check_dataset(train_dir: str, reg_dir: str | None = None, *, purpose: str | None = None,
                  caption_extension: str = ".txt", max_pixels: int = DEFAULT_MAX_PIXELS,
                  min_side: int = MIN_SHORT_SIDE, workers: int | None = None, with_summary: bool = True,
                  stop: threading.Event | None = None,
                  progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Check a training folder (the parent of `N_name` folders) and optionally its regularisation folder."""
    report = CheckReport(os.fspath(train_dir))
    layout = check_layout(os.fspath(train_dir), reg_dir, report)
    _lint_folders(layout.image_folders + [p for p, _ in layout.reg_folders if p not in layout.image_folders],
                  report, training=True, caption_extension=caption_extension, max_pixels=max_pixels,
                  min_side=min_side, workers=workers, stop=stop, progress=progress)
    train_paths = {p for p, _ in layout.train_folders}
    read = train_paths | {p for p, _ in layout.reg_folders}
    for f in report.files:  # a folder training ignores cannot stop it
        if os.path.dirname(f.path) not in read:
            for issue in f.issues:
                if issue.severity == ERROR:
                    issue.severity = WARNING
                    issue.message += " (its folder is not read by training)"
    _count(report, train_paths)
    for folder in layout.image_folders:
        if folder not in train_paths and folder not in {p for p, _ in layout.reg_folders}:
            continue
        images = [f for f in report.files if f.kind == "image" and os.path.dirname(f.path) == folder]
        stems = {os.path.normcase(os.path.splitext(f.path)[0]) for f in report.files if f.kind == "caption"}
        missing = [f for f in images if os.path.normcase(os.path.splitext(f.path)[0]) not in stems]
        if missing and folder in train_paths:
            shown = ", ".join(os.path.basename(f.path) for f in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            report.add("caption_missing", WARNING, f"{len(missing)} of {len(images)} images in "
                                                   f"{os.path.basename(folder)} have no {caption_extension} caption "
                                                   f"({shown}{more}): run the tagger, or they train on the folder "
                                                   f"name's class tokens", folder)
    if layout.train_folders:
        check_counts(report.counts["usable_train_images"], purpose, report)
    if with_summary and report.can_train:
        from .repeats import dataset_summary
        try:
            report.summary = dataset_summary(os.fspath(train_dir), reg_dir).to_dict()
        except Exception as exc:  # noqa: BLE001 - the summary is extra; the check itself stands
            report.add("summary_failed", WARNING, f"the steps summary could not be computed: {exc}")
    return report


def lint_files(paths: Sequence[str], *, caption_extension: str = ".txt", max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = MIN_SHORT_SIDE, workers: int | None = None, root: str = "",
               stop: threading.Event | None = None) -> CheckReport:
    """Check files to be imported (no folder rules): every path gets a FileReport."""
    report = CheckReport(root)
    jobs = [_Job(os.fspath(p), max_pixels, min_side, False) for p in paths]
    reports = run_jobs(inspect_image, jobs, workers=workers, stop=stop, on_lost=_lost)
    for rep in reports:
        if rep.usable and not is_training_image(rep.path):
            rep.add("not_training_format", INFO, f"{os.path.splitext(rep.path)[1] or 'no extension'}: converted "
                                                 f"by preprocess")
    _mark_duplicates(reports)
    report.files = reports
    n_ok = sum(1 for r in reports if r.usable)
    report.counts = {"images": len(reports), "usable_images": n_ok, "train_images": n_ok,
                     "usable_train_images": n_ok, "captions": 0, "other": 0}
    return report
