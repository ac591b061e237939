"""Atomic writes keep the old file on failure and give ordinary permissions (not mkstemp's 0600)."""
import os
import stat

import pytest

from lib_lora_train.fsutil import atomic_write, atomic_write_bytes


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"new", overwrite=False)
    assert target.read_text() == "old"
