"""The additive cost model and its exact knapsack proposals."""

from __future__ import annotations

import itertools
import random

import pytest

from autoprec.guided.cost_model import CostModel, knapsack_proposals
from autoprec.guided.sensitivity import Profile


def _random_model(seed: int, layers: int = 6) -> CostModel:
    rng = random.Random(seed)
    fmts = ("fp32", "bf16", "int8")
    profile = Profile()
    lat: dict[str, dict[str, float]] = {}
    for i in range(layers):
        name = f"l{i}"
        base = rng.uniform(1, 10)
        profile.layers[name] = {
            "fp32": {"drop": 0.0, "memory_bytes": 4000.0},
            "bf16": {"drop": rng.uniform(0, 1e-5), "memory_bytes": 2000.0},
            "int8": {"drop": 10 ** rng.uniform(-5, -2), "memory_bytes": 1100.0},
        }
        lat[name] = {"fp32": base, "bf16": base * rng.uniform(0.4, 0.7), "int8": base * rng.uniform(0.3, 0.6)}
    profile.latency_by_default = {"fp32": lat}
    model = CostModel(profile, {f"l{i}": fmts for i in range(layers)})
    model.rest_latency = {"fp32": 5.0}
    model.rest_memory = {"fp32": 100.0}
    model.rest_drop = {"fp32": 0.0}
    return model


def _linked_model(seed: int, layers: int = 6) -> CostModel:
    """_random_model with a link from each even layer into the next: int8 on both ends saves time."""
    model = _random_model(seed, layers)
    rng = random.Random(seed + 100)
    model.profile.links = [{"producer": f"l{i}", "consumer": f"l{i + 1}", "activation": "relu",
                            "producer_format": "int8", "consumer_format": "int8", "saving_ms": rng.uniform(0.5, 4)}
                           for i in range(0, layers - 1, 2)]
    return model


@pytest.mark.parametrize("linked", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed, linked):
    """With links (a layer's cost depending on its neighbour's format) the knapsack stays exact."""
    model = _linked_model(seed) if linked else _random_model(seed)
    names = list(model.choices)
    for budget in (1e-4, 1e-3, 5e-3, 2e-2):
        got = model.fastest_within("fp32", budget)
        assert got is not None
        got_pred = model.predict("fp32", got)
        assert got_pred["drop"] <= budget + 1e-15
        best = min(
            (model.predict("fp32", dict(zip(names, combo)))["latency_ms"]
             for combo in itertools.product(*model.choices.values())
             if model.predict("fp32", dict(zip(names, combo)))["drop"] <= budget),
        )
        # the drop is discretised (rounded up) into 1000 bins, so the optimum may be missed only
        # by a policy within 0.1% of the budget; allow that much slack in latency
        assert got_pred["latency_ms"] <= best * 1.02


def test_calibration_reproduces_uniform_measurements():
    model = _random_model(0)
    layers_fp32 = {n: "fp32" for n in model.choices}
    layers_int8 = {n: "int8" for n in model.choices}
    profiled_int8 = sum(model.profile.layers[n]["int8"]["drop"] for n in model.choices)
    uniform = {
        "fp32": ("fp32", layers_fp32, {"drop": 0.0, "latency_ms": 80.0, "memory_bytes": 30000.0}),
        "int8": ("fp32", layers_int8, {"drop": 2 * profiled_int8, "latency_ms": 40.0, "memory_bytes": 9000.0}),
    }
    model.calibrate(uniform)
    assert model.drop_scale["int8"] == pytest.approx(2.0)
    pred = model.predict("fp32", layers_fp32)
    assert pred["latency_ms"] == pytest.approx(80.0)
    assert pred["memory_bytes"] == pytest.approx(30000.0)
    assert model.predict("fp32", layers_int8)["drop"] == pytest.approx(2 * profiled_int8)


def test_proposals_respect_budgets_and_are_distinct():
    model = _random_model(3)
    proposals = knapsack_proposals(model, max_drop=1e-3, defaults=("fp32",))
    assert proposals
    keys = [tuple(sorted(layers.items())) for _, layers, _ in proposals]
    assert len(keys) == len(set(keys))
    for default, layers, _ in proposals:
        assert model.predict(default, layers)["drop"] <= 0.8 * 1e-3 + 1e-15


def test_refit_on_trials_as_they_come_corrects_a_biased_rest_term():
    model = _random_model(3)
    lat = model.profile.latency_by_default["fp32"]
    names = list(model.choices)
    rng = random.Random(7)
    # the machine adds 2 ms the uniform calibration did not see (rest_latency says 5, the truth is 7)
    measured = []
    for _ in range(9):
        layers = {n: rng.choice(model.choices[n]) for n in names}
        measured.append(("fp32", layers, {"latency_ms": 7.0 + sum(lat[n][f] for n, f in layers.items()),
                                          "memory_bytes": 1.0, "drop": 0.0}))
    before = model.error(measured)["latency_rel_median"]
    model.refit_rest_latency(measured)
    assert model.rest_latency["fp32"] == pytest.approx(7.0)
    assert model.error(measured)["latency_rel_median"] < before / 100
    assert model.rest_latency.keys() == {"fp32"}  # defaults never measured are left alone


def test_latency_calibration_reproduces_uniform_int8_and_stays_positive():
    model = _random_model(1)
    lat = model.profile.latency_by_default["fp32"]
    names = list(model.choices)
    fp32_alone = sum(lat[n]["fp32"] for n in names)
    int8_alone = sum(lat[n]["int8"] for n in names)
    all_fp32, all_int8 = {n: "fp32" for n in names}, {n: "int8" for n in names}
    # in the model, int8 layers save only half what they save alone (their input quantization, caches)
    uniform = {"fp32": ("fp32", all_fp32, {"drop": 0.0, "latency_ms": fp32_alone + 5.0, "memory_bytes": 1.0}),
               "int8": ("fp32", all_int8, {"drop": 1e-3, "latency_ms": 5.0 + 2 * int8_alone, "memory_bytes": 1.0})}
    model.calibrate(uniform)
    assert model.rest_latency["fp32"] == pytest.approx(5.0)
    assert model.latency_scale["fp32"] == {"fp32": 1.0, "int8": pytest.approx(2.0)}
    assert model.predict("fp32", all_int8)["latency_ms"] == pytest.approx(5.0 + 2 * int8_alone)
    half = {n: ("int8" if i % 2 else "fp32") for i, n in enumerate(names)}
    expected = 5.0 + sum(lat[n]["fp32"] if f == "fp32" else 2 * lat[n]["int8"] for n, f in half.items())
    assert model.predict("fp32", half)["latency_ms"] == pytest.approx(expected)
    # layers alone add up to more than the whole model: no negative rest, the layers are scaled down
    uniform["fp32"] = ("fp32", all_fp32, {"drop": 0.0, "latency_ms": 0.5 * fp32_alone, "memory_bytes": 1.0})
    uniform["int8"] = ("fp32", all_int8, {"drop": 1e-3, "latency_ms": 0.01 * int8_alone, "memory_bytes": 1.0})
    model.calibrate(uniform)
    assert model.rest_latency["fp32"] == 0.0 and model.latency_scale["fp32"]["fp32"] == pytest.approx(0.5)
    assert model.latency_scale["fp32"]["int8"] == 0.25  # bounded
    assert model.predict("fp32", all_fp32)["latency_ms"] == pytest.approx(0.5 * fp32_alone)
    rng = random.Random(0)
    for _ in range(50):
        layers = {n: rng.choice(model.choices[n]) for n in names}
        assert model.predict("fp32", layers)["latency_ms"] > 0


@pytest.mark.parametrize("tied", [True, False])
def test_layer_times_from_a_quieter_moment_are_tied_to_the_reference(tied):
    """The layers were timed when the machine ran twice as fast as when the reference (and so every trial,
    a ratio times it) was: tied to the reference by the fp32 model timed beside them, mixed policies are
    predicted exactly; untied, the rest term absorbs the difference and mixed policies miss."""
    true = _random_model(1)
    names = list(true.choices)
    rest = 5.0

    def measured(layers: dict[str, str]) -> dict[str, float]:
        return {"drop": 0.0, "latency_ms": rest + sum(true.profile.latency_by_default["fp32"][n][f]
                                                      for n, f in layers.items()), "memory_bytes": 1.0}

    all_fp32 = {n: "fp32" for n in names}
    all_int8 = {n: "int8" for n in names}
    quiet = Profile(layers=true.profile.layers,
                    latency_by_default={"fp32": {n: {f: ms / 2 for f, ms in by_fmt.items()}
                                                 for n, by_fmt in true.profile.latency_by_default["fp32"].items()}},
                    reference_latency_ms=measured(all_fp32)["latency_ms"])
    if tied:
        quiet.model_latency_ms = measured(all_fp32)["latency_ms"] / 2
    model = CostModel(quiet, true.choices)
    model.calibrate({"fp32": ("fp32", all_fp32, measured(all_fp32)), "int8": ("fp32", all_int8, measured(all_int8))})
    errors = []
    for seed in range(5):
        rng = random.Random(seed)
        mixed = {n: rng.choice(("fp32", "int8")) for n in names}
        errors.append(abs(model.predict("fp32", mixed)["latency_ms"] / measured(mixed)["latency_ms"] - 1))
    if tied:
        assert quiet.time_scale == pytest.approx(2.0)
        assert max(errors) < 1e-9
    else:
        assert max(errors) > 0.02


def test_static_int8_linear_is_calibrated_as_a_quantized_format_not_a_default():
    """int8_static, like int8: its uniform policy (fp32 elsewhere) fixes its drop scale, and it is never
    taken for a default whose rest of the model it would calibrate."""
    model = _random_model(1)
    for name in model.choices:
        model.profile.layers[name]["int8_static"] = dict(model.profile.layers[name]["int8"])
        model.profile.latency_by_default["fp32"][name]["int8_static"] = model.profile.latency_by_default["fp32"][name]["int8"]
    model.choices = {n: ("fp32", "bf16", "int8", "int8_static") for n in model.choices}
    layers_fp32 = {n: "fp32" for n in model.choices}
    layers_static = {n: "int8_static" for n in model.choices}
    profiled = sum(model.profile.layers[n]["int8_static"]["drop"] for n in model.choices)
    model.calibrate({
        "fp32": ("fp32", layers_fp32, {"drop": 0.0, "latency_ms": 80.0, "memory_bytes": 30000.0}),
        "int8_static": ("fp32", layers_static, {"drop": 3 * profiled, "latency_ms": 30.0, "memory_bytes": 9000.0}),
    })
    assert model.drop_scale["int8_static"] == pytest.approx(3.0)
    assert model.drop_scale["int8"] == 1.0  # each int8 format its own scale
    assert "int8_static" not in model.rest_latency
    assert model.predict("fp32", layers_static)["drop"] == pytest.approx(3 * profiled)


def test_a_link_saves_only_with_static_int8_on_both_ends_and_can_decide_the_pair():
    profile = Profile()
    profile.layers = {n: {"fp32": {"drop": 0.0, "memory_bytes": 4.0}, "int8": {"drop": 1e-3, "memory_bytes": 1.0}}
                      for n in ("a", "b")}
    profile.latency_by_default = {"fp32": {"a": {"fp32": 10.0, "int8": 6.0}, "b": {"fp32": 10.0, "int8": 10.5}}}
    model = CostModel(profile, {"a": ("fp32", "int8"), "b": ("fp32", "int8")})
    model.rest_latency, model.rest_memory, model.rest_drop = {"fp32": 1.0}, {"fp32": 0.0}, {"fp32": 0.0}
    # without the link: b is slower in int8, so the fastest policy keeps it fp32
    assert model.fastest_within("fp32", 0.01) == {"a": "int8", "b": "fp32"}
    profile.links = [{"producer": "a", "consumer": "b", "activation": "relu", "producer_format": "int8",
                      "consumer_format": "int8", "saving_ms": 2.0}]
    assert model.predict("fp32", {"a": "int8", "b": "fp32"})["latency_ms"] == pytest.approx(17.0)
    assert model.predict("fp32", {"a": "fp32", "b": "int8"})["latency_ms"] == pytest.approx(21.5)
    assert model.predict("fp32", {"a": "int8", "b": "int8"})["latency_ms"] == pytest.approx(15.5)
    assert model.fastest_within("fp32", 0.01) == {"a": "int8", "b": "int8"}
    assert model.fastest_within("fp32", 0.0015) == {"a": "int8", "b": "fp32"}  # room for one int8 layer


def test_calibration_with_links_reproduces_all_int8_and_predicts_broken_links_slower():
    model = _linked_model(1)
    names = list(model.choices)
    lat = model.profile.latency_by_default["fp32"]
    all_fp32, all_int8 = {n: "fp32" for n in names}, {n: "int8" for n in names}
    saving = model.link_saving(all_int8)
    # measured: 5 ms outside the layers; int8 layers 1.2x their time alone, less what the links save
    uniform = {"fp32": ("fp32", all_fp32, {"drop": 0.0, "latency_ms": 5 + sum(lat[n]["fp32"] for n in names),
                                           "memory_bytes": 30000.0}),
               "int8": ("fp32", all_int8, {"drop": 0.01, "latency_ms": 5 + 1.2 * sum(lat[n]["int8"] for n in names)
                                           - saving, "memory_bytes": 8000.0})}
    model.calibrate(uniform)
    assert model.predict("fp32", all_int8)["latency_ms"] == pytest.approx(uniform["int8"][2]["latency_ms"])
    assert model.latency_scale["fp32"]["int8"] == pytest.approx(1.2)
    # every link broken (one end of each in fp32): predicted at the layers' own 1.2x, no saving
    alternate = {n: "int8" if i % 2 else "fp32" for i, n in enumerate(names)}
    assert saving > 0 and model.link_saving(alternate) == 0
    expected = 5 + sum(lat[n]["fp32"] if f == "fp32" else 1.2 * lat[n]["int8"] for n, f in alternate.items())
    assert model.predict("fp32", alternate)["latency_ms"] == pytest.approx(expected)
    # an additive model calibrated on the same measurement spreads the saving over every int8 layer
    additive = CostModel(Profile(layers=model.profile.layers, latency_by_default=model.profile.latency_by_default),
                         model.choices)
    additive.calibrate(uniform)
    assert additive.predict("fp32", alternate)["latency_ms"] < expected
