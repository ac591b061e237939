"""Atomic file writes: a reader never sees a half-written file, a crash never destroys the old one."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = True,
                 exists_error: Callable[[str], Exception] | None = None, sync: bool = True) -> None:
    """Call `write(tmp_path)` for a temp file beside `path`, fsync it, then rename it over `path`.

    The file gets ordinary permissions (0666 minus the umask, like open() would give), not mkstemp's 0600,
    so a WebUI running as another user can read what we write. With overwrite=False an existing `path`
    raises `exists_error(path)` (checked again just before the rename).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def refuse() -> None:
        if not overwrite and os.path.exists(path):
            raise (exists_error(path) if exists_error else FileExistsError(path))
    refuse()
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if sync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        refuse()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kw: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    atomic_write(path, write, **kw)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
