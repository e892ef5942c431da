"""Machine facts: usable cores and default threads (affinity, cgroup quota), and the CPU allocator
keeping freed memory in the process while timing (no page faults per forward for big tensors)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from autoprec.measure import machine as T

needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

# Run in a fresh interpreter: mallopt is process-wide and cannot be undone.
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from autoprec.measure.machine import allocator_state, keep_freed_memory

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            x = torch.ones(10_000_000)  # 40 MB: above glibc's largest dynamic mmap threshold (32 MiB)
            del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults()
    state_before = allocator_state()
    if sys.argv[1] == "evaluator":
        from autoprec.measure.evaluator import Evaluator
        from autoprec.measure.machine import environment
        from autoprec.measure.timing import TimingSettings
        from autoprec.model.model_file import load_spec
        from autoprec.measure.machine import configure_cpu
        configure_cpu(1, sys.argv[3] == "keep")
        ev = Evaluator(load_spec(sys.argv[2]), "cpu", measure_peak=False,
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


@pytest.mark.slow
@needs_glibc
def test_keeping_freed_memory_removes_the_page_faults_of_big_tensors():
    default, after, before, state = _run("direct")
    assert default > 5 * 9000, "under glibc's defaults each 40 MB tensor is mapped and faulted in anew"
    assert after < 100
    assert "default malloc settings" in before and state.startswith("glibc, freed memory kept")


@pytest.mark.slow
@needs_glibc
def test_a_cpu_evaluator_keeps_freed_memory_unless_told_not_to():
    from helpers import TINY

    _, after, _, state = _run("evaluator", str(TINY), "keep")
    assert after < 100 and "freed memory kept" in state
    default, after, _, state = _run("evaluator", str(TINY), "defaults")
    assert after > 5 * 9000 and "default malloc settings" in state


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (16, 15)])
def test_default_threads_leave_one_core_to_the_rest_of_the_machine(monkeypatch, cores, expected):
    monkeypatch.delenv("AUTOPREC_THREADS", raising=False)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: None)
    assert T.default_threads() == expected


def test_a_cgroup_cpu_quota_caps_the_usable_cores(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: 1.5)  # docker run --cpus 1.5 on a 64-core host
    assert T.usable_cores() == 2
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: 0.2)
    assert T.usable_cores() == 1


def _membership(tmp_path, text: str):
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_cpu_max(tmp_path):
    root = tmp_path / "fs"
    (root / "job").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("200000 100000\n")
    assert T.cgroup_cpu_limit(root, _membership(tmp_path, "0::/job\n")) == 2.0
    (root / "job" / "cpu.max").write_text("max 100000\n")
    assert T.cgroup_cpu_limit(root, _membership(tmp_path, "0::/job\n")) is None
    (root / "cpu.max").write_text("150000 100000\n")  # inside a cgroup namespace: the mount's root
    assert T.cgroup_cpu_limit(root, _membership(tmp_path, "0::/elsewhere\n")) == 1.5


def test_cgroup_v1_cfs_quota(tmp_path):
    group = tmp_path / "fs" / "cpu" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text("300000\n")
    (group / "cpu.cfs_period_us").write_text("100000\n")
    membership = _membership(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n")
    assert T.cgroup_cpu_limit(tmp_path / "fs", membership) == 3.0
    (group / "cpu.cfs_quota_us").write_text("-1\n")
    assert T.cgroup_cpu_limit(tmp_path / "fs", membership) is None
    assert T.cgroup_cpu_limit(tmp_path / "fs", tmp_path / "missing") is None


def test_autoprec_threads_overrides_the_default(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(T, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("AUTOPREC_THREADS", "3")
    assert T.default_threads() == 3
    monkeypatch.setenv("AUTOPREC_THREADS", "0")  # not a count: ignored
    assert T.default_threads() == 15
