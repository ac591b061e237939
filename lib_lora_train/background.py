"""Background threads that run model work (training jobs, grids, tools, regularisation images), stopped before
the interpreter exits.

Why: at exit CPython ends a daemon thread when it next takes the GIL (pthread_exit, on Python before 3.14). A
thread that is inside a torch call at that moment is unwound through C++ code that cannot be unwound, and the
process aborts ("terminate called without an active exception", exit code 134) after its own work is done: a CLI
or a test run that succeeded reports a crash. So these threads are started here; at exit each is asked to stop
(its stop event, or its stop function) and joined, within a bound.
"""
from __future__ import annotations

import atexit
import sys
import threading
import time
from typing import Callable

EXIT_WAIT_S = 300.0       # at most this long in all: a step and a resumable state on a slow CPU; then exit anyway
_NOTICE_AFTER_S = 2.0     # say what is awaited once the wait is long enough to be noticed

_lock = threading.Lock()
_threads: list[tuple[threading.Thread, Callable[[], None]]] = []


def start(target: Callable[[], None], *, name: str, stop: threading.Event | Callable[[], None]) -> threading.Thread:
    """Start `target` in a daemon thread that is stopped (`stop` set or called) and joined when Python exits."""
    ask = stop.set if isinstance(stop, threading.Event) else stop
    thread = threading.Thread(target=target, name=name, daemon=True)
    with _lock:
        _threads[:] = [(t, s) for t, s in _threads if t.is_alive()]
        _threads.append((thread, ask))
    thread.start()
    return thread


def stop_all(timeout: float = EXIT_WAIT_S) -> list[str]:
    """Ask every live background thread to stop and wait for them; the names of those still running after
    `timeout` seconds (empty when all ended)."""
    with _lock:
        live = [(t, s) for t, s in _threads if t.is_alive()]
    for _, ask in live:
        try:
            ask()
        except Exception as exc:  # noqa: BLE001 - one failing stop must not keep the others running
            print(f"lora_train: could not stop a background thread: {exc}", file=sys.stderr)
    end = time.monotonic() + timeout
    told = False
    for thread, _ in live:
        thread.join(min(_NOTICE_AFTER_S, max(0.0, end - time.monotonic())))
        if thread.is_alive() and not told:
            told = True
            print(f"lora_train: waiting for {thread.name} to stop at its next step before exiting",
                  file=sys.stderr, flush=True)
        thread.join(max(0.0, end - time.monotonic()))
    return [t.name for t, _ in live if t.is_alive()]


atexit.register(stop_all)
