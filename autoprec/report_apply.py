"""`autoprec apply`: measure a policy file beside the fp32 model on this machine."""

from __future__ import annotations

from pathlib import Path

import torch

from autoprec.cpu_malloc import allocator_state
from autoprec.evaluate import Evaluator, resolve_device
from autoprec.policy import Policy, load_policy
from autoprec.tables import format_bytes, format_table
from autoprec.timing import TimingSettings
from autoprec.userspec import load_spec


def apply_and_compare(policy_path: str | Path, model_path: str | Path, device: str | None = None,
                      threads: int | None = None, timing: TimingSettings = TimingSettings()) -> str:
    policy = load_policy(policy_path)
    spec = load_spec(model_path)
    evaluator = Evaluator(spec, resolve_device(device), threads=threads, timing=timing)
    evaluator.candidate(policy)  # refuses a policy that does not fit this model before measuring
    fp32 = evaluator.measure(Policy())
    cand = evaluator.measure(policy)
    if not cand.feasible:
        return f"{policy_path}: the policy cannot run here: {cand.reason}"
    rows = [
        ("score", f"{fp32.score:.6f}", f"{cand.score:.6f}", f"{cand.score - fp32.score:+.6f}"),
        ("latency_ms", f"{fp32.latency_ms:.2f}", f"{cand.latency_ms:.2f}", f"{cand.latency_ratio / fp32.latency_ratio:.3f}x"),
        ("memory", format_bytes(fp32.memory_bytes), format_bytes(cand.memory_bytes),
         f"{cand.memory_bytes / fp32.memory_bytes:.3f}x"),
        ("peak", format_bytes(fp32.peak_bytes), format_bytes(cand.peak_bytes),
         f"{cand.peak_bytes / fp32.peak_bytes:.3f}x" if fp32.peak_bytes and cand.peak_bytes else "-"),
    ]
    counts = ", ".join(f"{n} {d}" for d, n in policy.counts().items() if n)
    where = f"device {evaluator.device}"
    if evaluator.device.type == "cpu":
        where += f" ({torch.get_num_threads()} threads; {allocator_state()})"
    head = f"policy {policy_path}: default {policy.default}, {counts or 'no listed layers'}; {where}"
    stored = policy.measured or {}
    tail = ""
    if "score" in stored:
        tail = f"\nscore stored in the policy: {stored['score']:.6f} (measured here: {cand.score:.6f})"
    return head + "\n" + format_table(["", "fp32", "policy", "change"], rows) + tail
