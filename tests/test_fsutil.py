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


def test_temp_files_of_dead_writers_are_found_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from lib_lora_train.fsutil import remove_stale_temp_files, stale_temp_files
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)                                 # exited: its pid is free (or reused, not by us)
    (tmp_path / f".a.safetensors.{dead_pid}.x1.tmp").write_bytes(b"half")
    (tmp_path / f".b.safetensors.{os.getpid()}.x2.tmp").write_bytes(b"mine, still writing")
    (tmp_path / "c.safetensors").write_bytes(b"a real file")
    found = stale_temp_files(str(tmp_path))
    if found:                                                   # unless the pid was reused at once
        assert [os.path.basename(p) for p in found] == [f".a.safetensors.{dead_pid}.x1.tmp"]
        assert remove_stale_temp_files(str(tmp_path)) == found
    assert sorted(os.listdir(tmp_path))[-2:] == [f".b.safetensors.{os.getpid()}.x2.tmp", "c.safetensors"]


def test_fault_hook_acts_only_where_and_when_named(tmp_path, monkeypatch):
    import errno

    from lib_lora_train import fsutil
    monkeypatch.setattr(fsutil, "_fault_hits", {})
    monkeypatch.setenv(fsutil.FAULT_ENV, "enospc@write:b*.txt#2")
    fsutil.atomic_write_bytes(tmp_path / "a.txt", b"1")        # not named
    fsutil.atomic_write_bytes(tmp_path / "b1.txt", b"1")       # named, 1st time: no fault
    with pytest.raises(OSError) as err:
        fsutil.atomic_write_bytes(tmp_path / "b2.txt", b"2")   # 2nd time: the disk is "full"
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "b2.txt")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b1.txt"]      # no temp file left
    monkeypatch.setenv(fsutil.FAULT_ENV, "explode@write:*")
    with pytest.raises(ValueError, match="unknown action"):
        fsutil.atomic_write_bytes(tmp_path / "c.txt", b"3")
