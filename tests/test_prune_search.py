"""The format probe in a search: run once per machine and kept in the store, pruning announced and obeyed."""

from __future__ import annotations

from pathlib import Path

import pytest
import optuna

from autoprec.measure import format_probe as P
from autoprec.errors import StoreError
from autoprec.store import schema
from autoprec.search.loop import Search, SearchConfig
from autoprec.measure.timing import TimingSettings

TINY = Path(__file__).parent / "specs" / "tiny_mlp.py"
FAST = TimingSettings(rounds=3, min_round_s=0.002, warmup_calls=1, max_rounds=3)


def _slow_bf16(formats, device):
    return P.FormatProbe(P.machine(device), {f: {"linear": 9.0 if f == "bf16" else 0.5} for f in formats})


def _config(url: str, study: str, **kwargs) -> SearchConfig:
    return SearchConfig(model=str(TINY), trials=1, storage=url, study=study, timing=FAST, progress=False,
                        space="cpu", **kwargs)


@pytest.mark.slow
def test_probe_is_cached_in_the_store_and_pruning_is_announced_and_obeyed(tmp_path, monkeypatch, one_thread):
    runs = []
    monkeypatch.setattr(P, "run_probe", lambda formats, device, runtime="eager": runs.append(list(formats)) or _slow_bf16(formats, device))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = Search.open(_config(url, "first", strategy="random", retime_front=False))
    assert len(runs) == 1
    line = search.pruning.announcement
    assert line.startswith("pruned bf16 (9.0x fp32 on linear)") and "--no-prune" in line and "\n" not in line
    assert search.search_choices == {name: ("fp32", "int8", "int8_static") for name in search.choices}
    assert search.search_defaults == ("fp32",)
    search.run(10)
    trials = search.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 10
    bf16 = [t for t in trials if "bf16" in t.params.values()]
    assert [t.user_attrs["origin"] for t in bf16] == ["uniform bf16"]  # only its uniform policy, for memory
    assert schema.read_info(search.study).probe["ratios"]["bf16"]["linear"] == 9.0
    # another study on this machine, same store: the probe comes from the store
    second = Search.open(_config(url, "second"))
    assert len(runs) == 1 and second.pruning is not None
    everything = Search.open(_config(url, "third", prune=False))
    assert len(runs) == 1 and everything.pruning is None and everything.search_choices == everything.choices
    with pytest.raises(StoreError, match="drop --no-prune"):  # fixed at creation: a resume cannot widen it
        Search.open(_config(url, "first", prune=False))
    assert Search.open(_config(url, "first")).pruning is not None


def test_the_final_re_time_is_bounded_and_marks_the_rest(tmp_path, monkeypatch, one_thread):
    import autoprec.search.retime as S
    from autoprec.cli import _front_table
    from autoprec.results.frames import pareto_front, trials_frame

    monkeypatch.setattr(S, "retime_budget", lambda seconds: 0.0)  # no time: only the fastest is re-timed
    search = Search.open(_config(f"sqlite:///{tmp_path / 'study.db'}", "bounded", strategy="random", prune=False,
                                 max_drop=1.0))
    search.run(8)
    front = pareto_front(trials_frame(search.study))
    retimed, left_out = schema.retimed(search.study), schema.not_retimed(search.study)
    fastest = int(front.trial.iloc[0])
    assert list(retimed) == [str(fastest)] and "lo" in retimed[str(fastest)]
    assert left_out == set(front.trial.astype(int)) - {fastest}
    assert left_out and "not re-timed" in _front_table(front)  # fp32 (best score) and int8 (smallest) at least
    # every measured trial says what its timing cost, which is what the plan budgets with
    measured = [t.user_attrs["measurement"] for t in search.study.trials
                if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert all(m["latency_seconds"] > 0 for m in measured if m["latency_stopped"] != "reference")
    assert [m["latency_seconds"] for m in measured if m["latency_stopped"] == "reference"] == [0.0]  # fp32


def test_a_resume_with_a_small_re_time_budget_keeps_the_earlier_re_timings(tmp_path, monkeypatch, one_thread):
    """A short resume re-times only the fastest member; the others keep the side-by-side ratio an
    earlier pass measured (marked as earlier), instead of turning into "not re-timed"."""
    import autoprec.search.retime as S

    url = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setattr(S, "retime_budget", lambda seconds: 1e9)  # first run: every member
    first = Search.open(_config(url, "resumed", strategy="random", prune=False, max_drop=1.0))
    first.run(6)
    before = schema.retimed(first.study)
    assert len(before) >= 2 and not schema.not_retimed(first.study)
    monkeypatch.setattr(S, "retime_budget", lambda seconds: 0.0)  # the resume: only the fastest
    second = Search.open(_config(url, "resumed", strategy="random", prune=False, max_drop=1.0, seed=1))
    second.run(1)
    after, left_out = schema.retimed(second.study), schema.not_retimed(second.study)
    earlier = {n for n, r in after.items() if r.get("earlier")}
    assert earlier and all(after[n]["ratio"] == before[n]["ratio"] for n in earlier)
    assert not left_out & {int(n) for n in earlier}
