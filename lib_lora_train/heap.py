"""Hand memory a finished run freed back to the operating system.

glibc's malloc keeps freed memory for reuse: after its first large free it raises its mmap threshold (up to
32 MB), so a run's many mid-sized CPU tensors come from the heap and stay resident when freed. In a real A1111
on CPU with SD 2.x this kept about 0.85 GiB after the first run (measured with the engine alone: +0.85 GiB after
the run, +0.13 GiB with MALLOC_MMAP_THRESHOLD_=131072). `malloc_trim` returns it; the next run takes it again
as it needs it.

tcmalloc, which A1111's webui.sh preloads on Linux where it is installed, keeps freed pages in its own page heap
(the whole +0.52 GiB of an SD 2.x run stayed after it, measured the same way); its C entry point
`MallocExtension_ReleaseFreeMemory` returns them. Elsewhere (macOS, Windows, musl) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def release_free_memory() -> bool:
    """True when the allocator was asked to give memory back (glibc said it did, or tcmalloc is loaded); False when
    there was nothing to give back or no allocator entry point."""
    if not sys.platform.startswith("linux"):
        return False
    released = False
    try:
        process = ctypes.CDLL(None)                 # the symbols the process has loaded (an LD_PRELOAD first)
        tcmalloc_release = process.MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        pass
    else:
        tcmalloc_release.argtypes, tcmalloc_release.restype = [], None
        tcmalloc_release()
        released = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return released
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0)) or released
