"""A sampler wrapper that never proposes values the search pruned.

The study's parameter distributions keep every format the space allows (the enqueued uniform policy
of a pruned format uses it, and a resume or `--no-prune` may use it again), so pruning cannot narrow
the distributions; it filters what the sampler proposes instead: a pruned value drawn by the base
sampler is replaced by a draw among the values left for that parameter.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution


class KeepOut(optuna.samplers.BaseSampler):
    """`base`, except that params[name] is never one of `pruned[name]` (unless enqueued)."""

    def __init__(self, base: optuna.samplers.BaseSampler, pruned: Mapping[str, set[Any]], seed: int = 0) -> None:
        self.base = base
        self.pruned = {name: set(values) for name, values in pruned.items() if values}
        self._seed = seed

    def _allowed(self, name: str, value: Any) -> bool:
        return value not in self.pruned.get(name, ())

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        sampled = self.base.sample_relative(study, trial, search_space)
        # a param left out here is drawn by sample_independent, which filters it
        return {name: value for name, value in sampled.items() if self._allowed(name, value)}

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        value = self.base.sample_independent(study, trial, param_name, param_distribution)
        if self._allowed(param_name, value) or not isinstance(param_distribution, CategoricalDistribution):
            return value
        left = [c for c in param_distribution.choices if self._allowed(param_name, c)]
        if not left:
            return value
        return random.Random(f"{self._seed}:{trial.number}:{param_name}").choice(left)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
