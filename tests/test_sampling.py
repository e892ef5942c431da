"""KeepOut: the sampler never proposes a pruned format; enqueued trials still may use it."""

from __future__ import annotations

import optuna
import pytest

from autoprec.search.sampling import KeepOut

CHOICES = ["fp32", "bf16", "int8"]


@pytest.mark.parametrize("base", [lambda: optuna.samplers.RandomSampler(seed=0),
                                  lambda: optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=3)])
def test_pruned_values_are_never_sampled_but_may_be_enqueued(base):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=KeepOut(base(), {"layer:a": {"bf16"}, "layer:b": {"bf16"}}))
    study.enqueue_trial({"layer:a": "bf16", "layer:b": "bf16"})

    def objective(trial):
        cost = {"fp32": 1.0, "bf16": 0.1, "int8": 0.5}  # bf16 looks best: the base sampler wants it
        return sum(cost[trial.suggest_categorical(n, CHOICES)] for n in ("layer:a", "layer:b"))
    study.optimize(objective, n_trials=25)
    sampled = [t.params for t in study.trials[1:]]
    assert study.trials[0].params == {"layer:a": "bf16", "layer:b": "bf16"}
    assert all(p["layer:a"] != "bf16" and p["layer:b"] != "bf16" for p in sampled)
    assert {p["layer:a"] for p in sampled} == {"fp32", "int8"}
