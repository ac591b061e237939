"""heap.release_free_memory: glibc's malloc_trim after a job, a no-op where there is none. (How much it gives
back depends on the allocator's state, so no RSS is asserted here; the effect measured in a real A1111 is in
the README.)"""
import ctypes
import sys

from lib_lora_train import heap


def test_it_answers_a_bool_everywhere_and_never_raises(monkeypatch):
    assert heap.release_free_memory() in (True, False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert heap.release_free_memory() is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    assert heap.release_free_memory() is False
