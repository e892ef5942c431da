"""`autoprec apply` sets the policy's stored latency beside this run's and says what differs."""

from __future__ import annotations

import pytest
import platform

from autoprec.measure.machine import KEPT
from autoprec.measure.remeasure import stored_latency

HERE = {"device": "cpu", "device_name": "AMD EPYC 7B13", "threads": "2", "cpu_allocator": KEPT}
STORED = {"latency_ratio": 0.93, "retimed_ratio": 0.925, "device": "cpu", "device_name": "AMD EPYC 7B13",
          "threads": "2", "cpu_allocator": KEPT}


def test_same_conditions_show_both_ratios_and_no_warning():
    out = stored_latency(STORED, 0.941, HERE)
    assert "0.925x fp32 (re-timed at the end of the search" in out and "measured here: 0.941x" in out
    assert "not like with like" not in out


def test_other_threads_allocator_and_cpu_are_named_with_the_fix():
    stored = {**STORED, "threads": "1", "cpu_allocator": "glibc 2.36, default malloc settings",
              "device_name": "Intel Xeon"}
    out = stored_latency(stored, 1.2, HERE)
    assert "1 thread there, 2 here (--threads 1 to compare like with like)" in out
    assert "run with --malloc-defaults to compare" in out
    assert "Intel Xeon there, AMD EPYC 7B13 here" in out


def test_another_device_type_is_named_and_cpu_settings_are_not_compared():
    stored = {**STORED, "device": "cuda:0", "device_name": "NVIDIA H200", "threads": "16"}
    out = stored_latency(stored, 1.0, HERE)
    assert "device cuda:0 there, cpu here" in out and "threads there" not in out


def test_old_policies_without_ratio_or_cpu_name_are_handled():
    assert stored_latency({"score": 0.9}, 1.0, HERE) == ""
    old = {"latency_ratio": 0.9, "device": "cpu", "device_name": platform.machine()}  # before cpu names
    out = stored_latency(old, 0.95, HERE)
    assert "0.900x fp32 (in the search" in out and "not like with like" not in out


@pytest.mark.slow
def test_apply_with_a_policy_of_another_model_is_one_line_naming_the_file_and_both_models(tmp_path):
    import json

    from helpers import TINY, autoprec_cli

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "autoprec.policy", "version": 1, "default": "fp32",
                                  "layers": {"features.0.0": "int8"},
                                  "model": {"class": "MobileNetV3", "fingerprint": "sha256:0"}}))
    proc = autoprec_cli("apply", str(policy), str(TINY), "--device", "cpu", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert str(policy) in proc.stderr and "another model (MobileNetV3" in proc.stderr and "(Sequential" in proc.stderr
    forced = autoprec_cli("apply", str(policy), str(TINY), "--device", "cpu", "--force", check=False)
    assert forced.returncode == 2 and len(forced.stderr.strip().splitlines()) == 1
    assert "'features.0.0' is not in the model" in forced.stderr and "exported for a MobileNetV3" in forced.stderr
