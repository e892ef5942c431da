"""Reading a store that was damaged by hand (an attribute that is not JSON, a string where an object
belongs, a parameter Optuna cannot decode, a trial's policy deleted): the reading commands skip what
cannot be read, with one warning naming it, and show the rest.

Optuna decodes a whole study's trials (and every study's attributes) in one go, so one bad value would
end the command with a traceback; `ReadableStorage` decodes what it must value by value instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Container
from typing import Any

from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import SQLAlchemyError

from autoprec.store.schema import TrialKey

# a trial attribute that must hold an object (JSON dict) when present
_OBJECT_KEYS = (TrialKey.POLICY, TrialKey.COUNTS, TrialKey.MEASUREMENT, TrialKey.PREDICTED, TrialKey.MACHINE,
                TrialKey.OWNER)
_DAMAGED = "\0damaged"  # the stand-in's key for what made Optuna's decoding fail

_STORE_FAILING = (SQLAlchemyError, StorageInternalError)  # the database failed: not a damaged value



class Unreadable:
    """Stands for a stored attribute that is not valid JSON."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unreadable: {self.reason}>"


def _loads(value_json: str) -> Any:
    try:
        return json.loads(value_json)
    except ValueError as exc:
        return Unreadable(f"not valid JSON ({exc.msg})")


def trial_problem(trial: FrozenTrial) -> str | None:
    """Why a trial's autoprec attributes cannot be used (None: they can)."""
    attrs = trial.user_attrs
    for key, value in attrs.items():
        if isinstance(value, Unreadable) and key != _DAMAGED:
            return f"attribute {key!r}: {value.reason}"
    if _DAMAGED in attrs:
        return f"a parameter or value does not decode: {attrs[_DAMAGED].reason}"
    for key in _OBJECT_KEYS:
        if attrs.get(key) is not None and not isinstance(attrs[key], dict):
            return f"attribute {key!r} is a {type(attrs[key]).__name__}, not an object"
    if trial.state == TrialState.COMPLETE and TrialKey.POLICY not in attrs:
        return f"attribute {TrialKey.POLICY!r} is missing"
    return None


def warn(text: str) -> None:
    print(f"autoprec: warning: {text}", file=sys.stderr)


class ReadableStorage(RDBStorage):
    """An RDBStorage for the commands that only read: damaged values are skipped, each with one warning."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned: set[tuple[int, int]] = set()

    def _study_name(self, study_id: int) -> str:
        try:
            return self.get_study_name_from_id(study_id)
        except Exception:  # noqa: BLE001 - only for a warning's text
            return f"#{study_id}"

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        try:
            return super().get_study_user_attrs(study_id)
        except ValueError:  # a value that is not JSON: the others still are
            with self.engine.connect() as conn:
                rows = conn.execute(models.StudyUserAttributeModel.__table__.select().where(
                    models.StudyUserAttributeModel.study_id == study_id)).fetchall()
            return {row.key: _loads(row.value_json) for row in rows}

    def get_all_studies(self) -> list[FrozenStudy]:
        try:
            return super().get_all_studies()
        except ValueError:  # some study's attribute is not JSON: decode them one by one
            studies = []
            for study_id in self._study_ids():
                studies.append(FrozenStudy(study_name=self.get_study_name_from_id(study_id), direction=None,
                                           directions=self.get_study_directions(study_id),
                                           user_attrs=self.get_study_user_attrs(study_id), system_attrs={},
                                           study_id=study_id))
            return studies

    def _study_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            table = models.StudyModel.__table__
            return [row.study_id for row in conn.execute(table.select().order_by(table.c.study_id))]

    def _get_trials(self, study_id: int, states: Container[TrialState] | None, included_trial_ids: set[int],
                    trial_id_greater_than: int) -> list[FrozenTrial]:
        try:
            trials = super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        except _STORE_FAILING:  # the store failing (a statement timeout, a lost connection), not a damaged value
            raise
        except Exception:  # noqa: BLE001 - a value Optuna cannot decode: read the trials one by one
            trials = []
            with self.engine.connect() as conn:
                table = models.TrialModel.__table__
                rows = conn.execute(table.select().where(table.c.study_id == study_id)
                                    .order_by(table.c.trial_id)).fetchall()
            for row in rows:
                if row.trial_id <= trial_id_greater_than and row.trial_id not in included_trial_ids:
                    continue
                try:
                    trial = self.get_trial(row.trial_id)
                except _STORE_FAILING:
                    raise
                except Exception as exc:  # noqa: BLE001
                    self._skip(study_id, row.number, f"{type(exc).__name__}: {exc}".splitlines()[0])
                    continue
                if states is None or trial.state in states:
                    trials.append(trial)
        kept = []
        for trial in trials:
            problem = trial_problem(trial)
            if problem is None:
                kept.append(trial)
            else:
                self._skip(study_id, trial.number, problem)
        return kept

    def get_trial(self, trial_id: int) -> FrozenTrial:
        try:
            return super().get_trial(trial_id)
        except ValueError as exc:  # an attribute that is not JSON, a parameter that does not decode:
            # a stand-in that names what is wrong, skipped by trial_problem()
            trial = self._trial_without_user_attrs(trial_id)
            with self.engine.connect() as conn:
                table = models.TrialUserAttributeModel.__table__
                rows = conn.execute(table.select().where(table.c.trial_id == trial_id)).fetchall()
            trial.user_attrs.update({row.key: _loads(row.value_json) for row in rows})
            trial.user_attrs[_DAMAGED] = Unreadable(f"{type(exc).__name__}: {exc}".splitlines()[0])
            return trial

    def _trial_without_user_attrs(self, trial_id: int) -> FrozenTrial:
        with self.engine.connect() as conn:
            table = models.TrialModel.__table__
            row = conn.execute(table.select().where(table.c.trial_id == trial_id)).one()
        return FrozenTrial(number=row.number, state=TrialState[row.state.name if hasattr(row.state, "name")
                                                                else str(row.state)],
                           value=None, values=None, datetime_start=None, datetime_complete=None, params={},
                           distributions={}, user_attrs={}, system_attrs={}, intermediate_values={},
                           trial_id=trial_id)

    def _skip(self, study_id: int, number: int, problem: str) -> None:
        if (study_id, number) not in self._warned:
            self._warned.add((study_id, number))
            warn(f"study {self._study_name(study_id)!r}: trial {number} is unreadable in the store ({problem}); "
                 "skipped")

