"""The study's record: origins, study info at the JSON boundary, and stores written by earlier versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from autoprec.store import schema
from autoprec.cli import main
from autoprec.errors import StoreError
from autoprec.store.schema import Origin, StudyInfo

FIXTURES = Path(__file__).parent / "fixtures"
TINY = Path(__file__).parent / "specs" / "tiny_mlp.py"
# Written by main at 9952712 (before autoprec.store.schema): `autoprec search tests/specs/tiny_mlp.py
# --trials 6 --space cpu --max-rounds 3`: 3 uniform trials, profile, proposals, cost model, re-timing.
OLD_STORE = FIXTURES / "store_main_9952712.db"


@pytest.mark.parametrize("text,kind,fmt,phase", [
    ("uniform bf16", "uniform", "bf16", "uniform"),
    ("knapsack fastest, drop <= 0.8 x max_drop", "proposal", None, "knapsack"),
    (None, "sampler", None, "sampler"),
    ("sampler", "sampler", None, "sampler"),
])
def test_origins_read_back_from_their_stored_text(text, kind, fmt, phase):
    origin = Origin.parse(text)
    assert (origin.kind, origin.format, origin.phase) == (kind, fmt, phase)
    assert Origin.parse(origin.text) == origin


def test_study_info_keeps_keys_it_does_not_know_and_defaults_missing_ones():
    old = json.loads((FIXTURES / "study_info_v1.json").read_text())
    old.pop("cpu_freed_memory_kept")  # studies from before 2026-11-26 lack it
    info = StudyInfo.from_json({**old, "runtime": "compiled"})
    assert info.cpu_freed_memory_kept is None and info.threads == 1 and info.reference.latency_ms > 0
    assert info.to_json()["runtime"] == "compiled"
    assert StudyInfo.from_json(info.to_json()) == info
    with pytest.raises(StoreError, match="incomplete"):
        StudyInfo.from_json({k: v for k, v in old.items() if k != "reference"})


def test_a_store_from_the_previous_main_opens_exports_and_resumes(tmp_path, capsys):
    db = tmp_path / "old.db"
    shutil.copy(OLD_STORE, db)
    url = f"sqlite:///{db}"
    assert main(["studies", "--storage", url]) == 0
    assert "tiny_mlp" in capsys.readouterr().out
    assert main(["front", "--storage", url, "--study", "tiny_mlp", "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert {row["origin"] for row in front} >= {"uniform fp32", "uniform int8"}
    assert all(row["retimed_ratio"] for row in front)
    policy = tmp_path / "policy.json"
    assert main(["export", "--storage", url, "--study", "tiny_mlp", "--pick", "fastest", "-o", str(policy)]) == 0
    exported = json.loads(policy.read_text())
    assert exported["model"]["class"] == "Sequential" and exported["measured"]["study"] == "tiny_mlp"
    threads = torch.get_num_threads()
    try:
        assert main(["search", str(TINY), "--storage", url, "--trials", "1", "--space", "cpu", "--max-rounds", "3",
                     "--no-progress", "--no-retime"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "(6 trials so far)" in out and "1 trials run, 7 in the study" in out
    study = optuna.load_study(study_name="tiny_mlp", storage=url)
    newest = max(study.trials, key=lambda t: t.number)
    assert newest.state == optuna.trial.TrialState.COMPLETE
    assert schema.TrialRecord.of(newest).run_id and schema.read_info(study).reference.score == pytest.approx(1.0)
