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


def pytest_sessionfinish(session, exitstatus):
    """The engine's background threads (jobs, grids, tools, reg images) the tests left behind are stopped here as at
    any program's exit (lib_lora_train/background.py): one still running 120 s (LORA_TRAIN_TEST_STOP_WAIT) after
    being asked fails the session.
    (Left to interpreter exit, one inside a torch call aborts the process: CI saw that once, exit 134 after every
    test had passed; tests/test_background.py checks the exit hook in subprocesses.)"""
    from lib_lora_train import background
    left = background.stop_all(timeout=float(os.environ.get("LORA_TRAIN_TEST_STOP_WAIT") or 120))
    if left:
        print(f"\nconftest: engine threads did not stop when asked: {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
