"""Small helpers the sections share: the open project by name, thumbnails, a project's active job."""
from __future__ import annotations

import hashlib
import os
from typing import Any

from ..errors import ConfigError, DataError
from ..fsutil import atomic_write
from ..prep.project import Project, is_project, open_project
from .context import UIContext

CACHE_DIR = ".ui_cache"          # hidden folder in a project: thumbnails, reprocess scratch, backups
THUMB_SIZE = 192
MAX_GALLERY = 200


def project_names(ctx: UIContext) -> list[str]:
    root = ctx.host.paths.projects
    if not os.path.isdir(root):
        return []
    return sorted(e.name for e in os.scandir(root)
                  if e.is_dir() and not e.name.startswith(".") and is_project(e.path))


def get_project(ctx: UIContext, name: str | None) -> Project:
    if not name:
        raise ConfigError("open or create a project first")
    root = ctx.host.paths.project_dir(name)
    if not is_project(root):
        raise DataError(f"project '{name}' does not exist in {ctx.host.paths.projects}")
    return open_project(root)


def active_job(ctx: UIContext, project: str | None):
    for job in ctx.jobs.list(project):
        if job.active:
            return job
    return None


def cache_dir(project: Project, *parts: str) -> str:
    path = os.path.join(project.root, CACHE_DIR, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def thumbnail(path: str, folder: str, size: int = THUMB_SIZE) -> str:
    """A small PNG of `path` in `folder` (made once per file version); a grey tile when it cannot be read."""
    try:
        st = os.stat(path)
        key = f"{os.path.realpath(path)}|{st.st_mtime_ns}|{st.st_size}|{size}"
    except OSError:
        key = f"{path}|missing|{size}"
    out = os.path.join(folder, hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".png")
    if os.path.exists(out):
        return out
    from PIL import Image

    from ..dataset.images import exif_orientation
    from ..prep.imageio import ImageProblem, decode, open_image, orient, to_rgb
    try:
        with open_image(path) as img:
            orientation = exif_orientation(img)
            decode(img, (size, size))
            rgb, _ = to_rgb(img)
            thumb = orient(rgb, orientation).copy()
        thumb.thumbnail((size, size))
    except (ImageProblem, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        thumb = Image.new("RGB", (size, size), (150, 150, 150))
    atomic_write(out, lambda tmp: thumb.save(tmp, format="PNG"))
    return out


def gallery(items: list[tuple[str, str]], folder: str) -> list[tuple[str, str]]:
    """(thumbnail path, caption) for a gr.Gallery."""
    return [(thumbnail(p, folder), caption) for p, caption in items[:MAX_GALLERY]]


def plain(value: Any) -> Any:
    """A JSON-friendly copy (numbers from Gradio may be numpy scalars)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
