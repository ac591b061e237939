"""Test-wide settings."""
import os
import sys

import pytest
import torch

# On a 2-core machine, torch's OpenMP threads fight over the cores with tiny models (and with anything else
# running): one thread was 5-15x faster per step here. Tests measure behaviour, not speed.
# LORA_TRAIN_TEST_THREADS=N runs the suite with N threads instead (another summation order in the kernels: the
# float tolerances must hold for any, see README "Tests that pass on any machine").
torch.set_num_threads(int(os.environ.get("LORA_TRAIN_TEST_THREADS") or 1))
sys.path.insert(0, os.path.dirname(__file__))


# The end of the session. Threads the tests leave behind (the engine's own background threads, and those of host
# stand-ins, anyio portals and test helpers) must not decide the exit code: CPython ends a daemon thread at exit
# when it next takes the GIL, and one that is inside a torch call then aborts the process ("terminate called without
# an active exception", 134) after every test has passed — CI saw it once. The engine's threads are stopped as in
# any program (lib_lora_train/background.py; its exit behaviour is tested in subprocesses, tests/test_background.py);
# if others are still alive, the process ends with pytest's own exit status instead of running into them.
def pytest_sessionfinish(session, exitstatus):
    from lib_lora_train import background
    left = background.stop_all(timeout=120)
    if left:
        print(f"\nconftest: engine threads still running at the end: {left}", file=sys.stderr)
    session.config._lora_session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import threading
    session = getattr(config, "_lora_session", None)
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if session is None or not others:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
