"""autoprec under --runtime openvino against NNCF + OpenVINO's own answer, side by side on the CPU.

For each study: NNCF's `quantize_with_accuracy_control` (max drop 0.01 absolute, on autoprec's default
score: mean per-sample cosine of the compared output to the eager fp32 model over the eval batches)
and autoprec's fastest feasible policy from a short `autoprec search --runtime openvino --max-drop
0.01` run here, timed in interleaved rounds with PyTorch eager fp32 in this process, one thread for
every tool, and the two answers against each other in adjacent pairs. Prints a table naming the CPU
and the versions.

    python benchmarks/peers.py [--studies resnet minilm] [--trials 8] [--rounds 21] [--strategy guided]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import REPO, interleaved, machine_header, quiet, set_threads, table  # noqa: E402

import torch  # noqa: E402

from autoprec.measure import openvino_runtime as ovr  # noqa: E402
from autoprec.measure.runtime import rebatch_like  # noqa: E402
from autoprec.model.model_file import call_model, load_spec  # noqa: E402
from autoprec.policy import load_policy  # noqa: E402


def cosine_score(spec, run, batches, refs) -> float:
    scores = []
    for batch, ref in zip(batches, refs):
        out = spec.compared_tensor(run(batch)).float().flatten(1)
        scores.append(torch.nn.functional.cosine_similarity(out, ref.flatten(1), dim=1).mean().item())
    return sum(scores) / len(scores)


def nncf_answer(spec, model, example, batches, refs, calibration):
    import nncf
    import openvino as ov

    start = time.perf_counter()
    fp32 = ovr.convert(model, example)
    convert_s = time.perf_counter() - start
    names = [i.get_any_name() for i in fp32.inputs]

    def feed(batch):
        arrays = ovr._arrays(batch)
        return {k: v for k, v in arrays.items() if k in names} if isinstance(arrays, dict) else arrays


    def validate(compiled, items) -> float:
        def run(batch):
            res = compiled(feed(batch))
            return torch.from_numpy(res[compiled.outputs[0]].copy())
        return cosine_score(spec, run, batches, refs)

    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if "minilm" in str(spec.path) else {}
    start = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        fp32, nncf.Dataset([feed(b) for b in calibration]), nncf.Dataset(batches), validation_fn=validate,
        max_drop=0.01, drop_type=nncf.DropType.ABSOLUTE, **kwargs)
    answer_s = time.perf_counter() - start
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    note = ""
    try:
        compiled = core.compile_model(quantized, "CPU", config)
    except RuntimeError:  # the plugin's default bf16 has no kernel where ONEDNN_MAX_CPU_ISA caps it
        compiled = core.compile_model(quantized, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
        note = " (its default bf16 does not compile here: at f32)"
    return compiled, feed, answer_s, convert_s, note


def autoprec_answer(study: Path, trials: int, workdir: Path, strategy: str):
    url = f"sqlite:///{workdir}/{study.parent.name}.db"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoprec", "search", str(study), "--runtime", "openvino", "--max-drop",
                    "0.01", "--trials", str(trials), "--strategy", strategy, "--threads", "1",
                    "--storage", url], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answer_s = time.perf_counter() - start
    out = workdir / f"{study.parent.name}.json"
    subprocess.run([sys.executable, "-m", "autoprec", "export", "--study", study.parent.name, "--pick", "fastest",
                    "-o", str(out), "--storage", url], check=True, stdout=subprocess.DEVNULL)
    return load_policy(out), answer_s


def one_study(name: str, trials: int, rounds: int, workdir: Path, strategy: str) -> list[list[object]]:
    path = REPO / "studies" / name / "model.py"
    spec = load_spec(path)
    model = spec.new_model()
    example = spec.example()
    batches = rebatch_like(spec.eval_batches(), example)
    calibration = rebatch_like(spec.calibration_batches(), example)
    with torch.inference_mode():
        refs = [spec.compared_tensor(call_model(model, b)).float() for b in batches]
    compiled, feed, nncf_s, convert_s, note = nncf_answer(spec, model, example, batches, refs, calibration)
    nncf_request = compiled.create_infer_request()

    def nncf_run(batch):
        res = nncf_request.infer(feed(batch))
        return torch.from_numpy(res[compiled.outputs[0]].copy())

    policy, autoprec_s = autoprec_answer(path, trials, workdir, strategy)
    runtime = ovr.OpenVINORuntime(model, example, calibration, threads=1)
    ours = runtime.candidate(policy)
    with torch.inference_mode():
        nncf_drop = 1.0 - cosine_score(spec, nncf_run, batches, refs)
        ours_drop = 1.0 - cosine_score(spec, lambda b: call_model(ours, b), batches, refs)
        example_feed = feed(example)
        # both answers called alike, as a deployment calls its OpenVINO model: an infer request on
        # inputs converted once (not autoprec's torch wrapper, which converts them on every call)
        ours_request = ours.compiled.create_infer_request()
        ours_feed = {k: v for k, v in example_feed.items() if k in ours.names} \
            if isinstance(example_feed, dict) else example_feed
        forwards = {"torch": lambda: call_model(model, example),
                    "nncf": lambda: nncf_request.infer(example_feed),
                    "autoprec": lambda: ours_request.infer(ours_feed)}
        timed = interleaved(forwards, "torch", rounds, min_round_s=0.05)
        # the two answers against each other in adjacent pairs: what a user choosing between them sees,
        # without the slower torch model's noise in between
        head_to_head = interleaved({"nncf": forwards["nncf"], "autoprec": forwards["autoprec"]}, "nncf", rounds,
                                   min_round_s=0.05)["autoprec"]["ratio"]
    counts = {f: n for f, n in policy.counts().items() if n}
    return [
        [name, "PyTorch eager fp32", "-", "0", f"{timed['torch']['ms']:.1f}", "1.00x", "-"],
        [name, "NNCF `quantize_with_accuracy_control` + OpenVINO" + note, f"{nncf_s:.0f} s + {convert_s:.0f} s convert",
         f"{nncf_drop:.1e}", f"{timed['nncf']['ms']:.1f}", f"{timed['nncf']['ratio']:.2f}x", "1.00x"],
        [name, f"autoprec --runtime openvino, {trials} trials {strategy} (default {policy.default}, {json.dumps(counts)})",
         f"{autoprec_s:.0f} s", f"{ours_drop:.1e}", f"{timed['autoprec']['ms']:.1f}", f"{timed['autoprec']['ratio']:.2f}x",
         f"{head_to_head:.3f}x"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", default=["resnet", "minilm"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--strategy", default="guided", help="autoprec's --strategy (random: no layer profile)")
    args = parser.parse_args()
    quiet()
    set_threads(1)
    import logging

    import nncf
    import openvino

    nncf.set_log_level(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.studies:
            rows += one_study(name, args.trials, args.rounds, Path(tmp), args.strategy)
    print(machine_header({"openvino": openvino.__version__, "nncf": nncf.__version__}))
    print()
    print(table(["study", "tool", "time to answer", "drop", "answer, ms", "answer / torch eager fp32",
                "answer / NNCF's answer"], rows))


if __name__ == "__main__":
    main()
