"""How much of a model a study keeps on its device: one fp32 reference and one candidate at a time.

The rule (docs/gpu.md): the fp32 reference is compiled from a copy of the module tree that shares
its weights, so it costs no second fp32 copy; what an earlier candidate left (its compiled graphs,
which with freezing hold folded copies of its weights) is freed before the next one is built; the
profile's captured layer inputs are kept in host memory on a GPU. Peak device memory is then about
twice the model's fp32 size plus one forward's activations.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from autoprec.measure import evaluator as evaluator_module
from autoprec.measure.evaluator import Evaluator
from autoprec.measure.machine import configure_cpu
from autoprec.model.model_file import load_spec
from autoprec.policy import Policy
from helpers import FAST, SPECS


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.slow
def test_the_compiled_reference_shares_the_fp32_weights_and_old_candidates_are_gone_before_the_next():
    configure_cpu(1, False)
    evaluator = Evaluator(load_spec(SPECS / "mlp.py"), "cpu", timing=FAST, measure_peak=False, runtime="compiled")
    reference = evaluator.reference.model
    assert reference is not evaluator.model
    assert _storages(reference) == _storages(evaluator.model)  # no second fp32 copy of the weights

    built: list[weakref.ref] = []
    alive_when_built: list[int] = []
    apply_formats = evaluator_module.apply_formats

    def recording(model, *args, **kwargs):
        gc.collect()
        alive_when_built.append(sum(ref() is not None for ref in built))
        out = apply_formats(model, *args, **kwargs)
        built.append(weakref.ref(out))
        return out

    evaluator_module.apply_formats = recording
    try:
        for policy in (Policy(default="bf16"), Policy(layers={"0": "bf16"}), Policy(layers={"2": "bf16"})):
            assert evaluator.measure(policy).feasible
    finally:
        evaluator_module.apply_formats = apply_formats
    assert alive_when_built == [0, 0, 0]  # each candidate built with no earlier one still held


@pytest.mark.cuda
def test_peak_device_memory_of_a_study_is_about_twice_the_fp32_model():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from autoprec.guided.sensitivity import build_profile

    configure_cpu(1, False)
    spec = load_spec(SPECS / "mlp.py")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    evaluator = Evaluator(spec, "cuda", timing=FAST, measure_peak=False)
    fp32 = _bytes(evaluator.model)
    for policy in (Policy(default="bf16"), Policy(layers={"0": "int8"}), Policy()):
        assert evaluator.measure(policy).feasible
    names = [n for n, m in evaluator.model.named_modules() if isinstance(m, torch.nn.Linear)]
    build_profile(spec, evaluator.model, evaluator.example, {n: ("fp32", "bf16") for n in names}, ("fp32",),
                  evaluator.device)
    assert torch.cuda.max_memory_allocated() - start <= 3 * fp32 + 64 * 2**20
