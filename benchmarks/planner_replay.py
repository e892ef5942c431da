"""Replay stored guided studies through this code's planner: the same proposals, given the same measurements?

    python benchmarks/planner_replay.py /tmp/autoprec-search-quality/*_guided.db

For each study with a profile in each SQLite store (benchmarks/search_quality.py writes one per file), every sequential
proposal the study measured is planned again by `autoprec.guided.planner.next_proposal` from the trials measured
before it (the stored profile, the formats each layer took in the uniform trials, the study's max drop),
and compared with what the study measured. A planner change that leaves every proposal the same leaves the
study's result the same, without timing anything: the check that a change to the planner keeps the
verdicts it was not meant to move. Where a proposal differs, the new plan's reason is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import optuna  # noqa: E402

from autoprec.guided import study_state

from autoprec.store import schema
from autoprec.guided.planner import next_proposal  # noqa: E402
from autoprec.precision import DTYPES  # noqa: E402

FORMATS = DTYPES


def replay(db: Path, name: str) -> tuple[float, int, list[tuple[int, str]]]:
    """(max drop, proposals planned the same, [(trial number, the new plan's reason) for those that differ])."""
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    profile = study_state.stored_profile(study)
    info = schema.read_info(study)
    trials = study_state.planner_trials(study)
    seen: dict[str, set[str]] = {}
    for t in trials:
        if t.uniform:
            for name, fmt in t.layers.items():
                seen.setdefault(name, set()).add(fmt)
    # what the uniform trials gave each layer, less what the study's probe pruned (not in its profile)
    choices = {name: tuple(f for f in FORMATS if f in fmts and f in profile.layers.get(name, {})) for name, fmts in seen.items()}
    defaults = tuple(sorted({t.default for t in trials if t.uniform}, key=lambda d: d != "fp32"))
    same, differ = 0, []
    for k, t in enumerate(trials):
        if not t.proposed:
            continue
        plan = next_proposal(profile, choices, trials[:k], info.reference.score, info.max_drop, defaults)
        if plan is not None and plan.default == t.default and dict(plan.layers) == dict(t.layers):
            same += 1
        else:
            differ.append((k, "nothing" if plan is None else plan.why))
    return info.max_drop, same, differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", type=Path, help="SQLite files of guided studies")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("| store | study | max drop | proposals planned the same | differ (trial: new plan) |")
    print("| --- | --- | --- | --- | --- |")
    for db in args.stores:
        for summary in optuna.get_all_study_summaries(f"sqlite:///{db}"):
            study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}")
            if not schema.is_autoprec_study(study) or study_state.stored_profile(study) is None:
                continue
            max_drop, same, differ = replay(db, summary.study_name)
            shown = "; ".join(f"#{k}: {why[:60]}" for k, why in differ) or "-"
            print(f"| {db} | {summary.study_name} | {max_drop:g} | {same} | {len(differ)} {shown} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
