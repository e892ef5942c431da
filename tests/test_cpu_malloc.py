"""Timing on the CPU keeps freed memory in the process: no page faults per forward for big tensors."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

# Run in a fresh interpreter: mallopt is process-wide and cannot be undone.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from autoprec.cpu_malloc import allocator_state, keep_freed_memory

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            x = torch.ones(10_000_000)  # 40 MB: above glibc's largest dynamic mmap threshold (32 MiB)
            del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults()
    state_before = allocator_state()
    if sys.argv[1] == "evaluator":
        from autoprec.evaluate import Evaluator, environment
        from autoprec.timing import TimingSettings
        from autoprec.userspec import load_spec
        ev = Evaluator(load_spec(sys.argv[2]), "cpu", threads=1, measure_peak=False,
                       timing=TimingSettings(rounds=3, max_rounds=3, keep_freed_memory=sys.argv[3] == "keep"))
        state = environment(ev.device)["cpu_allocator"]
    else:
        state = keep_freed_memory()
    # The heap grows until freed blocks coalesce: torch allocates with posix_memalign, which asks
    # for a little more than a freed block of the same size holds, so the first few 40 MB tensors
    # after the change extend the heap (seen: up to 7 of them). Then they are reused for good.
    for _ in range(3):
        faults()
    print(default, faults(), state_before, "|", state, sep="\\n")
""")


def _run(*args: str) -> tuple[int, int, str, str]:
    out = subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True, text=True, check=True).stdout
    default, after, before, _, state = out.strip().splitlines()
    return int(default), int(after), before, state


@needs_glibc
def test_keeping_freed_memory_removes_the_page_faults_of_big_tensors():
    default, after, before, state = _run("direct")
    assert default > 5 * 9000, "under glibc's defaults each 40 MB tensor is mapped and faulted in anew"
    assert after < 100
    assert "default malloc settings" in before and state.startswith("glibc, freed memory kept")


@needs_glibc
def test_a_cpu_evaluator_keeps_freed_memory_unless_told_not_to():
    from test_search_cli import TINY

    _, after, _, state = _run("evaluator", str(TINY), "keep")
    assert after < 100 and "freed memory kept" in state
    default, after, _, state = _run("evaluator", str(TINY), "defaults")
    assert after > 5 * 9000 and "default malloc settings" in state
