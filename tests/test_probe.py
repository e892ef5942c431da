"""The format probe: per-machine kernel speed ratios, its cache, and the pruning it allows."""

from __future__ import annotations

import json

import pytest
import torch

from autoprec.measure import format_probe as P

CPU = torch.device("cpu")
CHOICES = {"fc1": ("fp32", "bf16", "int8"), "conv": ("fp32", "bf16"), "fc2": ("bf16",)}
KINDS = {"fc1": "linear", "conv": "conv", "fc2": "linear"}


def _probe(bf16_linear: float, bf16_conv: float, threads: str = "1") -> P.FormatProbe:
    machine = {"device_type": "cpu", "device_name": "Test CPU", "threads": threads, "cpu_capability": "AVX2"}
    return P.FormatProbe(machine, {"bf16": {"linear": bf16_linear, "conv": bf16_conv}, "int8": {"linear": 0.4}})


def test_a_slow_format_is_pruned_from_layers_and_defaults_and_announced():
    pruning = P.prune(CHOICES, KINDS, ("fp32", "bf16"), _probe(5.7, 48.0))
    assert pruning.choices == {"fc1": ("fp32", "int8"), "conv": ("fp32",), "fc2": ("bf16",)}  # never empty
    assert pruning.defaults == ("fp32",)
    assert pruning.pruned == {"bf16": {"linear": 5.7, "conv": 48.0}}
    line = pruning.announcement
    assert "\n" not in line and "bf16" in line and "5.7x" in line and "48.0x" in line and "--no-prune" in line
    assert "Test CPU" in line and "AVX2" in line and "1 thread" in line


def test_pruning_is_per_kernel_kind_and_nothing_fast_is_pruned():
    slow_convs = P.prune(CHOICES, KINDS, ("fp32", "bf16"), _probe(0.5, 3.0))
    assert slow_convs.choices["fc1"] == ("fp32", "bf16", "int8") and slow_convs.choices["conv"] == ("fp32",)
    assert slow_convs.defaults == ("fp32",)  # the rest of the model runs convolutions too
    no_convs = P.prune({"fc1": CHOICES["fc1"]}, {"fc1": "linear"}, ("fp32", "bf16"), _probe(0.5, 3.0))
    assert no_convs.defaults == ("fp32", "bf16") and no_convs.announcement is None  # judged on its own kernels
    fast = P.prune(CHOICES, KINDS, ("fp32", "bf16"), _probe(0.5, 0.6))
    assert fast.choices == CHOICES and fast.defaults == ("fp32", "bf16") and fast.announcement is None


def test_order_puts_fast_formats_first():
    assert _probe(5.7, 48.0).order(["fp32", "bf16", "int8", "fp16"]) == ["int8", "fp32", "bf16", "fp16"]


def test_the_probe_is_cached_per_machine(monkeypatch):
    here = P.machine(CPU)
    stored = P.FormatProbe(here, {"bf16": {"linear": 9.0}, "int8": {"linear": 0.3}})
    cache = json.loads(json.dumps({stored.key: stored.to_json()}))  # as a store keeps it
    monkeypatch.setattr(P, "run_probe", lambda formats, device, runtime="eager": pytest.fail("probed again"))
    probe, cached = P.cached_probe(cache, ["fp32", "bf16", "int8"], CPU)
    assert cached and probe.ratios == stored.ratios
    fresh = P.FormatProbe({**here, "threads": "99"}, {"bf16": {"linear": 1.0}})
    calls = []
    monkeypatch.setattr(P, "run_probe", lambda formats, device, runtime="eager": calls.append(formats) or fresh)
    other_machine = {P.machine_key({**here, "threads": "99"}): fresh.to_json()}
    probe, cached = P.cached_probe(other_machine, ["bf16"], CPU)
    assert not cached and calls == [["bf16"]]
    probe, cached = P.cached_probe(cache, ["fp16", "bf16"], CPU)  # a format the cached probe lacks
    assert not cached and calls[-1] == ["fp16", "bf16"]


def test_the_machine_names_what_restricts_the_kernels(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = P.machine(CPU)
    assert info["ONEDNN_MAX_CPU_ISA"] == "AVX2" and info["threads"] == str(torch.get_num_threads())
    assert P.machine_key(info) != P.machine_key({k: v for k, v in info.items() if k != "ONEDNN_MAX_CPU_ISA"})


def test_run_probe_times_each_supported_kernel(one_thread):
    probe = P.run_probe(["fp32", "bf16", "int8"], CPU,
                        P.TimingSettings(rounds=3, min_round_s=0.002, warmup_calls=1, max_rounds=3))
    assert set(probe.ratios) == {"bf16", "int8"}
    # int8 convolutions are static int8 on the CPU: the probe calibrates its convolution on its own input
    assert set(probe.ratios["bf16"]) == {"linear", "conv"} and set(probe.ratios["int8"]) == {"linear", "conv"}
    assert all(r > 0 for kinds in probe.ratios.values() for r in kinds.values())
    assert P.FormatProbe.from_json(json.loads(json.dumps(probe.to_json()))) == probe


def test_a_compiled_study_probes_compiled_kernels_under_its_own_key(one_thread, monkeypatch):
    prepared = []
    prepare = P.runtimes.prepare
    monkeypatch.setattr(P.runtimes, "prepare", lambda *a, **k: prepared.append(a[1]) or prepare(*a, **k))
    probe = P.run_probe(["bf16"], CPU, P.TimingSettings(rounds=3, min_round_s=0.002, warmup_calls=1, max_rounds=3),
                        runtime="compiled")
    assert prepared == ["compiled"] * 4  # fp32 and bf16, Linear and convolution
    assert set(probe.ratios["bf16"]) == {"linear", "conv"} and probe.machine["runtime"] == "compiled"
    assert P.machine_key(probe.machine) != P.machine_key(P.machine(CPU))  # an eager probe is not reused
    assert "runtime" not in P.machine(CPU)  # eager probes keep the keys stored before runtimes were named
