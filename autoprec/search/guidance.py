"""The guided part of a search's trial loop: the sensitivity profile (once per study, claimed by
one worker), then the planner's proposals, one at a time, each planned on every trial so far; the
planner's exclusions applied to the sampler's candidates, and the stop where nothing left can win
(autoprec.guided.verdict)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import optuna

from autoprec.guided import study_state
from autoprec.guided.sensitivity import build_profile
from autoprec.search.study_setup import CLAIM_STALE_S
from autoprec.store import schema

if TYPE_CHECKING:
    from autoprec.guided.verdict import Exclusion, Skip
    from autoprec.policy import Policy
    from autoprec.search.loop import Search

MAX_SKIPS_IN_A_ROW = 25  # sampler proposals skipped one after another before the search stops
MEASURED, SKIPPED, STOP = "measured", "skipped", "stop"  # what became of a trial (Guidance.after_trial)


class Guidance:
    """Profile, then sequential proposals, for one `Search` (strategy "guided")."""

    def __init__(self, search: "Search") -> None:
        self.search = search
        self._exclusion: tuple[tuple[int, ...], "Exclusion"] | None = None  # (finished trials, what they exclude)
        self._skipped = False  # the last trial was a sampler proposal not worth measuring
        self._skips_in_a_row = 0
        self.stopped: dict[str, Any] | None = None  # the verdict this run stopped with

    def ready(self) -> bool:
        """Whether the profile is due: guided strategy, no proposal yet, no uniform trial waiting or running."""
        if self.search.config.strategy != "guided" or schema.PROPOSALS_ATTR in self.search.study.user_attrs:
            return False
        if self.search._trials(optuna.trial.TrialState.WAITING):
            return False
        running = self.search._trials(optuna.trial.TrialState.RUNNING)
        return not any(schema.TrialRecord.of(t).origin.kind == schema.UNIFORM for t in running)

    def start(self) -> int:
        """Profile (once per study), then the first sequential proposal (autoprec.guided.planner)."""
        if not self.search.ledger.claim(self.search.study_name, "profile", stale_s=CLAIM_STALE_S):
            return 0  # another worker is on it; this one keeps sampling meanwhile
        try:
            started = time.perf_counter()
            profile = study_state.stored_profile(self.search.study)
            reused = None if profile is not None else study_state.sibling_profile(self.search.storage, self.search.study_name, self.search.info)
            if reused is not None:
                profile, source = reused
                profile.reference_latency_ms = self.search.evaluator.reference_latency_ms  # its layers in this study's terms
                self.search.study.set_user_attr(schema.PROFILE_ATTR, profile.to_json())
                self.search.study.set_user_attr(schema.PROFILE_SOURCE_ATTR, source)
            if profile is None:
                profile = build_profile(self.search.spec, self.search.evaluator.model, self.search.evaluator.example,
                                        self.search.search_choices, self.search.search_defaults, self.search.device,
                                        runtime=self.search.info.runtime,
                                        # compiled: timing the reference would compile it again after the
                                        # layers' resets; its profile keeps the layers' own times
                                        time_model=self.search.evaluator.reference_solo_ms if self.search.info.runtime == "eager"
                                        else None)
                profile.reference_latency_ms = self.search.evaluator.reference_latency_ms
                self.search.study.set_user_attr(schema.PROFILE_ATTR, profile.to_json())
            self.search.phase_seconds["profile"] = time.perf_counter() - started
            self.search.study.set_user_attr(schema.PROPOSALS_ATTR, [])  # from here on, proposals come one at a time
            count = self.propose()
        except BaseException:
            self.search.ledger.drop_claim(self.search.study_name, "profile")
            raise
        self.search.ledger.finish_claim(self.search.study_name, "profile")
        return count

    def propose(self) -> int:
        """Enqueue the planner's next proposal, planned on every trial so far, when none is waiting: one
        at a time (measure, refit, re-plan). 0 once the planner has nothing left: the sampler goes on."""
        if self.search._trials(optuna.trial.TrialState.WAITING):
            return 0
        profile = study_state.stored_profile(self.search.study)
        if profile is None:
            return 0
        proposal = study_state.next_sequential(self.search.study, profile, self.search.search_choices, self.search.reference_score, self.search.max_drop,
                                         self.search.search_defaults)
        if proposal is None:
            return 0
        planned = list(self.search.study.user_attrs.get(schema.PROPOSALS_ATTR) or [])
        planned.append({"default": proposal.default, "why": proposal.why, "predicted": proposal.predicted})
        self.search.study.set_user_attr(schema.PROPOSALS_ATTR, planned)
        return 1

    def active(self) -> bool:
        return self.search.config.strategy == "guided" and schema.PROPOSALS_ATTR in self.search.study.user_attrs

    def _applies(self) -> bool:
        """The exclusions and the verdict need the profile's drops; a fine-tuned trial's score depends
        on its training knobs too, so they are left to the sampler there."""
        return self.active() and not self.search.trains

    def skip(self, default: str, layers: dict[str, str]) -> "Skip | None":
        """Why the sampler's candidate is not worth measuring (autoprec.guided.verdict), or None."""
        if not self._applies():
            return None
        states = optuna.trial.TrialState
        finished = tuple(sorted(t.number for t in self.search._trials(states.COMPLETE, states.FAIL)))
        if self._exclusion is None or self._exclusion[0] != finished:
            profile = study_state.stored_profile(self.search.study)
            if profile is None:
                return None
            s = self.search
            self._exclusion = (finished, study_state.exclusion(s.study, profile, s.search_choices, s.reference_score,
                                                               s.max_drop, s.search_defaults))
        return self._exclusion[1].why(default, layers)

    def verdict(self) -> dict[str, Any] | None:
        """Once the planner has nothing left: the verdict that nothing unmeasured can beat the front
        by more than the timing's resolution, or None while something still can."""
        if not self._applies() or self.search._trials(optuna.trial.TrialState.WAITING):
            return None
        profile = study_state.stored_profile(self.search.study)
        if profile is None:
            return None
        s = self.search
        return study_state.stop_verdict(s.study, profile, s.search_choices, s.reference_score, s.max_drop,
                                        s.search_defaults, s.config.timing.target_ci - 1.0, s.info.runtime)

    def exhausted(self, skipped: int) -> dict[str, Any] | None:
        """The verdict when the sampler's last `skipped` proposals were all skipped."""
        profile = study_state.stored_profile(self.search.study)
        if profile is None:
            return None
        s = self.search
        return study_state.exhausted_verdict(s.study, profile, s.reference_score, s.max_drop, skipped, s.info.runtime)

    def screen(self, trial: optuna.Trial, policy: "Policy", origin: schema.Origin) -> None:
        """Raise optuna.TrialPruned, the reason recorded on the trial, when the sampler's candidate is
        not worth measuring; the sampler then sees it as infeasible by the drop it is believed to lose.
        Uniform policies and the planner's proposals are measured as they are."""
        if origin.kind != schema.SAMPLER:
            return
        skip = self.skip(policy.default, policy.layers)
        if skip is None:
            return
        self._skipped = True
        over = None if skip.drop is None else skip.drop - self.search.max_drop
        schema.record_skip(trial, skip.kind, skip.text, over)
        raise optuna.TrialPruned(skip.text)

    def before_trial(self) -> bool:
        """Plan the next proposal on everything measured so far, just before it is measured; when the
        planner has nothing left, True (the verdict recorded, the run closed) where nothing unmeasured
        can beat the front."""
        self._skipped = False
        if not self.active():
            return False
        return not self.propose() and self._stop_with(self.verdict())

    def after_trial(self) -> str:
        """MEASURED, SKIPPED (its reservation given back: a skip does not count against --trials) or
        STOP (after MAX_SKIPS_IN_A_ROW skips in a row: the sampler keeps proposing what cannot win)."""
        if not self._skipped:
            self._skips_in_a_row = 0
            if self.stopped is None and schema.verdict_of(self.search.study) is not None:
                self.search.study.set_user_attr(schema.VERDICT_ATTR, None)  # an earlier run's; this one went on
            return MEASURED
        self.search.ledger.release(self.search.run_id)
        self._skips_in_a_row += 1
        if self._skips_in_a_row < MAX_SKIPS_IN_A_ROW:
            return SKIPPED
        if not self._stop_with(self.exhausted(self._skips_in_a_row)):
            self.search.ledger.close_run(self.search.run_id)
        return STOP

    def _stop_with(self, verdict: dict[str, Any] | None) -> bool:
        """Record `verdict` on the study and close the run (its other workers stop after their trial);
        False, and a verdict left by an earlier run cleared, when there is none."""
        study = self.search.study
        if verdict is None:
            if schema.verdict_of(study) is not None:
                study.set_user_attr(schema.VERDICT_ATTR, None)
            return False
        self.stopped = verdict
        study.set_user_attr(schema.VERDICT_ATTR, verdict)
        study.set_user_attr(schema.SKIPPED_ATTR, schema.skipped_counts(study))
        self.search.ledger.close_run(self.search.run_id)
        return True
