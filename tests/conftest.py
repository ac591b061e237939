"""Test-wide settings."""
import os
import sys

import torch

# On a 2-core machine, torch's OpenMP threads fight over the cores with tiny models (and with anything else
# running): one thread was 5-15x faster per step here. Tests measure behaviour, not speed.
# LORA_TRAIN_TEST_THREADS=N runs the suite with N threads instead (another summation order in the kernels: the
# float tolerances must hold for any, see README "Tests that pass on any machine").
torch.set_num_threads(int(os.environ.get("LORA_TRAIN_TEST_THREADS") or 1))
sys.path.insert(0, os.path.dirname(__file__))
