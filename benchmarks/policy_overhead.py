"""Does applying a policy cost anything over doing the same thing with plain torch?

On MiniLM (studies/minilm/model.py, example_inputs()), two pairs, each timed side by side with
`autoprec.measure.timing.paired_latency` (ABBA rounds; ratio = median of per-round autoprec/torch ratios):

- all-bf16: `autoprec.apply_policy(model, Policy(default="bf16", layers={every searchable layer: "bf16"}))`
  vs `model.to(torch.bfloat16)`;
- all-int8: `autoprec.apply_policy(model, Policy(default="fp32", layers={every Linear: "int8"}))`
  vs `torch.ao.quantization.quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)`;

plus, with --control (default), a torch-vs-torch pair (two copies of `model.to(torch.bfloat16)`)
that shows how far from 1.00 a ratio of two identical models lands on this machine.
Target: every autoprec/torch ratio <= 1.05. The 95% CI column (order statistics of the per-round
ratios) says how far the median itself could move on this machine; the CPU-time column is the
same rounds measured in process CPU seconds (time.process_time), which other processes do not
inflate. The score columns (cosine of pooled embeddings on
eval_inputs(), 256 sentences) show that each pair computes the same thing.

    .venv/bin/python benchmarks/policy_overhead.py [--rounds 41] [--min-round-s 0.2] [--no-control]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import _common as C

C.quiet()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autoprec import Policy, apply_policy
from autoprec.measure.timing import TimingSettings, paired_latency  # noqa: E402

TARGET = 1.05


def plain_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, qconfig_spec={nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41, help="ABBA rounds per pair")
    parser.add_argument("--min-round-s", type=float, default=0.2, help="seconds per side per round")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the torch-vs-torch control pair")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    threads = C.set_threads(args.threads)
    spec, fp32, example = C.load_minilm()
    searchable = C.searchable_names(fp32)
    linears = C.searchable_names(fp32, linear_only=True)
    bf16_policy = Policy(default="bf16", layers={n: "bf16" for n in searchable})
    int8_policy = Policy(default="fp32", layers={n: "int8" for n in linears})

    pairs = [
        ("all-bf16", f"apply_policy(Policy(default='bf16', {len(searchable)} layers bf16))",
         apply_policy(copy.deepcopy(fp32), bf16_policy), "model.to(torch.bfloat16)",
         copy.deepcopy(fp32).to(torch.bfloat16)),
        ("all-int8", f"apply_policy(Policy(default='fp32', {len(linears)} Linear int8))",
         apply_policy(copy.deepcopy(fp32), int8_policy), "quantize_dynamic(per_channel_dynamic_qconfig)",
         plain_int8(copy.deepcopy(fp32))),
    ]
    if args.control:
        pairs.append(("control", "model.to(torch.bfloat16), copy 1", copy.deepcopy(fp32).to(torch.bfloat16),
                      "model.to(torch.bfloat16), copy 2", copy.deepcopy(fp32).to(torch.bfloat16)))

    batch = "x".join(str(s) for s in example["input_ids"].shape)
    header = C.machine_header({"threads": threads, "batch": f"{batch} tokens (example_inputs())",
                               "timing": f"autoprec.measure.timing.paired_latency, {args.rounds} ABBA rounds, "
                                         f">= {args.min_round_s} s per side per round"})
    batches = spec.eval_batches()
    settings = TimingSettings(rounds=args.rounds, min_round_s=args.min_round_s)
    rows = []
    with torch.inference_mode():
        refs = torch.cat([fp32(**b).float() for b in batches])
        for label, a_name, a, b_name, b in pairs:
            out_a = torch.cat([a(**x).float() for x in batches])
            out_b = torch.cat([b(**x).float() for x in batches])
            same_cos, _ = C.row_cosine(out_a, out_b)
            max_diff = float((out_a - out_b).abs().max())
            score_a, _ = C.row_cosine(out_a, refs)
            score_b, _ = C.row_cosine(out_b, refs)
            with C.RoundRecorder() as rec:
                t = paired_latency(lambda: a(**example), lambda: b(**example), torch.device("cpu"), settings)
            ratios = [c / r for c, r in rec.pairs()]
            assert len(ratios) == t.rounds and abs(statistics.median(ratios) - t.ratio) < 1e-9
            lo, hi = C.median_ci(ratios)
            cpu_ratios = [c / r for c, r in rec.cpu_pairs()]
            cpu_ratio = statistics.median(cpu_ratios)
            cpu_lo, cpu_hi = C.median_ci(cpu_ratios)
            verdict = ("ok" if t.ratio <= TARGET else "MISSED") if label != "control" else "(noise floor)"
            rows.append([label, a_name, b_name, C.fmt_ms(t.candidate_ms), C.fmt_ms(t.reference_ms),
                         f"**{t.ratio:.3f}**", f"{lo:.3f} - {hi:.3f}", f"{t.ratio_spread:.2f}",
                         f"{cpu_ratio:.3f} ({cpu_lo:.3f} - {cpu_hi:.3f})", f"{t.rounds} x {t.calls_per_round}",
                         f"{score_a:.6f}", f"{score_b:.6f}", f"{same_cos:.9f}", f"{max_diff:.1e}", verdict])

    print("### Policy overhead: autoprec.apply_policy vs plain torch, MiniLM\n")
    print(header)
    print()
    print(C.table(["pair", "autoprec (A)", "plain torch (B)", "A ms", "B ms", "A/B ratio (median of rounds)",
                   "95% CI of the median", "round ratio max/min", "same rounds in process CPU time: ratio (95% CI)",
                   "rounds x calls", "score A (cos vs fp32)", "score B (cos vs fp32)", "cos(A, B)",
                   "max abs diff A-B", f"<= {TARGET}"], rows))


if __name__ == "__main__":
    main()
