"""Evaluator: default fidelity score on every output form, infeasible candidates, memory, latency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprec.measure.machine import configure_cpu
from autoprec.measure.evaluator import Evaluator, Measurement
from autoprec.policy import Policy
from autoprec.measure.timing import TimingSettings
from autoprec.model.model_file import ModelSpec, load_spec
from helpers import FAST

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).parent / "specs"


def make_spec(build, example, **optional) -> ModelSpec:
    return ModelSpec(path=Path("<test model.py>"), build_model=build, example_inputs=example, **optional)


def evaluator(spec: ModelSpec, **kwargs) -> Evaluator:
    kwargs.setdefault("timing", FAST)
    kwargs.setdefault("measure_peak", False)
    configure_cpu(1, kwargs["timing"].keep_freed_memory)
    return Evaluator(spec, "cpu", **kwargs)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Returns(nn.Module):
    """A small MLP whose forward returns its logits in the form `kind` says, beside a non-float tensor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor):
        logits = self.fc2(torch.relu(self.fc1(x)))
        ids = logits.argmax(-1)
        if self.kind == "tensor":
            return logits
        if self.kind == "tuple":
            return ids, (logits, logits * 2)
        if self.kind == "dict":
            return {"ids": ids, "logits": logits}
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=logits)


BF16_ALL = Policy(layers={"fc1": "bf16", "fc2": "bf16"}, default="bf16")


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "model_output"])
def test_default_fidelity_score_for_each_output_form(kind):
    if kind == "model_output":
        pytest.importorskip("transformers")
    ev = evaluator(make_spec(lambda: Returns(kind), lambda: _x(4, 16)))
    assert ev.reference_score == pytest.approx(1.0, abs=1e-6)
    m = ev.measure(BF16_ALL)
    assert m.feasible, m.reason
    assert 0.995 < m.score < ev.reference_score  # bf16 changes the logits a little
    assert m.methods["score"].startswith("mean per-sample cosine similarity")
    int8 = ev.measure(Policy(layers={"fc1": "int8", "fc2": "int8"}))
    assert int8.feasible and 0.99 < int8.score < ev.reference_score


def test_default_score_averages_eval_inputs_per_sample():
    """Scored on eval_inputs() when given: one bad sample among twelve pulls the mean down by about 1/12."""

    class ZeroesOneSample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            out = self.fc(x)
            if out.dtype == torch.bfloat16:  # the candidate flips the sign of one sample of the third batch
                out = out.clone()
                out[(x[:, 0] == 123.0)] *= -1
            return out

    def batches():
        gen = torch.Generator().manual_seed(2)
        data = [torch.randn(4, 4, generator=gen) for _ in range(3)]
        data[2][0, 0] = 123.0
        return data

    ev = evaluator(make_spec(ZeroesOneSample, lambda: _x(2, 4), eval_inputs=batches))
    m = ev.measure(Policy(layers={"fc": "bf16"}, default="bf16"))
    assert m.feasible
    assert m.score == pytest.approx((11 - 1) / 12, abs=0.01)


def test_spec_output_picks_the_compared_tensor():
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(16, 8)

        def forward(self, x):
            return x * 1.0, self.fc(x)  # the first float output does not depend on any layer

    policy = Policy(layers={"fc": "bf16"})
    plain = evaluator(make_spec(TwoOutputs, lambda: _x(4, 16)))
    assert plain.measure(policy).score == plain.reference_score  # compared x, which bf16 fc leaves alone
    picked = evaluator(make_spec(TwoOutputs, lambda: _x(4, 16), output=lambda outputs: outputs[1]))
    score = picked.measure(policy).score
    assert 0.99 < score < picked.reference_score


def test_user_evaluate_is_the_score():
    calls = []

    def evaluate(model, device):
        calls.append(device)
        with torch.inference_mode():
            out = model(_x(8, 16, seed=5)).float()
        return 1.0 - out.abs().mean().item()

    ev = evaluator(make_spec(lambda: Returns("tensor"), lambda: _x(4, 16), evaluate=evaluate))
    assert calls == [torch.device("cpu")]
    m = ev.measure(BF16_ALL)
    assert m.feasible and m.methods["score"] == "model.py evaluate(model, device)"
    assert m.score != ev.reference_score and abs(m.score - ev.reference_score) < 0.01
    assert len(calls) == 2


@pytest.mark.parametrize("spec_name", ["mlp.py", "tuple_inputs.py", "dict_inputs.py"])
def test_spec_files_with_tensor_tuple_and_dict_inputs(spec_name):
    ev = evaluator(load_spec(SPECS / spec_name))
    m = ev.measure(Policy(default="bf16"))
    assert m.feasible, m.reason
    assert 0.99 < m.score <= 1.0


# --------------------------------------------------------------------------- infeasible candidates


def overflowing_spec() -> ModelSpec:
    def build():
        model = nn.Sequential(nn.Linear(8, 8))
        with torch.no_grad():
            model[0].weight.fill_(1000.0)  # 8 inputs of 100 -> 8e5, over fp16's 65504
            model[0].bias.zero_()
        return model

    return make_spec(build, lambda: torch.full((2, 8), 100.0))


def test_fp16_overflow_is_an_infeasible_measurement():
    ev = evaluator(overflowing_spec())
    assert ev.reference_score == pytest.approx(1.0)
    m = ev.measure(Policy(default="fp16", layers={"0": "fp16"}))
    assert m == Measurement(feasible=False, reason="non-finite output")
    assert ev.measure(Policy(default="bf16", layers={"0": "bf16"})).feasible  # bf16 has fp32's range


def test_fp16_overflow_in_eval_inputs_only_is_infeasible():
    spec = overflowing_spec()
    spec.example_inputs = lambda: torch.full((2, 8), 1.0)  # harmless
    spec.eval_inputs = lambda: [torch.full((2, 8), 1.0), torch.full((2, 8), 100.0)]  # overflows in fp16
    m = evaluator(spec).measure(Policy(layers={"0": "fp16"}))
    assert m == Measurement(feasible=False, reason="non-finite output")


def test_a_nan_from_evaluate_on_a_candidate_names_the_file_and_function():
    def score(model, device):
        with torch.no_grad():
            out = model(_x(4, 16).to(device)).float()
        return float("nan") if out.dtype != torch.float32 or model.fc1.weight.dtype != torch.float32 else 1.0

    spec = make_spec(lambda: Returns("tensor"), lambda: _x(4, 16), evaluate=score)
    m = evaluator(spec).measure(Policy(layers={"fc1": "bf16"}))
    assert not m.feasible
    assert "non-finite score" in m.reason and "<test model.py>: evaluate() returned nan" in m.reason


def cnn_spec() -> ModelSpec:
    return load_spec(SPECS / "tuple_inputs.py")


def test_unsupported_format_is_an_infeasible_measurement_naming_the_layer():
    ev = evaluator(cnn_spec())
    m = ev.measure(Policy(layers={"conv2": "int8", "head": "fp8"}))
    assert not m.feasible
    assert "layer 'head'" in m.reason and "fp8 needs a CUDA GPU" in m.reason
    assert m.score is None and m.latency_ms is None and m.memory_bytes is None


def test_int8_conv_is_measured_as_static_int8_on_the_cpu():
    m = evaluator(cnn_spec()).measure(Policy(layers={"head": "int8", "conv2": "int8"}))
    assert m.feasible, m.reason
    assert 0.99 < m.score <= 1.0


def test_missing_layer_is_an_infeasible_measurement():
    m = evaluator(cnn_spec()).measure(Policy(layers={"decoder.fc": "bf16"}))
    assert not m.feasible and "layer 'decoder.fc' is not in the model" in m.reason


def test_failing_forward_is_an_infeasible_measurement():
    class FailsInHalf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.dtype != torch.float32:
                raise RuntimeError("\"my_kernel\" not implemented for 'Half'")
            return self.fc(x)

    m = evaluator(make_spec(FailsInHalf, lambda: _x(2, 4))).measure(Policy(default="fp16"))
    assert (m.feasible, m.reason) == (False, "format not supported on this device: "
                                             "\"my_kernel\" not implemented for 'Half'")
    assert m.score is None and "RuntimeError" in m.traceback  # kept for the store, not printed


# --------------------------------------------------------------------------- reference, memory, latency


def _state(model: nn.Module):
    return {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}


def test_fp32_policy_scores_exactly_the_reference_and_leaves_it_untouched():
    ev = evaluator(load_spec(SPECS / "mlp.py"))
    before = _state(ev.model)
    ev.measure(Policy(layers={"0": "int8", "2": "fp16"}, default="bf16"))
    after = _state(ev.model)
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] and torch.equal(after[k][1], before[k][1]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in ev.model.modules())
    m = ev.measure(Policy())
    assert m.feasible and m.score == ev.reference_score


def test_memory_bytes_follow_the_formats():
    ev = evaluator(load_spec(SPECS / "mlp.py"))
    fp32 = ev.measure(Policy())
    bf16 = ev.measure(Policy(layers={"0": "bf16", "2": "bf16", "4": "bf16"}, default="bf16"))
    int8 = ev.measure(Policy(layers={"0": "int8", "2": "int8", "4": "int8"}))
    params = sum(p.numel() for p in ev.model.parameters())
    assert fp32.memory_bytes == 4 * params
    assert bf16.memory_bytes == 2 * params
    assert int8.memory_bytes < bf16.memory_bytes
    assert fp32.methods["memory_bytes"].startswith("bytes of all parameters and buffers")


@pytest.mark.slow
def test_latency_and_peak_fields():
    timing = TimingSettings(rounds=5, min_round_s=0.01, warmup_calls=2)
    ev = evaluator(load_spec(SPECS / "mlp.py"), timing=timing, measure_peak=True)
    assert ev.reference_latency_ms > 0
    m = ev.measure(Policy(layers={"2": "int8"}))
    assert m.feasible
    assert m.latency_ms > 0 and m.candidate_ms > 0 and m.latency_runs >= timing.rounds
    assert m.latency_spread >= 1.0 and m.latency_ratio_lo <= m.latency_ratio <= m.latency_ratio_hi
    assert m.latency_ms == pytest.approx(m.latency_ratio * ev.reference_latency_ms) and m.latency_seconds > 0
    assert ev.measure(Policy()).latency_ratio == 1.0  # the fp32 model itself: not timed against itself
    assert m.peak_bytes is not None and m.peak_bytes >= m.memory_bytes > 0
    assert m.methods["peak_bytes"].startswith("memory_bytes + peak live tensor bytes")
    bf16 = ev.measure(Policy(default="bf16"))
    assert bf16.peak_bytes >= bf16.memory_bytes
    json.dumps(m.to_json())  # a measurement is stored as JSON


def test_no_peak_when_not_asked():
    m = evaluator(load_spec(SPECS / "mlp.py"), measure_peak=False).measure(Policy())
    assert m.feasible and m.peak_bytes is None


def test_given_reference_latency_is_used():
    ev = evaluator(load_spec(SPECS / "mlp.py"), reference_latency_ms=1000.0)
    assert ev.reference_latency_ms == 1000.0
    m = ev.measure(Policy())
    assert m.latency_ms == pytest.approx(1000.0 * m.latency_ratio)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_measurements():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    configure_cpu(1, False)
    ev = Evaluator(load_spec(SPECS / "mlp.py"), "cuda", timing=FAST, measure_peak=True)
    for policy in (Policy(), Policy(default="bf16"), Policy(layers={"0": "int8", "2": "int8", "4": "int8"})):
        m = ev.measure(policy)
        assert m.feasible, m.reason
        assert m.score > 0.98 and m.peak_bytes >= m.memory_bytes
    configure_cpu(1, False)
    conv = Evaluator(cnn_spec(), "cuda", timing=FAST, measure_peak=False)
    m = conv.measure(Policy(layers={"conv1": "int8"}))
    assert not m.feasible and "layer 'conv1'" in m.reason


class _Costly(nn.Module):
    """A Linear whose every forward books 5 fake seconds in bf16 and 1 in fp32 (see _fake_clock)."""

    spent = [0.0]

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        _Costly.spent[0] += 5.0 if self.lin.weight.dtype == torch.bfloat16 else 1.0
        return self.lin(x)


def _fake_clock(monkeypatch) -> None:
    import autoprec.measure.timing as T

    def fake_time_calls(forward, calls, device):
        before = _Costly.spent[0]
        for _ in range(calls):
            forward()
        return _Costly.spent[0] - before
    monkeypatch.setattr(T, "time_calls", fake_time_calls)


def test_measure_stops_timing_once_the_neighbours_place_it_and_records_the_interval(monkeypatch):
    _fake_clock(monkeypatch)
    spec = make_spec(lambda: nn.Sequential(_Costly()), lambda: _x(2, 4))
    ev = evaluator(spec, timing=TimingSettings(rounds=9, min_round_s=0.005, warmup_calls=1, max_rounds=33),
                   reference_latency_ms=10.0)
    slow = ev.measure(Policy(layers={"0.lin": "bf16"}), neighbours=(1.0, 0.6))
    assert slow.feasible and slow.latency_rounds == 5 and slow.latency_stopped == "settled"
    assert slow.latency_ratio_lo == slow.latency_ratio == slow.latency_ratio_hi == pytest.approx(5.0)
    assert slow.latency_ms == pytest.approx(50.0) and slow.to_json()["latency_ratio_lo"] == pytest.approx(5.0)
    close = ev.measure(Policy(layers={"0.lin": "bf16"}), neighbours=(1.0, 5.0))  # on a neighbour: full precision
    assert close.latency_rounds >= 9 and close.latency_stopped == "target"
    fp32 = ev.measure(Policy(layers={"0.lin": "fp32"}), neighbours=(1.0, 0.6))  # the reference itself: not timed
    assert fp32.latency_ratio == 1.0 and fp32.latency_rounds == 0 and fp32.latency_stopped == "reference"
    assert fp32.score == ev.reference_score and fp32.latency_ms == 10.0 and ev.retime(Policy()).ratio == 1.0
    plain = ev.measure(Policy(layers={"0.lin": "bf16"}))  # without neighbours: as before
    assert plain.latency_rounds == 9 and plain.latency_stopped == "target"


class OneNumberPerSample(nn.Module):
    """A regression head: one number per sample, shape (N,)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).squeeze(-1)


def test_one_number_per_sample_is_compared_as_one_vector_and_int8_shows_a_drop():
    """A per-sample cosine of a single number is its sign's agreement (1 for any rounding): all-int8
    scored 1.0 and every profile drop was 0. The batch's outputs are compared as one vector instead."""
    from autoprec.guided.sensitivity import exact_drops, linearized_drops

    spec = make_spec(OneNumberPerSample, lambda: _x(64, 16))
    ev = evaluator(spec)
    int8 = ev.measure(Policy(layers={"fc1": "int8", "fc2": "int8"}))
    assert int8.feasible
    assert 1e-7 < ev.reference_score - int8.score < 0.1
    model, example, names = spec.new_model(), spec.example(), ["fc1", "fc2"]
    choices = {n: ("fp32", "int8") for n in names}
    linear, skipped = linearized_drops(spec, model, example, names, choices, torch.device("cpu"), probes=16)
    exact = exact_drops(spec, model, example, names, choices, torch.device("cpu"))
    assert skipped == []
    for name in names:
        assert exact[name]["int8"] > 0
        assert 0.3 < linear[name]["int8"] / exact[name]["int8"] < 3.0, (name, linear, exact)


def test_a_constant_fp32_output_is_warned_about():
    """torchvision's VisionTransformer zero-initialises its head: every output 0, every drop 0."""
    def build():
        model = Returns("tensor")
        with torch.no_grad():
            model.fc2.weight.zero_()
            model.fc2.bias.zero_()
        return model

    warning = evaluator(make_spec(build, lambda: _x(4, 16))).reference_warning()
    assert warning and "<test model.py>" in warning and "0 everywhere" in warning
    assert evaluator(make_spec(lambda: Returns("tensor"), lambda: _x(4, 16))).reference_warning() is None
