"""Handing a finished run's memory back to the process and the machine.

What a run allocated (adapters, optimizer state, cached latents and conditionings, autograd
graphs) is owned by ``train_lora``'s frames and goes when they do; what can outlive them is
reference cycles (an exception's traceback holds the frames that raised it, and their locals),
the CUDA caching allocator's reserved blocks, and freed pages glibc keeps in its heap instead
of returning them to the OS (the resident set stays high though nothing uses them). The CUDA
cache is the host's to empty (A1111's ``devices.torch_gc``)."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release() -> None:
    """Collect cycles and return free heap pages to the OS."""
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """glibc's ``malloc_trim(0)``: without it, the resident set after a run stays where the run's
    peak left it (freed blocks below the mmap threshold stay in the heap). No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return
    trim(0)
