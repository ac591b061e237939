"""Ctrl-C for the command line: the first press asks the job to stop cleanly, the second aborts at once."""
from __future__ import annotations

import signal
import sys
import threading


def install_sigint(stop: threading.Event, message: str) -> threading.Event:
    """Route SIGINT to `stop` (main thread only; elsewhere Python cannot install handlers). Returns `stop`."""
    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{message} (Ctrl-C again to abort)", file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
    return stop
