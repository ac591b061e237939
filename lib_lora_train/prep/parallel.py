"""Run one function over many files on all cores, results in input order, a dead worker never a crash.

Processes, not threads: decoding, resizing and PNG encoding hold the GIL in places, and a crash or an
out-of-memory in one worker must not take the host (the WebUI) down. `fork` is used when it is safe (Linux, no
other thread running, CUDA not initialised); otherwise `spawn`.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import multiprocessing
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence, TypeVar

from ..errors import ConfigError

J = TypeVar("J")
R = TypeVar("R")


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None, n_jobs: int) -> int:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    n = available_cores() if workers is None else workers
    return max(1, min(n, n_jobs))


def _start_method(requested: str | None) -> str:
    methods = multiprocessing.get_all_start_methods()
    if requested is not None:
        if requested not in methods:
            raise ConfigError(f"start_method '{requested}' is not available here; use one of {', '.join(methods)}")
        return requested
    torch = sys.modules.get("torch")
    cuda_busy = bool(torch is not None and getattr(torch, "cuda", None) is not None
                     and torch.cuda.is_initialized())
    if "fork" in methods and threading.active_count() == 1 and not cuda_busy:
        return "fork"
    return "spawn"


PACKAGE = __name__.split(".")[0]
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def _importable_in_workers(ctx: Any):
    """Spawned workers import this package from the parent's sys.path, and inside the WebUI the extension's
    folder is on sys.path only while the WebUI loads the extension's script. While the pool lives, that folder is
    added at the end of sys.path (nothing of the host's is shadowed) and removed again afterwards."""
    if ctx.get_start_method() == "fork" or importlib.machinery.PathFinder.find_spec(PACKAGE, sys.path) is not None:
        yield
        return
    sys.path.append(PACKAGE_PARENT)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(PACKAGE_PARENT)


def _init_worker() -> None:
    # this process is ours: make sure a truncated file raises here even if the host relaxed it for itself
    from PIL import ImageFile
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def run_jobs(fn: Callable[[J], R], jobs: Sequence[J], *, workers: int | None = None,
             start_method: str | None = None, on_result: Callable[[int, R], None] | None = None,
             stop: threading.Event | None = None, on_lost: Callable[[J, str], R]) -> list[R]:
    """`[fn(job) for job in jobs]` over a process pool (in-process when one worker is enough).

    `fn` must be a module-level function that never raises for a bad file. `on_lost(job, why)` makes the result
    for a job whose worker died or that was not run because `stop` was set.
    """
    n = resolve_workers(workers, len(jobs))
    results: list[Any] = [None] * len(jobs)
    if n <= 1:
        for i, job in enumerate(jobs):
            if stop is not None and stop.is_set():
                results[i] = on_lost(job, "stopped before this file")
            else:
                try:
                    results[i] = fn(job)
                except Exception as exc:  # noqa: BLE001 - one file must never stop the others
                    results[i] = on_lost(job, f"unexpected error {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(i, results[i])
        return results
    ctx = multiprocessing.get_context(_start_method(start_method))
    with _importable_in_workers(ctx), ProcessPoolExecutor(max_workers=n, mp_context=ctx,
                                                          initializer=_init_worker) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for i, fut in enumerate(futures):
            if stop is not None and stop.is_set():
                for f in futures[i:]:
                    f.cancel()
            if fut.cancelled():
                results[i] = on_lost(jobs[i], "stopped before this file")
            else:
                try:
                    results[i] = fut.result()
                except BrokenProcessPool:
                    results[i] = on_lost(jobs[i], "the worker process died (out of memory or a crash in a "
                                                  "decoder) while this or another file was being processed")
                except Exception as exc:  # noqa: BLE001 - one file must never stop the others
                    results[i] = on_lost(jobs[i], f"unexpected error {type(exc).__name__}: {exc}")
            if on_result is not None:
                on_result(i, results[i])
    return results
