"""Facts about the machine a study is measured on: the device, the CPU, its usable cores and the
thread count, the C allocator's treatment of freed memory, and the environment recorded with a study.

Keeping freed memory (`keep_freed_memory`): under glibc's default settings, large freed blocks go
back to the kernel (mmap'd tensors are unmapped, the heap top is trimmed), so every forward faults
its activations in again: 20,000-28,000 minor page faults per MiniLM forward, 8-26% of its time.
That cost is paid inside the timed call and varies with the kernel's state, so it moved one
policy's int8/fp32 ratio by up to 16% between repeats (benchmarks/README.md). Setting glibc's mmap
and trim thresholds high makes the allocator reuse freed memory instead, as jemalloc and tcmalloc
do, which is also how PyTorch recommends CPU inference be served. mallopt is process-wide and
cannot be undone; elsewhere than glibc this changes nothing and says so.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
from pathlib import Path

import torch

from autoprec.errors import AutoprecError

# --------------------------------------------------------------------------------------------
# device


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutoprecError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutoprecError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# cores and threads


def _quota_and_period(quota_file: Path) -> tuple[str, str]:
    """From cgroup v2 `cpu.max` ("QUOTA PERIOD") or v1 `cpu.cfs_quota_us` beside `cpu.cfs_period_us`."""
    fields = quota_file.read_text().split()
    if quota_file.name == "cpu.max":
        return fields[0], fields[1]
    return fields[0], (quota_file.parent / "cpu.cfs_period_us").read_text().split()[0]


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs this process's cgroup quota allows, None where there is none. A container started with
    --cpus 2 on a 64-core host sees 64 cores in its affinity mask, and 63 threads under a 2-CPU
    quota are throttled in bursts."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        # the own group, then the mount's root (inside a cgroup namespace the own group is the root)
        if controllers == "":  # v2
            candidates = [root / rel / "cpu.max", root / "cpu.max"]
        elif "cpu" in controllers.split(","):  # v1
            candidates = [root / "cpu" / rel / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_quota_us"]
        else:
            continue
        for quota_file in candidates:
            try:
                quota, period = _quota_and_period(quota_file)
            except (OSError, IndexError):
                continue
            if quota in ("max", "-1"):
                break
            return int(quota) / int(period)
    return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def default_threads() -> int:
    """AUTOPREC_THREADS, else every usable core but one (one core on a one-core machine).

    One core is left to the OS and the rest of the machine: an OpenMP op waits for its slowest
    thread, so with every core in use anything else that runs stalls whole ops. On a 2-core VM,
    MiniLM's all-bf16 and all-int8 ratios to fp32 repeated within 1.026 / 1.019 over five
    measurements at one thread and 1.087 / 1.082 at two.
    """
    if os.environ.get("AUTOPREC_THREADS", "").isdigit() and int(os.environ["AUTOPREC_THREADS"]) > 0:
        return int(os.environ["AUTOPREC_THREADS"])
    return max(1, usable_cores() - 1)


# --------------------------------------------------------------------------------------------
# the C allocator (see the module docstring)

KEPT = "glibc, freed memory kept (mallopt mmap/trim thresholds 1 GiB)"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30
_allocator: str | None = None


def process_default() -> str:
    libc, version = platform.libc_ver()
    return f"{libc or 'unknown C library'} {version}".strip() + ", default malloc settings"


def allocator_state() -> str:
    """How this process's C allocator treats freed memory now (recorded with each study)."""
    return _allocator or process_default()


def keep_freed_memory() -> str:
    """Have glibc keep freed memory for reuse from now on; returns the allocator's state."""
    global _allocator
    if _allocator is None and platform.libc_ver()[0] == "glibc":
        mallopt = ctypes.CDLL(None).mallopt
        if mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD):
            _allocator = KEPT
    return allocator_state()


def configure_cpu(threads: int | None, keep_freed: bool) -> None:
    """Set the process-wide CPU measurement settings once, before measuring: torch's intra-op thread
    count (None: `default_threads()`) and the allocator's treatment of freed memory."""
    torch.set_num_threads(threads or default_threads())
    prepare_allocator(keep_freed)


def prepare_allocator(keep: bool) -> bool:
    """Keep freed memory from now on where `keep`; True when this process's freed memory is kept."""
    if keep:
        keep_freed_memory()
    return allocator_state() == KEPT


# --------------------------------------------------------------------------------------------
# what a study records


def environment(device: torch.device) -> dict[str, str]:
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = cpu_name()
        env["cpu_allocator"] = allocator_state()
    return env
