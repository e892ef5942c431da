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


def test_a_cpu_space_study_from_before_int8_static_resumes_over_its_own_formats(tmp_path):
    """The shipped cpu space gained int8_static; a study created with the space as it was (same name and
    fields, dtypes fp32 / bf16 / int8) resumes under `--space cpu` over its own formats, and says so."""
    old_cpu = tmp_path / "cpu.yaml"
    old_cpu.write_text("name: cpu\ndtypes: [fp32, bf16, int8]\ndefault_dtypes: [fp32, bf16]\n")
    url = f"sqlite:///{tmp_path / 'autoprec.db'}"
    quick = ("--max-rounds", "3", "--threads", "1", "--no-progress", "--storage", url, "--study", "old_cpu")
    autoprec_cli("search", str(TINY), "--space", str(old_cpu), "--trials", "2", *quick)
    before = len(load_study(url, "old_cpu").trials)
    resumed = autoprec_cli("search", str(TINY), "--space", "cpu", "--trials", "1", *quick)
    assert "searches the formats it was created with (fp32, bf16, int8)" in resumed.stderr
    assert "int8_static" in resumed.stderr
    trials = load_study(url, "old_cpu").trials
    assert len(trials) == before + 1
    assert not any(v == "int8_static" for t in trials for v in t.params.values())
