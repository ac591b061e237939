"""bench/vs_sd_scripts.py reads step times from the programs' own progress bars: only the training bars count."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from vs_sd_scripts import training_bar_steps  # noqa: E402

BAR = "\u258d         ".encode()


def test_a_caching_bar_over_as_many_images_is_not_a_training_step():
    caching = b"  4%|" + BAR + b"| 1/24 [00:00<00:11,  2.07it/s]\r 46%|" + BAR + b"| 11/24 [00:04<00:05,  2.38it/s]"
    assert training_bar_steps(caching, 24) == []


def test_both_programs_training_bars_are_read():
    sd_scripts = b"\rsteps:   4%|" + BAR + b"| 1/24 [00:02<00:56,  2.44s/it]\rsteps:   8%|" + BAR + \
        b"| 2/24 [00:04<00:50,  2.30s/it, avr_loss=0.993]"
    engine = b"\r  4%|" + BAR + b"| 1/24 [00:02<00:53,  2.33s/step, epoch 1/1 loss 1.3417]\r  8%|" + BAR + \
        b"| 2/24 [00:04<00:50,  2.30s/step]"
    assert training_bar_steps(sd_scripts, 24) == [1, 2]
    assert training_bar_steps(engine, 24) == [1, 2]
    assert training_bar_steps(engine, 12) == []             # another run length
    assert training_bar_steps(b"\r  0%|          | 0/24 [00:00<?, ?step/s]", 24) == [0]
