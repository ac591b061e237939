"""Preprocess a project again from its source copies (`<project>/source/img/<name>/`) with new options.

Safe to re-run: the new images are made in a scratch folder first; only when that worked are the old images
of the training folder moved to `<project>/.ui_cache/previous/<time>/<folder>/` (never deleted) and the new
ones moved in. Captions the user edited are kept: a new image gets the caption its old image of the same name
had; images without one get the caption copied from the source, if any.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

from ..dataset.config import parse_folder_name
from ..dataset.images import list_images
from ..errors import ConfigError
from ..prep.preprocess import MANIFEST, PreprocessOptions, collect_sources, preprocess
from ..prep.project import Project
from .common import CACHE_DIR


@dataclass
class FolderResult:
    folder: str
    written: int = 0
    skipped: list[str] = field(default_factory=list)     # "name: reason"
    kept_captions: int = 0
    backup: str | None = None
    note: str | None = None


def source_folders(project: Project) -> list[tuple[str, str]]:
    """(training folder, its source copies folder) for every training folder that has source copies."""
    base = os.path.join(project.source_dir, "img")
    pairs = []
    for folder in project.folders():
        parsed = parse_folder_name(os.path.basename(folder))
        if parsed is None:
            continue
        src = os.path.join(base, parsed[1])
        if os.path.isdir(src) and collect_sources(src):
            pairs.append((folder, src))
    return pairs


def _move_all(src_dir: str, dst_dir: str, *, hidden: bool) -> None:
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        if name.startswith(".") and not (hidden or name == MANIFEST):
            continue
        path = os.path.join(src_dir, name)
        if os.path.isfile(path) or os.path.islink(path):
            os.replace(path, os.path.join(dst_dir, name))


def reprocess_project(project: Project, options: PreprocessOptions) -> list[FolderResult]:
    options.validate()
    pairs = source_folders(project)
    if not pairs:
        raise ConfigError("this project has no imported originals to preprocess again (import images first)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for folder, src in pairs:
        res = FolderResult(folder)
        scratch = os.path.join(project.root, CACHE_DIR, f"reprocess-{uuid.uuid4().hex[:8]}")
        try:
            out = preprocess(src, scratch, options)
            res.skipped = [f"{os.path.basename(i.source)}: {i.reason}" for i in out.skipped]
            if not out.written:
                res.note = "no image could be processed; the training folder was left as it was"
                results.append(res)
                continue
            ext = options.caption_extension
            # the user's captions win over the source's: they are the edited ones
            for img in list_images(scratch):
                old = os.path.join(folder, os.path.splitext(os.path.basename(img))[0] + ext)
                if os.path.isfile(old):
                    shutil.copyfile(old, os.path.splitext(img)[0] + ext)
                    res.kept_captions += 1
            backup = os.path.join(project.root, CACHE_DIR, "previous", stamp, os.path.basename(folder))
            _move_all(folder, backup, hidden=False)
            res.backup = backup
            _move_all(scratch, folder, hidden=True)
            res.written = len(out.written)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        results.append(res)
    return results


def summary_text(project: Project, results: list[FolderResult]) -> str:
    lines = []
    for r in results:
        rel = os.path.relpath(r.folder, project.root)
        if r.note:
            lines.append(f"{rel}: {r.note}")
            continue
        lines.append(f"{rel}: {r.written} images written, {r.kept_captions} edited captions kept; the previous "
                     f"images are in {os.path.relpath(r.backup, project.root)}")
        lines += [f"  skipped {s}" for s in r.skipped]
    return "\n".join(lines)
