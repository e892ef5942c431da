"""Keep freed memory inside the process while timing on the CPU, as jemalloc and tcmalloc do.

Under glibc's default settings, large freed blocks go back to the kernel (mmap'd tensors are
unmapped, the heap top is trimmed), so every forward faults its activations in again: 20,000-28,000
minor page faults per MiniLM forward, 8-26% of its time. That cost is paid inside the timed call
and varies with the kernel's state, so it moved one policy's int8/fp32 ratio by up to 16% between
repeats (benchmarks/README.md). Setting glibc's mmap and trim thresholds high makes the allocator
reuse freed memory instead, which is also how PyTorch recommends CPU inference be served.

mallopt is process-wide and cannot be undone; elsewhere than glibc this changes nothing and says so.
"""

from __future__ import annotations

import ctypes
import platform

KEPT = "glibc, freed memory kept (mallopt mmap/trim thresholds 1 GiB)"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30
_state: str | None = None


def process_default() -> str:
    libc, version = platform.libc_ver()
    return f"{libc or 'unknown C library'} {version}".strip() + ", default malloc settings"


def allocator_state() -> str:
    """How this process's C allocator treats freed memory now (recorded with each study)."""
    return _state or process_default()


def keep_freed_memory() -> str:
    """Have glibc keep freed memory for reuse from now on; returns the allocator's state."""
    global _state
    if _state is None and platform.libc_ver()[0] == "glibc":
        mallopt = ctypes.CDLL(None).mallopt
        if mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD):
            _state = KEPT
    return allocator_state()


def prepare(keep: bool) -> bool:
    """Keep freed memory from now on where `keep`; True when this process's freed memory is kept."""
    if keep:
        keep_freed_memory()
    return allocator_state() == KEPT
