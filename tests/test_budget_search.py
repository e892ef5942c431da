"""The search spends its trials where they can still win, and says when nothing more can
(tests/specs/two_miss.py: one int8 layer holds, any two miss, and int8 buys next to no time)."""

from __future__ import annotations

import pytest
import optuna

from autoprec.guided.verdict import SAMPLER_EXHAUSTED, SKIP_MISS
from autoprec.results.html_report import build_report
from autoprec.search import guidance
from autoprec.search.guidance import Guidance
from autoprec.search.loop import Search, SearchConfig
from autoprec.store import schema
from autoprec.store.schema import Origin, params_of
from helpers import FAST, SPECS, autoprec_cli, load_study

pytestmark = pytest.mark.slow  # searches, one of them in subprocesses

TWO_MISS = SPECS / "two_miss.py"
SPACE = SPECS / "int8_space.yaml"
MAX_DROP = 0.0015  # 1.5 steps: one deviating layer holds, two miss
LAYERS = [f"layers.{i}" for i in range(4)]


def _int8(*indices: int) -> dict[str, str]:
    return {name: "int8" if i in indices else "fp32" for i, name in enumerate(LAYERS)}


class _Scripted(optuna.samplers.BaseSampler):
    """Proposes the given policies in turn, then the last one for ever."""

    def __init__(self, policies: list[dict[str, str]]) -> None:
        self.policies, self.asked = policies, 0
        self._current: dict[int, dict[str, str]] = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if trial.number not in self._current:
            self._current[trial.number] = params_of("fp32", self.policies[min(self.asked, len(self.policies) - 1)])
            self.asked += 1
        return self._current[trial.number][param_name]


def _int8_set(record: schema.TrialRecord) -> frozenset[str]:
    return frozenset(n for n, f in record.layers.items() if f == "int8")


def test_no_sampler_trial_is_a_superset_of_a_miss_and_skips_do_not_spend_the_trials(tmp_path, monkeypatch, one_thread):
    config = SearchConfig(model=str(TWO_MISS), trials=12, storage=f"sqlite:///{tmp_path / 's.db'}", space=str(SPACE),
                          device="cpu", max_drop=MAX_DROP, seed=0, retime_front=False, progress=False, prune=False,
                          timing=FAST)
    search = Search.open(config)
    # what the planner found in the case this reproduces: one layer holds, two miss
    for layers in (_int8(0), _int8(0, 1)):
        schema.enqueue(search.study, params_of("fp32", layers), Origin.proposal("sequential converge (given)"))
    # the sampler is left to propose even where the verdict would stop the search, so that its
    # proposals meet the exclusions: a superset of the missed pair, a pair of its own, a superset of
    # that, a single layer, then the whole int8 set (a twin of a miss) for ever
    monkeypatch.setattr(Guidance, "verdict", lambda self: None)
    search.study.sampler = _Scripted([_int8(0, 1, 2), _int8(2, 3), _int8(1, 2, 3), _int8(3), _int8(0, 1, 2, 3)])
    result = search.run(config.trials)

    trials = sorted((schema.TrialRecord.of(t) for t in search.study.get_trials(deepcopy=False)), key=lambda r: r.number)
    misses: list[frozenset[str]] = []
    for r in trials:
        if r.state == "COMPLETE" and r.score_drop is not None:
            if r.origin.kind == schema.SAMPLER:
                assert not any(_int8_set(r) >= m for m in misses), (r.number, sorted(_int8_set(r)))
            if r.score_drop > MAX_DROP:
                misses.append(_int8_set(r))
    skipped = [r for r in trials if r.state == "PRUNED"]
    assert skipped and all(r.skipped for r in skipped)
    first = next(r for r in trials if r.origin.kind == schema.SAMPLER)
    assert first.state == "PRUNED" and "as damaging, layer by layer, as trial 3" in first.skipped
    # the skips did not spend the 12 trials, and the search did not go on for ever: it stopped after
    # MAX_SKIPS_IN_A_ROW skipped proposals in a row, saying so
    measured = [r for r in trials if r.state in ("COMPLETE", "FAIL")]
    assert result.trials_run == len(measured) < config.trials
    assert len(skipped) >= guidance.MAX_SKIPS_IN_A_ROW
    verdict = schema.verdict_of(search.study)
    assert verdict is not None and verdict["kind"] == SAMPLER_EXHAUSTED
    assert f"last {guidance.MAX_SKIPS_IN_A_ROW} proposals were all skipped" in result.verdict
    assert result.skipped.get(SKIP_MISS, 0) >= guidance.MAX_SKIPS_IN_A_ROW
    assert search.study.user_attrs[schema.SKIPPED_ATTR] == schema.skipped_counts(search.study)
    html = build_report(search.study)
    assert 'id="verdict"' in html and "skipped" in html


def test_the_search_stops_with_its_verdict_and_a_resume_goes_on_only_where_something_can_win(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ("search", str(TWO_MISS), "--space", str(SPACE), "--max-drop", str(MAX_DROP), "--storage", url,
            "--study", "two", "--no-progress", "--no-prune", "--no-retime", "--max-rounds", "9", "--device", "cpu")
    proc = autoprec_cli(*args, "--trials", "30")
    assert "stopped before --trials 30: nothing left can win:" in proc.stdout
    assert "over the 0.0015 budget" in proc.stdout and "nothing faster than" in proc.stdout
    assert "--max-drop" in proc.stdout.split("nothing left can win:")[1]
    study = load_study(url, "two")
    records = [schema.TrialRecord.of(t) for t in study.get_trials(deepcopy=False)]
    measured = [r for r in records if r.state in ("COMPLETE", "FAIL")]
    assert len(measured) < 30
    misses = [frozenset(n for n, f in r.layers.items() if f == "int8") for r in records
              if r.state == "COMPLETE" and r.score_drop is not None and r.score_drop > MAX_DROP]
    assert misses, "the all-int8 policy misses: four deviating layers"
    for r in records:
        if r.origin.kind == schema.SAMPLER and r.state == "COMPLETE":
            assert not any(frozenset(n for n, f in r.layers.items() if f == "int8") >= m for m in misses)
    line = schema.verdict_of(study)["line"]
    front = autoprec_cli("front", "--study", "two", "--storage", url)
    assert f"the last search stopped early: {line}" in front.stdout
    # --trials is a ceiling: a resume with more goes on only where something can still win
    again = autoprec_cli(*args, "--trials", "10")
    assert "\n0 trials run, " in again.stdout and "nothing left can win:" in again.stdout
