"""The C allocator's settings for a process that moves large payloads (glibc only).

glibc maps every block of 128 KiB or more on its own and unmaps it when freed, and gives the top
of its heap back to the system once 128 KiB there are free. It raises both limits as it sees
large blocks freed, but only to about one block (mapping) and two (trimming). A process with a
few megabyte payloads in flight, each held by a message that libzmq allocates in its I/O thread
and Python frees in another, then gets fresh pages for nearly every payload: each one faulted
in and zeroed by the kernel, and unmapped again soon after (248 of 256 pages of each MiB, in
tests/test_allocator.py's pattern). Fixed limits keep payload-sized blocks in the heap for reuse.

`zrpc broker start` and `zrpc worker run` apply them; an application that sends or receives
large payloads can call :func:`tune_allocator` itself. Settings the operator gave glibc win: its
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ variables, or the same in GLIBC_TUNABLES.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("zrpc")

# Blocks below this come from the heap, and are reused (glibc's own ceiling is 32 MiB).
MMAP_THRESHOLD = 16 << 20
# Each arena (glibc gives busy threads their own, up to 8 per core) keeps this much free memory
# at its top before giving any back: room for a few megabyte payloads in flight, with copies.
# 32 and 64 MiB measured alike for 1 MiB payloads; the lower one bounds what idle threads hold.
TRIM_THRESHOLD = 32 << 20

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def tune_allocator() -> bool:
    """Keep payload-sized blocks in the C heap; True when applied.

    Does nothing where the C library is not glibc, or when the operator set either threshold for
    glibc. The cost: up to TRIM_THRESHOLD of freed memory per arena stays with the process.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in os.environ for name in _GLIBC_VARIABLES) or any(name in tunables for name in _GLIBC_TUNABLES):
        log.debug("allocator: thresholds set for glibc in the environment; leaving them alone")
        return False
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):  # not a GNU C library, or no confstr at all
        libc_version = ""
    if not libc_version.startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if applied:
        log.debug("allocator: blocks under %d MiB stay in the heap; it keeps up to %d MiB free (%s)",
                  MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20, libc_version)
    return applied
