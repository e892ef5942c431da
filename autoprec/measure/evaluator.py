"""Score, latency and memory of one candidate policy (no Optuna here).

`Evaluator` holds the fp32 reference of one model spec on one device: its model, its outputs on the
eval batches, its score and its latency, all computed once. `measure(policy)` applies the policy to
a copy of the reference model and returns a `Measurement`; a candidate that cannot run (unsupported
format, non-finite output, out of memory, any exception) is an infeasible Measurement with its
reason, never an exception.

In the `compiled` runtime (autoprec.measure.runtime) the fp32 reference is compiled once; each candidate is
applied with that runtime's kernels, compiled, then scored and timed compiled, and its Measurement
carries `compile_s` and `graph_breaks`. A candidate that does not compile is a failed Measurement.
"""

from __future__ import annotations

import copy
import gc
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from autoprec.errors import AutoprecError, SpecError, UnsupportedFormat
from autoprec.measure.fidelity import sample_cosines
from autoprec.measure.finetune import TrainingDiverged, fine_tune, load_train_batches, paired_step_ratio
from autoprec.policy import Policy, TrainingSettings
from autoprec.precision import apply_formats, module_storage_bytes
from autoprec.measure import openvino_runtime
from autoprec.measure import runtime as runtimes
from autoprec.measure.runtime import CompileFailed, Prepared
from autoprec.measure.calibration import spec_calibration
from autoprec.measure.timing import (
    PairedTiming,
    TimingSettings,
    cpu_activation_peak_bytes,
    cuda_forward_peak_bytes,
    paired_latency,
    solo_latency_ms,
)
from autoprec.model.model_file import USER_CODE_ERRORS, ModelSpec, call_model, first_float_tensor, move_inputs

METHODS = {
    "score_fidelity": "mean per-sample cosine similarity of the compared output to the fp32 model",
    "score_user": "model.py evaluate(model, device)",
    "latency": ("median over interleaved rounds (ABBA) of candidate/fp32 time (9 rounds or more, until its "
                "~90% confidence interval spans at most 3%, or from 5 rounds on as soon as it holds none of the "
                "ratios the search compares it with), times the study's fp32 latency"),
    "memory": "bytes of all parameters and buffers as applied (int8 packed weights, scales and zero points)",
    "peak_cpu": "memory_bytes + peak live tensor bytes of one forward from the profiler's allocator events",
    "peak_cuda": "torch.cuda.max_memory_allocated over one forward",
    "runtime_eager": "eager forwards",
    "runtime_openvino": ("OpenVINO CPU plugin: the fp32 model converted once, int8 layers quantized by NNCF on the "
                         "calibration batches, float layers at one precision per model (bf16 where the default is "
                         "bf16 and no layer is fp32, else f32); fp32 reference compiled at f32"),
    "runtime_compiled_cpu": ("torch.compile (inductor) with freezing, the whole model as one graph; fp32 reference "
                             "compiled the same way"),
    "runtime_compiled_cuda": (f"torch.compile (inductor), mode {runtimes.CUDA_MODE!r} (CUDA graphs), the model's "
                              "repeated blocks compiled one by one (regional compilation), else the whole model"),
}


@dataclass
class Measurement:
    feasible: bool
    reason: str | None = None
    score: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None  # candidate / fp32, measured interleaved
    latency_spread: float | None = None  # max / min of the per-round ratios
    latency_runs: int = 0
    latency_rounds: int = 0  # ABBA rounds it took for the median to settle (see TimingSettings)
    latency_ci: float | None = None  # upper / lower end of the median ratio's confidence interval
    latency_ratio_lo: float | None = None  # the ends of that interval
    latency_ratio_hi: float | None = None
    latency_stopped: str | None = None  # settled, target, max_rounds (see paired_latency), or reference (not timed)
    latency_seconds: float | None = None  # wall time the timing took: what re-timing it would cost
    candidate_ms: float | None = None  # raw median of this run, uncalibrated
    memory_bytes: int | None = None
    peak_bytes: int | None = None
    methods: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] | None = None  # FineTuneResult of a training-mode trial
    runtime: str = "eager"
    compile_s: float | None = None  # compiled runtime: first calls' time minus warm ones' (example and eval shapes)
    graph_breaks: int | None = None  # compiled runtime: graph breaks in one forward (timed, not refused)
    traceback: str | None = None  # of an unexpected exception that failed the candidate


    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed(cls, reason: str, traceback: str | None = None) -> "Measurement":
        return cls(feasible=False, reason=reason, traceback=traceback)


def _storage_bytes(model: nn.Module) -> int:
    """Weight bytes as the candidate holds them (an OpenVINO model's constants, or the module's tensors)."""
    if isinstance(model, openvino_runtime.OpenVINOModel):
        return model.storage_bytes()
    return module_storage_bytes(model)


def _calibrate(spec: ModelSpec, model: nn.Module, example: Any, device: torch.device, runtime: str
               ) -> tuple[Any, openvino_runtime.OpenVINORuntime | None]:
    """Static int8 input ranges of the fp32 model; in the openvino runtime none (NNCF calibrates each
    candidate itself, on the same batches) and the converted model instead."""
    if runtime == "openvino":
        return None, _openvino_runtime(spec, model, example, device)
    return spec_calibration(spec, model, device), None


def _openvino_runtime(spec: ModelSpec, model: nn.Module, example: Any,
                      device: torch.device) -> openvino_runtime.OpenVINORuntime:
    """The fp32 model converted to OpenVINO once, with the calibration batches NNCF quantizes on."""
    openvino_runtime.require_openvino()
    if device.type != "cpu":
        raise AutoprecError(f"--runtime openvino runs on the CPU; drop --device {device.type}")
    batches = runtimes.rebatch_like([move_inputs(b, device) for b in spec.calibration_batches()], example)
    try:
        return openvino_runtime.OpenVINORuntime(model, example, batches)
    except AutoprecError:
        raise
    except Exception as exc:
        raise spec.error("build_model", f"OpenVINO could not convert the fp32 model: {type(exc).__name__}: "
                         f"{_failure_reason(exc)}", "time it with --runtime eager or compiled") from exc


def _peak_bytes(model: nn.Module, forward: Any, device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_forward_peak_bytes(forward, device)
    return _storage_bytes(model) + cpu_activation_peak_bytes(forward)


def _forward_or_raise(spec: ModelSpec, model: nn.Module, example: Any) -> Any:
    try:
        return call_model(model, example)
    except Exception as exc:
        raise spec.error("example_inputs", f"the fp32 model fails on them: {type(exc).__name__}: {exc}",
                         "make example_inputs() match what build_model()'s forward takes") from exc


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, (UnsupportedFormat, AutoprecError)):
        return str(exc)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (RuntimeError, NotImplementedError)) and "not implemented for" in message:
        return f"format not supported on this device: {message}"
    return f"{type(exc).__name__}: {message}"


def is_reference(policy: Policy) -> bool:
    """True for the all-fp32 policy: it computes exactly what the fp32 reference model does."""
    return policy.default == "fp32" and all(fmt == "fp32" for fmt in policy.layers.values())


class NonFinite(Exception):
    pass


def release_candidates(runtime: str, device: torch.device) -> None:
    """Free what earlier candidates left on the device before the next one is built: compiled graphs
    (with freezing they hold folded copies of a candidate's weights, and they pile up to the
    recompile limit) and the CUDA allocator's cached blocks. The reference's graph compiles again
    from inductor's caches when it is next called."""
    if runtime == "compiled":
        runtimes.reset()
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _shared_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo under which the copy of `model` shares its parameters and buffers."""
    return {id(t): t for t in [*model.parameters(), *model.buffers()]}


def measurement_of(score: float, timing: PairedTiming, memory: int, peak: int | None, reference_latency_ms: float,
                   runtime: str, device: torch.device, user_score: bool) -> Measurement:
    """A feasible candidate's Measurement, with the methods each number was measured by."""
    methods = {"score": METHODS["score_user" if user_score else "score_fidelity"],
               "latency": METHODS["latency"], "memory_bytes": METHODS["memory"],
               "peak_bytes": METHODS["peak_cuda" if device.type == "cuda" else "peak_cpu"],
               "runtime": METHODS["runtime_eager" if runtime == "eager" else "runtime_openvino" if runtime == "openvino" else
                                  "runtime_compiled_" + ("cuda" if device.type == "cuda" else "cpu")]}
    return Measurement(feasible=True, runtime=runtime, score=score, latency_ms=timing.ratio * reference_latency_ms,
                       latency_ratio=timing.ratio, latency_spread=timing.ratio_spread,
                       latency_runs=timing.rounds * timing.calls_per_round, latency_rounds=timing.rounds,
                       latency_ci=timing.ratio_ci, latency_ratio_lo=timing.ratio_lo,
                       latency_ratio_hi=timing.ratio_hi, latency_stopped=timing.stopped,
                       latency_seconds=timing.seconds, candidate_ms=timing.candidate_ms,
                       memory_bytes=memory, peak_bytes=peak, methods=methods)


def fidelity_score(spec: ModelSpec, model: nn.Module, batches: list[Any], ref_outputs: list[torch.Tensor]) -> tuple[float, float]:
    """The default score: mean per-sample cosine of `model`'s compared output to the fp32 outputs, and
    the seconds its first call of each new batch shape spent compiling (compiled runtime)."""
    sims = []
    seconds: dict[tuple, list[float]] = {}  # per output shape: each batch's time
    with torch.inference_mode():
        for batch, ref in zip(batches, ref_outputs):
            start = time.perf_counter()
            out = spec.compared_tensor(call_model(model, batch)).float()
            seconds.setdefault(tuple(out.shape), []).append(time.perf_counter() - start)
            if not torch.isfinite(out).all():
                raise NonFinite("non-finite output")
            if out.shape != ref.shape:
                raise SpecError(f"{spec.path}: output: the compared tensor changed shape "
                                f"{tuple(ref.shape)} -> {tuple(out.shape)} under a policy")
            sims.append(sample_cosines(out, ref).cpu())
    # compiled: a batch shape other than the example's compiles on its first batch; the excess
    # of that batch over the shape's fastest other batch is counted as compile time
    compile_s = sum(max(0.0, t[0] - min(t[1:])) for t in seconds.values() if len(t) > 1)
    return float(torch.cat(sims).mean()), compile_s


def constant_output_warning(spec: ModelSpec, outputs: list[torch.Tensor] | None) -> str | None:
    """One line where the fp32 model's compared output is the same number everywhere (all zeros: an
    untrained, zero-initialised head), which no format can change: output fidelity then ranks no layer
    (every profile drop is 0) and the default score cannot tell a policy from fp32."""
    if not outputs or any(out.numel() == 0 or out.float().std(unbiased=False) > 0 for out in outputs):
        return None
    value = float(outputs[0].flatten()[0])
    return (f"autoprec: warning: {spec.path}: the fp32 model's compared output is {value:g} everywhere on "
            "its batches: no format can change it, so output fidelity ranks no layer; check build_model() "
            "(a zero-initialised head?) or output()")


def reference_timing(reference_ms: float) -> PairedTiming:
    """The all-fp32 policy is the reference model: ratio 1 by construction, nothing to time."""
    return PairedTiming(1.0, 1.0, reference_ms, reference_ms, 0, 0, 1.0, 1.0, 1.0, "reference", 0.0)


class Evaluator:
    """The fp32 reference of `spec` on `device`, and the measurement of candidates against it.

    It changes no process-wide setting: the caller sets the CPU threads and the allocator first
    (`autoprec.measure.machine.configure_cpu`)."""

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu", *,
                 timing: TimingSettings = TimingSettings(), reference_latency_ms: float | None = None,
                 measure_peak: bool = True, runtime: str = "eager", regional: bool | None = None,
                 time_reference: bool = False) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.timing = timing
        self.measure_peak = measure_peak
        self.runtime = runtimes.check_runtime(runtime)
        self.regional = regional
        self.time_reference = time_reference  # time the all-fp32 policy against itself (timing-noise benchmarks)
        # self.model stays eager fp32: candidates are copied from it and its outputs are the fidelity reference
        self.model = spec.new_model().to(self.device)
        self.example = move_inputs(spec.example(), self.device)
        self._batches = [move_inputs(b, self.device) for b in spec.eval_batches()] if spec.evaluate is None else []
        if self.runtime != "eager":  # scored with the graph that is timed, not one more per eval batch shape
            self._batches = runtimes.rebatch_like(self._batches, self.example)
        with torch.inference_mode():
            _forward_or_raise(spec, self.model, self.example)
        try:
            self._measure_reference(reference_latency_ms)
        except SpecError:
            raise
        except USER_CODE_ERRORS as exc:  # the first forward worked; a later one of the fp32 model did not
            raise spec.error("build_model", f"the fp32 model failed while its reference was measured: "
                             f"{type(exc).__name__}: {exc}", "make its forward work on every call, on example_inputs() "
                             "and eval_inputs() alike") from exc

    def reference_warning(self) -> str | None:
        """One line where the fp32 model's compared output is one number everywhere (constant_output_warning)."""
        return constant_output_warning(self.spec, getattr(self, "_ref_outputs", None))

    def _measure_reference(self, reference_latency_ms: float | None) -> None:
        spec = self.spec
        with torch.inference_mode():
            self._ref_outputs = [self._compared(self.model, b).clone() for b in self._batches]
        for out in self._ref_outputs:
            if not torch.isfinite(out).all():
                raise spec.error("build_model", "the fp32 model gives non-finite outputs on eval_inputs()",
                                 "check the model and its inputs")
        # static int8 input ranges, observed once on the fp32 model and shared by every candidate
        self.calibration, self._openvino = _calibrate(spec, self.model, self.example, self.device, self.runtime)
        self.reference = self._prepare_reference()
        self.reference_score = self._score(self.reference.model)
        if not math.isfinite(self.reference_score):
            raise spec.error("evaluate", f"returned {self.reference_score} for the fp32 model")
        if reference_latency_ms is None:
            reference_latency_ms = self.reference_solo_ms(rounds=2 * self.timing.rounds)
        self.reference_latency_ms = reference_latency_ms

    def _prepare(self, model: nn.Module) -> Prepared:
        example = self.example
        return runtimes.prepare(model, self.runtime, self.device, lambda fn: call_model(fn, example),
                                regional=self.regional)

    def _prepare_reference(self) -> Prepared:
        if self.runtime == "eager":
            return Prepared(self.model, "eager")
        if self.runtime == "openvino":
            return Prepared(self._openvino.reference(), "openvino")
        try:  # compiled from a copy of the module tree that shares the fp32 weights: one fp32 copy on the device
            return self._prepare(copy.deepcopy(self.model, memo=_shared_tensors(self.model)))
        except CompileFailed as exc:
            raise self.spec.error("build_model", f"the fp32 model does not compile: {exc}",
                                  "time it with --runtime eager") from exc

    def reference_solo_ms(self, rounds: int = 5) -> float:
        """The fp32 reference timed alone, now: what the machine's state makes of it at this moment."""
        with torch.inference_mode():
            ms, _ = solo_latency_ms(self._timed(self.reference), self.device, rounds=rounds,
                                    min_round_s=self.timing.min_round_s)
        return ms

    def _timed(self, prepared: Prepared):
        example = self.example
        return prepared.forward(lambda fn: call_model(fn, example))

    def _prepare_candidate(self, model: nn.Module) -> Prepared:
        """Compile a candidate in the study's runtime; the fp32 reference is re-warmed beside it."""
        if self.runtime == "eager":
            return Prepared(model, "eager")
        if self.runtime == "openvino":
            return Prepared(model, "openvino", compile_s=getattr(model, "compile_s", 0.0))
        prepared = self._prepare(model)
        with torch.inference_mode():  # the reference compiles again, from inductor's caches
            self._timed(self.reference)()
        return prepared

    def _compared(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.spec.compared_tensor(call_model(model, batch)).float()

    def _score(self, model: nn.Module) -> float:
        if self.spec.evaluate is not None:
            return self.spec.user_score(model, self.device)
        score, self._score_compile_s = fidelity_score(self.spec, model, self._batches, self._ref_outputs)
        return score

    def candidate(self, policy: Policy, release: bool = True) -> nn.Module:
        """A copy of the fp32 reference with `policy` applied on the device (the earlier candidates freed first)."""
        if release:
            release_candidates(self.runtime, self.device)
        if self.runtime == "openvino":  # the converted fp32 graph, quantized by NNCF where the policy says int8
            return self._openvino.candidate(policy)
        return apply_formats(copy.deepcopy(self.model), policy.layers, policy.default, self.device,
                             calibration=self.calibration, runtime=self.runtime)

    def retime(self, policy: Policy, neighbours: Sequence[float] | None = None) -> PairedTiming | None:
        """Latency of `policy` paired with the fp32 model again (None if it cannot run)."""
        if is_reference(policy) and not self.time_reference:
            return reference_timing(self.reference_latency_ms)
        try:
            prepared = self._prepare_candidate(self.candidate(policy))
            with torch.inference_mode():
                return paired_latency(self._timed(prepared), self._timed(self.reference), self.device, self.timing,
                                      neighbours)
        except (AutoprecError, RuntimeError, torch.OutOfMemoryError):
            return None

    def measure(self, policy: Policy, training: TrainingSettings | None = None, seed: int = 0,
                neighbours: Sequence[float] | None = None) -> Measurement:
        """Measure `policy`; with `training`, after fine-tuning a fresh copy of the fp32 model under it.

        `neighbours`: the latency ratios to fp32 the candidate's place is decided against (1.0 and
        the feasible front's); timing stops once its interval holds none of them (paired_latency)."""
        try:
            result = self._measure(policy, training, seed, neighbours)
        except (NonFinite, TrainingDiverged) as exc:
            result = Measurement.failed(str(exc))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a failed candidate is a recorded result, not a crash
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            result = Measurement.failed(_failure_reason(exc), traceback.format_exc())
        result.runtime = self.runtime
        return result

    def _measure(self, policy: Policy, training: TrainingSettings | None, seed: int,
                 neighbours: Sequence[float] | None) -> Measurement:
        tuned = None
        if training is not None:
            release_candidates(self.runtime, self.device)
            model = copy.deepcopy(self.model)
            batches = load_train_batches(self.spec)
            tuned = fine_tune(self.spec, model, policy, training, self.device, seed, batches)
            steps = paired_step_ratio(self.spec, self.model, policy, training, self.device, self.timing, batches[0])
            tuned.step_ratio, tuned.step_ratio_ci = steps.ratio, steps.ratio_ci
            model = apply_formats(model, policy.layers, policy.default, self.device, calibration=self.calibration,
                                  runtime=self.runtime)
        else:
            reference = is_reference(policy) and not self.time_reference
            model = self.candidate(policy, release=not reference)  # the reference's graph stays warm
            if reference:  # the fp32 model itself: score and ratio are the reference's
                with torch.inference_mode():
                    peak = self._peak(model, self.reference) if self.measure_peak else None
                result = self._result(self.reference_score, reference_timing(self.reference_latency_ms), _storage_bytes(model), peak)
                if self.runtime != "eager":  # the reference's graph, compiled when the study was opened
                    result.compile_s, result.graph_breaks = 0.0, self.reference.graph_breaks
                return result
        prepared = self._prepare_candidate(model)
        with torch.inference_mode():
            out = call_model(prepared.model, self.example)
            probe = first_float_tensor(out) if self.spec.output is None else self.spec.compared_tensor(out)
            if probe is not None and not torch.isfinite(probe).all():
                return Measurement.failed("non-finite output")
        self._score_compile_s = 0.0
        score = self._score(prepared.model)
        if not math.isfinite(score):
            where = f"{self.spec.path}: evaluate() returned {score}" if self.spec.evaluate is not None \
                else "the fidelity score is not finite"
            return Measurement.failed(f"non-finite score ({where} for this policy)")
        with torch.inference_mode():
            timing = paired_latency(self._timed(prepared), self._timed(self.reference), self.device, self.timing,
                                    neighbours)
            peak = self._peak(model, prepared) if self.measure_peak else None
        memory = _storage_bytes(model)
        result = self._result(score, timing, memory, peak)
        result.training = tuned.to_json() if tuned is not None else None
        if self.runtime != "eager":
            result.compile_s = prepared.compile_s + self._score_compile_s
            result.graph_breaks = prepared.graph_breaks
        return result

    def _peak(self, model: nn.Module, prepared: Prepared) -> int:
        return _peak_bytes(model, self._timed(prepared), self.device)

    def _result(self, score: float, timing: PairedTiming, memory: int, peak: int | None) -> Measurement:
        return measurement_of(score, timing, memory, peak, self.reference_latency_ms, self.runtime, self.device,
                              user_score=self.spec.evaluate is not None)
