"""Atomic file writes: a reader never sees a half-written file, a crash never destroys the old one."""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import signal
import tempfile
from typing import Any, Callable

# Fault injection for the fault tests (tests/test_faults_*.py), read here and nowhere else:
# LORA_TRAIN_FAULT="<action>@<point pattern>[#n][;...]", e.g. "kill@write:*-000002.safetensors" or "enospc@state:*"
# ("#n": at the n-th time only).
# Points: write:<file name> (inside atomic_write, after the temporary file is written, before the rename),
# state:<folder name> (in the middle of a state save), step:<n> (before training step n), and what callers add.
FAULT_ENV = "LORA_TRAIN_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(where: str) -> None:
    """Act out an injected fault when LORA_TRAIN_FAULT names this point; a no-op otherwise.

    kill: SIGKILL this process, exactly what `kill -9` does; enospc: OSError(ENOSPC) as a full disk raises;
    oom: torch.OutOfMemoryError as an exhausted GPU raises.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for rule in spec.split(";"):
        action, _, pattern = rule.strip().partition("@")
        pattern, _, nth = pattern.partition("#")          # "#3": only at the 3rd time this point is reached
        if not pattern or not fnmatch.fnmatchcase(where, pattern):
            continue
        _fault_hits[rule] = _fault_hits.get(rule, 0) + 1
        if nth and _fault_hits[rule] != int(nth):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {where})")
        elif action == "oom":
            import torch
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {where})")
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action '{action}' in '{rule}' (kill, enospc, oom)")


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


TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+" + re.escape(TEMP_SUFFIX))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 probes without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def stale_temp_files(folder: str) -> list[str]:
    """Temporary files of atomic_write in `folder` whose writing process no longer runs (killed mid-save)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            out.append(os.path.join(folder, name))
    return out


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete what stale_temp_files finds; returns the paths removed."""
    removed = []
    for path in stale_temp_files(folder):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


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
    # the writer's pid is in the name, so a temp file left by a killed process can be told from a live one's
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        fault_point("write:" + os.path.basename(path))
        os.chmod(tmp, 0o666 & ~_umask())
        if sync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        refuse()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            exc.filename = path           # a full disk says which file it could not write (an OSError made
                                          # from a bare message has no errno: naming a file would hide it)
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
