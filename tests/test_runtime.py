"""The compiled runtime: regional compilation shares work, candidates are scored and timed compiled,
a compile failure is a failed measurement with its reason, int8 picks its kernel by runtime.

torch.compile on the CPU costs seconds even for a tiny model (a cold inductor cache: tens of seconds
once), so the compiled Evaluator is built once per module and the models are tiny.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from autoprec.measure.machine import configure_cpu
from autoprec.measure import runtime as R
from autoprec.measure.evaluator import Evaluator
from autoprec.policy import Policy
from autoprec.precision import apply_formats
from autoprec.precision import int8 as int8_module
from autoprec.measure.timing import TimingSettings
from autoprec.model.model_file import load_spec
from helpers import FAST

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).parent / "specs"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Sequential(nn.Linear(8, 4), nn.ReLU())  # two classes: not repeated blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _call(x: torch.Tensor):
    return lambda fn: fn(x)


def test_repeated_blocks_are_the_children_of_a_list_of_one_class():
    assert R.repeated_blocks(Stack()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert R.repeated_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == []  # leaves, not blocks


def test_unknown_runtime_is_refused_with_the_choices():
    with pytest.raises(R.AutoprecError, match="use one of eager, compiled"):
        R.check_runtime("jit")


def _compiled_stack(**options) -> tuple[R.Prepared, int]:
    """A Stack compiled on the CPU with `options`, checked against eager; and how many graphs it made."""
    from torch._dynamo.utils import counters

    R.reset()
    model = Stack().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x)
    before = counters["stats"]["unique_graphs"]
    prepared = R.prepare(model, "compiled", torch.device("cpu"), _call(x), **options)
    graphs = counters["stats"]["unique_graphs"] - before
    with torch.inference_mode():
        torch.testing.assert_close(prepared.model(x), expected)
    return prepared, graphs


@pytest.mark.slow
def test_regional_compilation_compiles_identical_blocks_once():
    prepared, graphs = _compiled_stack(freeze=False)
    assert prepared.regions == ["blocks.0", "blocks.1", "blocks.2"]
    assert graphs == 1  # three blocks, one graph
    assert prepared.graph_breaks == 0 and prepared.compile_s >= 0


def test_frozen_regional_compilation_gives_each_block_its_graph_and_the_same_numbers():
    """Freezing (the CPU default) makes weights constants of the graph: each block compiles its own."""
    prepared, graphs = _compiled_stack(regional=True)
    assert prepared.regions == ["blocks.0", "blocks.1", "blocks.2"]
    assert graphs == 3


def test_frozen_cpu_compilation_is_one_graph_of_the_whole_model():
    """With freezing regions would share no graph: the CPU default compiles the whole model as one."""
    prepared, graphs = _compiled_stack()
    assert prepared.regions == [""]
    assert graphs == 1


def test_eager_runtime_leaves_the_model_alone():
    model = Stack()
    prepared = R.prepare(model, "eager", torch.device("cpu"), _call(torch.zeros(1, 8)))
    assert prepared.model is model and prepared.compile_s == 0.0


@pytest.fixture(scope="module")
def compiled_evaluator(one_thread):
    configure_cpu(1, False)
    return Evaluator(load_spec(SPECS / "mlp.py"), "cpu", timing=FAST, measure_peak=False,
                     runtime="compiled")


@pytest.mark.slow
def test_compiled_evaluator_scores_and_times_compiled_candidates(compiled_evaluator):
    ev = compiled_evaluator
    assert ev.reference.regions == [""]  # no repeated blocks: the whole model
    assert ev.reference_score == pytest.approx(1.0, abs=1e-6) and ev.reference_latency_ms > 0
    m = ev.measure(Policy(default="bf16"))
    assert m.feasible, m.reason
    assert m.runtime == "compiled" and m.compile_s is not None and m.compile_s >= 0 and m.graph_breaks == 0
    assert 0.99 < m.score < 1.0  # bf16's numerics, from the compiled model
    assert m.latency_ratio > 0 and m.methods["runtime"].startswith("torch.compile")


def test_compile_failure_is_a_failed_measurement_with_its_reason(compiled_evaluator, monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this (test)")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    m = compiled_evaluator.measure(Policy(default="fp16"))
    assert not m.feasible
    assert m.reason.startswith("torch.compile failed:") and "no kernel for this (test)" in m.reason
    monkeypatch.undo()
    assert compiled_evaluator.measure(Policy()).feasible  # the next candidate compiles again


@pytest.mark.parametrize("vnni", [True, False])
def test_int8_kernel_follows_the_runtime(monkeypatch, vnni):
    monkeypatch.setattr(int8_module, "cpu_has_vnni", lambda: vnni)
    torch.manual_seed(0)
    eager = apply_formats(nn.Sequential(nn.Linear(8, 8)), {"0": "int8"}, runtime="eager")
    compiled = apply_formats(nn.Sequential(nn.Linear(8, 8)), {"0": "int8"}, runtime="compiled")
    assert type(eager[0]).__name__ == "Linear" and type(eager[0]).__module__.startswith("torch.ao.nn.quantized")
    torchao_weight = type(compiled[0].weight).__module__.startswith("torchao")
    assert torchao_weight is vnni


@pytest.mark.cuda
def test_cuda_graphs_outputs_are_the_callers_to_keep():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    R.reset()
    model = Stack().to(device).eval()
    x = torch.randn(2, 8, device=device)
    prepared = R.prepare(model, "compiled", device, _call(x))
    assert prepared.regions == [""]
    with torch.inference_mode():
        first = prepared.model(x)
        second = prepared.model(x * 2)  # a replay: without copies it would overwrite `first`
        torch.testing.assert_close(first, model(x))
        torch.testing.assert_close(second, model(x * 2))
    ev = Evaluator(load_spec(SPECS / "mlp.py"), "cuda", timing=FAST, measure_peak=True, runtime="compiled")
    m = ev.measure(Policy(default="bf16"))
    assert m.feasible and m.runtime == "compiled" and m.compile_s is not None, m.reason


def test_policy_records_its_runtime_and_apply_policy_uses_its_kernels(monkeypatch, tmp_path):
    from autoprec import PolicyError, apply_policy, load_policy

    monkeypatch.setattr(int8_module, "cpu_has_vnni", lambda: True)
    path = Policy(layers={"0": "int8"}, measured={"runtime": "compiled"}).save(tmp_path / "p.json")
    policy = load_policy(path)
    assert policy.runtime == "compiled" and Policy().runtime == "eager"
    model = apply_policy(nn.Sequential(nn.Linear(8, 8)), path)  # not compiled: the user compiles it
    assert type(model[0].weight).__module__.startswith("torchao") and not hasattr(model, "_orig_mod")
    eager = apply_policy(nn.Sequential(nn.Linear(8, 8)), path, runtime="eager")
    assert type(eager[0]).__module__.startswith("torch.ao.nn.quantized")
    (tmp_path / "bad.json").write_text(path.read_text().replace('"compiled"', '"jit"'))
    with pytest.raises(PolicyError, match=r"measured.runtime' is 'jit'; use one of eager, compiled"):
        load_policy(tmp_path / "bad.json")


@pytest.mark.slow
def test_compiled_profile_times_each_distinct_layer_once():
    from autoprec.guided.sensitivity import build_profile

    class _Spec:  # the profile needs compared_tensor and output only
        output = None

        def compared_tensor(self, out):
            return out

    model = Stack().eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    choices = {"inp": ("fp32", "bf16"), "blocks.0.fc": ("fp32", "bf16"), "blocks.1.fc": ("fp32", "bf16")}
    profile = build_profile(_Spec(), model, x, choices, ("fp32",), torch.device("cpu"), method="exact",
                            runtime="compiled")
    assert profile.runtime == "compiled" and profile.seconds["compile"] >= 0
    times = profile.latency_by_default["fp32"]
    assert times["inp"] == times["blocks.0.fc"] == times["blocks.1.fc"]  # one shape: timed once per format
    assert profile.layers["inp"]["bf16"]["drop"] > 0


def test_eval_batches_are_cut_to_the_example_shape_where_they_fit():
    example = {"ids": torch.zeros(2, 5), "mask": torch.ones(2, 5)}
    fits = {"ids": torch.arange(30.0).reshape(6, 5), "mask": torch.ones(6, 5)}
    other = {"ids": torch.zeros(3, 5), "mask": torch.ones(3, 5)}  # not a multiple of 2: kept whole
    cut = R.rebatch_like([fits, other], example)
    assert [b["ids"].shape[0] for b in cut] == [2, 2, 2, 3]
    torch.testing.assert_close(torch.cat([b["ids"] for b in cut[:3]]), fits["ids"])
    assert R.rebatch_like([torch.zeros(4, 7)], torch.zeros(2, 5))[0].shape == (4, 7)  # other width
