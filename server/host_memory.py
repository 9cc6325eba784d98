"""The C allocator, set for a step loop: freed host memory is kept for the next step (`--retain-host-memory`).

Every engine step on CPU allocates and frees the same tensors again: the forward's activations, the logits,
the sampler's [rows, vocab] temporaries (a few MB each at 64 rows). glibc's malloc serves a block over its
mmap threshold with a fresh mmap and unmaps it on free, and gives the top of its heap back to the kernel once
more than its trim threshold is free there. Both start at 128 KiB and move only as blocks are freed, so
whether a step's tensors land on pages already mapped depends on what was freed before: when they do not,
every first touch of a 4 KiB page is a page fault and the kernel zeroes the page (top-p sampling's nucleus
pass makes ~20 full-vocabulary temporaries a step; `bench.sampling --modes "top-p only"` shows the cost).

So at start the server fixes both thresholds (mallopt, which also stops their dynamic adjustment): blocks up
to 32 MiB (the most glibc's heaps take) come from the heap, and up to 1 GiB of free heap top stays mapped.
The process's resident memory then stays near its high-water mark, as with a caching allocator's; blocks
over 32 MiB (a large model's biggest prefill temporaries) are still mapped and unmapped each time.

Left alone where the C library is not glibc, and where the environment already sets glibc's malloc tunables
(MALLOC_* variables or glibc.malloc.* in GLIBC_TUNABLES): an operator's own settings win.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30


def environment_sets_malloc(environ: Mapping[str, str]) -> bool:
    """Whether glibc's malloc is tuned from the environment (MALLOC_* variables, glibc.malloc.* in GLIBC_TUNABLES)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc." in tunables


def set_thresholds() -> str | None:
    """mallopt both thresholds (MMAP_THRESHOLD, TRIM_THRESHOLD) for this process; None when done, else why not."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return "not glibc"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return "glibc refused the thresholds"
    return None


def retain_freed_memory(environ: Mapping[str, str]) -> str:
    """set_thresholds() unless the environment tunes malloc itself (see the module docstring); returns a line
    for the start-up log saying what was done."""
    if environment_sets_malloc(environ):
        return "host memory: malloc left to the environment's MALLOC_* / GLIBC_TUNABLES settings"
    if (failed := set_thresholds()) is not None:
        return f"host memory: {failed}, malloc left as it is"
    return (
        f"host memory: freed blocks kept for reuse (glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
        f"trim threshold {TRIM_THRESHOLD >> 30} GiB; --retain-host-memory false for glibc's defaults)"
    )
