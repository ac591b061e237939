"""Test-wide settings."""
import os
import sys

import torch

# On a 2-core machine, torch's OpenMP threads fight over the cores with tiny models (and with anything else
# running): one thread was 5-15x faster per step here. Tests measure behaviour, not speed.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
