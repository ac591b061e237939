"""heap.release_free_memory: glibc's malloc_trim and tcmalloc's release after a job, a no-op where there is none.
How much glibc gives back depends on its state, so no RSS is asserted for it (the effect measured in a real A1111
is in the README); tcmalloc's page heap gives back whole freed pages, asserted where tcmalloc is installed."""
import ctypes
import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from lib_lora_train import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_it_answers_a_bool_everywhere_and_never_raises(monkeypatch):
    assert heap.release_free_memory() in (True, False)
    monkeypatch.setattr(sys, "platform", "win32")
    assert heap.release_free_memory() is False
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    assert heap.release_free_memory() is False


class _Lib:
    def __init__(self, **fns):
        self.__dict__.update(fns)


class _Fn:
    def __init__(self, result):
        self.calls, self.result = 0, result

    def __call__(self, *args):
        self.calls += 1
        return self.result


def test_tcmalloc_is_asked_to_release_when_the_process_has_it(monkeypatch):
    release, trim = _Fn(None), _Fn(0)
    libs = {None: _Lib(MallocExtension_ReleaseFreeMemory=release)}
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: libs.get(name) or _Lib(malloc_trim=trim))
    assert heap.release_free_memory() is True and release.calls == 1 and trim.calls == 1
    libs.clear()                                   # plain glibc: only malloc_trim, which found nothing to give back
    assert heap.release_free_memory() is False and release.calls == 1 and trim.calls == 2


_TCMALLOC = ctypes.util.find_library("tcmalloc_minimal") if sys.platform.startswith("linux") else None


@pytest.mark.skipif(not _TCMALLOC, reason="tcmalloc is not installed (apt: libtcmalloc-minimal4; make test installs "
                                          "it where apt-get can)")
def test_under_tcmalloc_preloaded_as_webui_sh_does_freed_tensors_leave_the_rss():
    """200 MiB of freed 1 MiB tensors stay resident in tcmalloc's page heap until it is asked; then they are gone.
    (Sizes are whole pages of tcmalloc's page heap, so the figure does not depend on thread caches.)"""
    code = textwrap.dedent("""
        import torch
        from lib_lora_train import heap
        def rss():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
        base = rss()
        ts = [torch.ones(256 * 1024) for _ in range(200)]
        del ts
        kept = rss() - base
        asked = heap.release_free_memory()
        print(kept >> 20, asked, (rss() - base) >> 20)
    """)
    env = {**os.environ, "LD_PRELOAD": _TCMALLOC, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kept, asked, after = out.stdout.split()
    assert int(kept) >= 150 and asked == "True" and int(after) <= 50, out.stdout
