"""`autoprec apply`: measure a policy file beside the fp32 model on this machine."""

from __future__ import annotations

import platform
from pathlib import Path

from torch import nn

from autoprec.errors import AutoprecError, PolicyError
from autoprec.measure.evaluator import Evaluator
from autoprec.measure.machine import KEPT, configure_cpu, environment, resolve_device
from autoprec.policy import Policy, load_policy, model_fingerprint
from autoprec.display import format_bytes, format_table, printable, threads_text
from autoprec.measure.timing import TimingSettings
from autoprec.model.model_file import load_spec


def check_model(policy: Policy, policy_path: str | Path, model: nn.Module, model_path: str | Path,
                force: bool) -> str:
    """Refuse (or with `force`, note) a policy exported for a model of another structure."""
    expected = (policy.model or {}).get("fingerprint")
    if not expected or expected == model_fingerprint(model):
        return ""
    made_for = printable((policy.model or {}).get("class") or "model")
    what = (f"{policy_path} was exported for another model ({made_for}, fingerprint {expected[:19]}...) than "
            f"{Path(model_path).name} builds ({type(model).__name__}, {model_fingerprint(model)[:19]}...)")
    if not force:
        raise PolicyError(f"{what}; apply it to the model it was searched for, or pass --force to measure it anyway")
    return f"\nwarning: {what}; measured anyway (--force)"


def apply_and_compare(policy_path: str | Path, model_path: str | Path, device: str | None = None,
                      threads: int | None = None, timing: TimingSettings = TimingSettings(),
                      force: bool = False) -> str:
    policy = load_policy(policy_path)
    spec = load_spec(model_path)
    warning = check_model(policy, policy_path, spec.new_model(), model_path, force)
    device = resolve_device(device)
    if device.type == "cpu":
        configure_cpu(threads, timing.keep_freed_memory)
    evaluator = Evaluator(spec, device, timing=timing, runtime=policy.runtime)
    try:
        evaluator.candidate(policy)  # refuses a policy that does not fit this model before measuring
    except AutoprecError as exc:
        made_for = printable((policy.model or {}).get("class") or "")
        mismatch = (f" (the policy was exported for a {made_for}, {Path(model_path).name} builds a "
                    f"{type(evaluator.model).__name__})" if made_for and made_for != type(evaluator.model).__name__
                    else "")
        raise AutoprecError(f"{policy_path}: {exc}{mismatch}") from None
    fp32 = evaluator.measure(Policy())
    cand = evaluator.measure(policy)
    if not cand.feasible:
        return f"{policy_path}: the policy cannot run here: {cand.reason}" + warning
    rows = [
        ("score", f"{fp32.score:.6f}", f"{cand.score:.6f}", f"{cand.score - fp32.score:+.6f}"),
        ("latency_ms", f"{fp32.latency_ms:.2f}", f"{cand.latency_ms:.2f}", f"{cand.latency_ratio / fp32.latency_ratio:.3f}x"),
        ("memory", format_bytes(fp32.memory_bytes), format_bytes(cand.memory_bytes),
         f"{cand.memory_bytes / fp32.memory_bytes:.3f}x"),
        ("peak", format_bytes(fp32.peak_bytes), format_bytes(cand.peak_bytes),
         f"{cand.peak_bytes / fp32.peak_bytes:.3f}x" if fp32.peak_bytes and cand.peak_bytes else "-"),
    ]
    counts = ", ".join(f"{n} {d}" for d, n in policy.counts().items() if n)
    here = environment(evaluator.device)
    where = f"device {evaluator.device}"
    if evaluator.device.type == "cpu":
        where += f" ({threads_text(here['threads'])}; {here['cpu_allocator']})"
    where += (f"; {policy.runtime} runtime, as the study timed it"
              + (" (torch.compile; serve it with torch.compile(autoprec.apply_policy(model, policy)))"
                 if policy.runtime == "compiled" else ""))
    head = f"policy {policy_path}: default {policy.default}, {counts or 'no listed layers'}; {where}"
    stored = policy.measured or {}
    tail = ""
    if "score" in stored:
        tail = f"\nscore stored in the policy: {stored['score']:.6f} (measured here: {cand.score:.6f})"
        if policy.training is not None:
            steps = f"{policy.training.steps} steps, " if policy.training.steps is not None else ""
            tail += (f"; the stored score is after the study's fine-tuning ({steps}the policy's 'training' "
                     "section), here the formats alone, not fine-tuned: fine-tune as the README's training mode "
                     "shows before comparing scores")
    tail += stored_latency(stored, cand.latency_ratio / fp32.latency_ratio, here)
    return head + "\n" + format_table(["", "fp32", "policy", "change"], rows) + tail + warning


def stored_latency(stored: dict, here_ratio: float, here: dict[str, str]) -> str:
    """The policy's latency ratio from its study beside this run's, and what differs between the two."""
    ratio = stored.get("retimed_ratio") or stored.get("latency_ratio")
    if not isinstance(ratio, (int, float)):
        return ""
    how = "re-timed at the end of the search" if stored.get("retimed_ratio") else "in the search"
    stored = {k: printable(v) if isinstance(v, str) else v for k, v in stored.items()}  # a file from anyone
    noisy = stored.get("retime_too_noisy")
    if not stored.get("retimed_ratio") and isinstance(noisy, list) and len(noisy) == 2 \
            and all(isinstance(x, (int, float)) for x in noisy):
        how += f"; its final re-time, {noisy[0]:.2f}-{noisy[1]:.2f}x, was noisier and is not used"
    line = (f"\nlatency stored in the policy: {ratio:.3f}x fp32 ({how}, {stored.get('device')} "
            f"{stored.get('device_name')}, {threads_text(stored.get('threads'))}); measured here: {here_ratio:.3f}x")
    differs = []
    there_type, here_type = str(stored.get("device", "")).split(":")[0], here["device"].split(":")[0]
    if there_type and there_type != here_type:
        differs.append(f"device {stored['device']} there, {here['device']} here")
    # studies before 2026-11-26 stored the bare architecture as a CPU's name: nothing to compare
    elif stored.get("device_name") not in (None, platform.machine(), here["device_name"]):
        differs.append(f"{stored['device_name']} there, {here['device_name']} here")
    if there_type == here_type == "cpu":
        if stored.get("threads") and str(stored["threads"]) != here["threads"]:
            differs.append(f"{threads_text(stored['threads'])} there, {here['threads']} here "
                           f"(--threads {stored['threads']} to compare like with like)")
        kept_there, kept_here = stored.get("cpu_allocator") == KEPT, here["cpu_allocator"] == KEPT
        if stored.get("cpu_allocator") and kept_there != kept_here:
            flag = "without --malloc-defaults" if kept_there else "with --malloc-defaults"
            differs.append(f"the search kept freed memory {'on' if kept_there else 'off'}, "
                           f"this run {'on' if kept_here else 'off'} (run {flag} to compare)")
    if differs:
        line += "\nnot like with like: " + "; ".join(differs)
    return line
