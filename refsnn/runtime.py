"""Process settings that change speed, never results: glibc's handling of freed memory.

A training step allocates its activations (u, o, h, errors: one (T, B, N) array each per layer)
and frees them at the end. For a conv net these are megabytes each: 28x28x1-15c5-... at T 5,
batch 64 gives 11 MB per float32 array of the first layer. glibc hands out blocks above its mmap
threshold (128 KiB at the start, raised on the fly up to 32 MiB) with mmap and gives freed heap
tops back to the OS beyond its trim threshold, so every step faults the same pages in again and
the kernel zeroes them: measured on the project's machine, STBP's neuron kernel on (5, 64, 8640)
float64 took 15.6-18.9 ms with glibc's defaults and 5.2-5.5 ms with the two thresholds below; a
whole conv5 training step (benchmarks/bench_peers.py) 150 -> 125 ms in float32.

:func:`keep_freed_memory` sets, through ``mallopt``, the mmap threshold to glibc's maximum
(32 MiB: blocks up to it come from the heap) and the trim threshold to 1 GiB (freed memory stays
with the process for the next step). The process's peak memory is what the step needs either
way. Not glibc (macOS, Windows, musl): nothing is done. A user's MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ wins. refsnn.train.train calls it (so the CLI and sweeps do), and
report.json records whether it took effect (machine.threads.keep_freed_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 * 1024 * 1024                    # glibc's largest allowed value (64-bit)
TRIM_THRESHOLD = 1 << 30
applied = False                                      # set by keep_freed_memory


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring). True if both were set."""
    if not sys.platform.startswith("linux") or any(
            v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):                # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global applied
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return applied
