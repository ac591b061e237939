"""A full disk while preprocessing: a clear error instead of images reported as bad, nothing partial, originals
untouched, and a second run completes."""
import os

import pytest
from PIL import Image

from faults_support import make_data
from lib_lora_train.errors import DiskFull
from lib_lora_train.fsutil import FAULT_ENV
from lib_lora_train.prep.preprocess import MANIFEST, PreprocessOptions, preprocess


def snapshot(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_disk_full_while_preprocessing_stops_with_the_reason_and_loses_nothing(tmp_path, monkeypatch):
    src = os.path.join(make_data(tmp_path), "1_zkz")
    originals = snapshot(src)
    out = tmp_path / "img"
    opts = PreprocessOptions(resolution=64, workers=1)
    monkeypatch.setenv(FAULT_ENV, "enospc@write:002.png")
    with pytest.raises(DiskFull) as err:
        preprocess(src, str(out), opts)
    msg = str(err.value)
    assert "disk is full" in msg and "1 of 4 images could not be written" in msg and "3 were" in msg, msg
    assert snapshot(src) == originals
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.endswith(".tmp")]
    images = [n for n in names if n.endswith(".png")]
    assert images == ["000.png", "001.png", "003.png"]
    for n in images:
        with Image.open(out / n) as im:
            im.load()                                   # complete files only
    monkeypatch.delenv(FAULT_ENV)
    result = preprocess(src, str(out), opts)
    assert len(result.written) == 4 and not result.skipped
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == ["000.png", "001.png", "002.png", "003.png"]
    assert os.path.isfile(out / MANIFEST) and snapshot(src) == originals
