"""The drop model: a monotone map from profile (fidelity) drop to measured score drop, and the score's granularity."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from autoprec.guided.drop_model import DropModel, Granularity, isotonic, loo_error, score_granularity


def test_isotonic_is_monotone_and_pools_violators():
    xs, ys = isotonic([1, 2, 3, 4, 4], [1.0, 3.0, 2.0, 5.0, 7.0])
    assert xs == [1, 2, 3, 4]
    assert ys == [1.0, 2.5, 2.5, 6.0]


def test_noisy_points_give_a_monotone_map_through_the_origin():
    rng = random.Random(0)
    points = [(x, 0.3 * x ** 0.5 + rng.gauss(0, 0.002)) for x in (10 ** rng.uniform(-5, -1) for _ in range(40))]
    model = DropModel.fit(points, anchored=True)
    grid = np.logspace(-6, 0, 200)
    predicted = [model.predict(x) for x in grid]
    assert model.predict(0.0) == 0.0
    assert all(b >= a for a, b in zip(predicted, predicted[1:]))


def test_power_law_between_and_beyond_points():
    truth = lambda x: 0.3 * x ** 0.4  # noqa: E731
    model = DropModel.fit([(1e-3, truth(1e-3)), (1e-1, truth(1e-1))], anchored=True)
    for x in (3e-3, 3e-2, 0.5):  # between, and beyond the last point
        assert model.predict(x) == pytest.approx(truth(x), rel=1e-9)
    # below the first point, from the origin: the power of the next two points, not a straight line
    assert model.predict(1e-4) == pytest.approx(truth(1e-4), rel=1e-9)
    assert model.inverse(truth(2e-2)) == pytest.approx(2e-2, rel=1e-6)


@pytest.mark.parametrize("power", [0.3, 0.4, 1.0])
def test_one_plan_measured_near_the_budget_gives_the_curvature(power):
    # the case: the all-int8 point is 45x beyond the budget; a linear scale through it plans at
    # x = 1.3e-3 for a budget of 2e-3, where a score concave in fidelity measures 6x the budget
    truth = lambda x: 0.09 * (x / 0.057) ** power  # noqa: E731
    budget = 0.002
    far = [(0.057, truth(0.057))]
    linear = 0.057 * budget / truth(0.057)
    first = DropModel.fit(far, anchored=True).inverse(budget)  # prior power 0.5 below the only point
    assert first < linear
    if power < 1:
        assert truth(linear) > 6 * budget and truth(first) < truth(linear) / 2
    second = DropModel.fit(far + [(first, truth(first))], anchored=True).inverse(budget)
    assert truth(second) == pytest.approx(budget, rel=1e-6)


def test_another_default_is_flat_below_its_own_uniform_point():
    model = DropModel.fit([(1e-4, 0.004)], anchored=False)  # all-bf16 at fidelity 1e-4 lost 0.004
    assert model.predict(1e-6) == 0.004  # nothing below it is known: no cheaper guess than the measured
    assert model.inverse(0.003) == 0.0  # a budget under it: not plannable
    assert model.inverse(0.008) == pytest.approx(2e-4)


def test_leave_one_out_skips_the_anchor():
    pairs = loo_error([(0.0, 0.0), (1e-3, 0.01), (1e-2, 0.02)], anchored=True)
    assert len(pairs) == 2


def test_granularity_of_an_accuracy_over_450_samples():
    scores = [k / 450 for k in (437, 436, 430, 401)]
    g = score_granularity(438 / 450, scores, fp32_scores=[438 / 450])
    assert g.denominator == 450 and g.step == pytest.approx(1 / 450)
    assert g.noise == 0.0 and g.margin == pytest.approx(0.5 / 450)


def test_granularity_of_a_float32_accuracy():
    acc = lambda k: float(torch.tensor([1.0] * k + [0.0] * (1000 - k)).mean())  # noqa: E731
    g = score_granularity(acc(981), [acc(979), acc(970)])
    assert g.denominator == 1000


def test_a_continuous_score_has_no_step_and_fp32_noise_counts():
    rng = random.Random(1)
    scores = [1 - 10 ** rng.uniform(-6, -2) for _ in range(20)]
    g = score_granularity(1.0, scores)
    assert g.step == 0.0 and g.denominator is None
    noisy = score_granularity(0.8, scores, fp32_scores=[0.8001, 0.7999])
    assert noisy.noise == pytest.approx(1e-4) and noisy.margin == pytest.approx(2e-4)


def test_a_default_known_only_at_zero_fidelity_still_predicts():
    # all-fp16 whose layers profile at exactly 0 and whose rest lost 0.003: one point at x = 0
    model = DropModel.fit([(0.0, 0.003)], anchored=False)
    assert model.predict(0.0) == 0.003 and model.predict(1e-3) == pytest.approx(0.004)
    assert loo_error([(0.0, 0.003), (0.0, 0.004)], anchored=False)  # each from the other, no division by zero


def test_the_prior_below_the_only_point_follows_the_score_kind():
    from autoprec.guided.drop_model import CONTINUOUS_PRIOR_POWER, PRIOR_POWER, prior_power

    assert prior_power(Granularity(step=1 / 450, denominator=450)) == PRIOR_POWER == 0.5
    assert prior_power(Granularity()) == CONTINUOUS_PRIOR_POWER == 1.0
    # a continuous (fidelity-like) score: drop linear in fidelity, the all-int8 point 1000x beyond the budget
    far = [(0.03, 0.03)]
    budget = 3e-5
    continuous = DropModel.fit(far, anchored=True, prior=1.0).inverse(budget)
    assert continuous == pytest.approx(budget, rel=1e-6)  # planned at the budget, not 1000x under it
    counted = DropModel.fit(far, anchored=True, prior=0.5).inverse(budget)
    assert counted == pytest.approx(0.03 * (budget / 0.03) ** 2, rel=1e-6)
