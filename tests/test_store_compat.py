"""A store written by autoprec 0.1.0, before its modules moved into subpackages, still opens, lists,
exports and resumes: the store format is the contract, not the code's layout."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import FIXTURES, TINY, autoprec_cli, load_study

pytestmark = pytest.mark.slow


@pytest.fixture()
def old_store(tmp_path):
    path = tmp_path / "autoprec.db"
    shutil.copy(FIXTURES / "tiny_mlp_store_0.1.0.db", path)
    return f"sqlite:///{path}"


def test_a_0_1_0_store_lists_its_study_front_and_exports(old_store, tmp_path):
    studies = autoprec_cli("studies", "--storage", old_store).stdout
    assert "tiny_mlp" in studies
    front = autoprec_cli("front", "--study", "tiny_mlp", "--storage", old_store).stdout
    assert "uniform fp32" in front
    out = tmp_path / "policy.json"
    autoprec_cli("export", "--study", "tiny_mlp", "--pick", "fastest", "-o", str(out), "--storage", old_store)
    policy = json.loads(out.read_text())
    assert policy["format"] == "autoprec.policy" and policy["measured"]["study"] == "tiny_mlp"


def test_a_0_1_0_store_resumes(old_store):
    before = len(load_study(old_store, "tiny_mlp").trials)
    autoprec_cli("search", str(TINY), "--trials", "2", "--study", "tiny_mlp", "--storage", old_store, "--no-progress")
    assert len(load_study(old_store, "tiny_mlp").trials) == before + 2
