"""Faults of the input: a store damaged by hand, calibration batches given as a one-shot generator or
not as batches at all, --no-prune on a resume, and a space whose formats this device cannot run. One
regression test (or a few) per fault, each failing without its fix."""

from __future__ import annotations

import copy
import sqlite3
import textwrap

import pytest
import torch
from torch import nn

import autoprec
from autoprec.cli import main
from autoprec.errors import PolicyError, StoreError
from autoprec.measure import format_probe as P
from autoprec.model.model_file import load_spec
from autoprec.policy import Policy
from autoprec.search.loop import Search, SearchConfig
from helpers import FAST, TINY, TINY_CONV_SPEC

STUDY = "tiny_mlp"


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("autoprec: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("autoprec: error: "), err
    return lines[0]


def _damage(path, statement: str) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute(statement).rowcount >= 1


# a store damaged by hand: the damaged trial skipped with one warning, the rest shown -----------------

TRIAL_DAMAGE = {
    "attribute_not_json": "UPDATE trial_user_attributes SET value_json = '{bad' "
                          "WHERE trial_id = 2 AND key = 'measurement'",
    "string_for_object": "UPDATE trial_user_attributes SET value_json = '\"oops\"' "
                         "WHERE trial_id = 2 AND key = 'measurement'",
    "param_nan": "UPDATE trial_params SET param_value = 'nan' WHERE trial_id = 2 AND param_name = 'layer:0'",
    "policy_deleted": "DELETE FROM trial_user_attributes WHERE trial_id = 2 AND key = 'policy'",
}
READING = {
    "front": ["front", "--study", STUDY],
    "trials": ["trials", "--study", STUDY, "-o", "trials.csv"],
    "export": ["export", "--study", STUDY, "--pick", "fastest", "-o", "policy.json"],
    "report": ["report", "--study", STUDY, "-o", "report.html"],
    "studies": ["studies"],
}


def _skipped_with_one_warning(capsys, commands: list[str]) -> None:
    for command in commands:
        args = READING[command]
        assert main(args) == 0, command
        err = capsys.readouterr().err
        warnings = [line for line in err.splitlines() if line.startswith("autoprec: warning: ")]
        assert len(warnings) == 1 and f"study {STUDY!r}: trial 1 is unreadable" in warnings[0], (command, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("damage", list(TRIAL_DAMAGE.values()), ids=list(TRIAL_DAMAGE))
def test_a_damaged_trial_is_skipped_with_one_warning_naming_it(store, capsys, damage):
    _damage(store, damage)
    _skipped_with_one_warning(capsys, ["front", "studies"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(TRIAL_DAMAGE.values()), ids=list(TRIAL_DAMAGE))
def test_every_reading_command_skips_a_damaged_trial(store, capsys, damage):
    _damage(store, damage)
    _skipped_with_one_warning(capsys, list(READING))


@pytest.mark.slow
def test_profile_of_a_study_with_a_damaged_trial_reads_the_rest(store, capsys):
    _damage(store, TRIAL_DAMAGE["param_nan"])
    assert main(["profile", "--study", STUDY]) == 0
    assert "trial 1 is unreadable" in capsys.readouterr().err


def test_a_study_whose_own_attribute_is_damaged_is_one_line_and_the_store_is_at_fault(store, capsys):
    _damage(store, "UPDATE study_user_attributes SET value_json = '{bad' WHERE key = 'autoprec'")
    for args in (READING["front"], READING["export"], READING["studies"]):
        assert main(args) == 1  # nothing usable is left: the store, not the user, is at fault
        assert "unreadable" in _one_line_error(capsys.readouterr().err) or args == ["studies"]


def test_studies_lists_every_readable_study_beside_a_damaged_one(store, capsys):
    with sqlite3.connect(store) as conn:  # a second study: the first one's rows again under a new id
        conn.execute("INSERT INTO studies (study_id, study_name) VALUES (2, 'broken')")
        conn.execute("INSERT INTO study_directions (direction, study_id, objective) "
                     "SELECT direction, 2, objective FROM study_directions WHERE study_id = 1")
        conn.execute("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (2, 'autoprec', '{bad')")
    assert main(["studies"]) == 0
    out, err = capsys.readouterr()
    assert STUDY in out and "broken" not in out
    assert "'broken'" in err and "not listed" in err


# calibration_inputs() / eval_inputs() returning one shared generator -------------------------------

SHARED_GENERATOR = TINY_CONV_SPEC + """
_calibration = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
_evaluation = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9 + i)) for i in range(2))

def calibration_inputs():
    return _calibration

def eval_inputs():
    return _evaluation
"""


def test_batches_from_a_shared_generator_are_read_once_and_kept(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent(SHARED_GENERATOR))
    spec = load_spec(path)
    for _ in range(3):  # the first check, the profile, a resume: the same batches each time
        assert len(spec.calibration_batches()) == 3 and len(spec.eval_batches()) == 2
    first, again = spec.calibration_batches(), spec.calibration_batches()
    assert all(a is b for a, b in zip(first, again))


# --no-prune on a resume ----------------------------------------------------------------------------


@pytest.mark.slow
def test_no_prune_on_the_resume_of_a_pruned_study_is_refused(tmp_path, monkeypatch, one_thread):
    def slow_bf16(formats, device, runtime="eager"):
        return P.FormatProbe(P.machine(device), {f: {"linear": 9.0 if f == "bf16" else 0.5} for f in formats})

    monkeypatch.setattr(P, "run_probe", slow_bf16)
    config = dict(model=str(TINY), trials=1, storage=f"sqlite:///{tmp_path / 'study.db'}", study="pruned",
                  timing=FAST, progress=False, space="cpu")
    assert Search.open(SearchConfig(**config)).pruning is not None
    with pytest.raises(StoreError, match=r"drop --no-prune .* --study NEW_NAME --no-prune") as info:
        Search.open(SearchConfig(**config, prune=False))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


# apply_policy's calibration batches ----------------------------------------------------------------


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


STATIC_INT8 = Policy({"0": "int8"}, default="fp32")
BAD_BATCHES = {
    "wrong_shape": ([torch.randn(2, 1, 8, 8)], "the fp32 model fails on the batches"),
    "shapes_disagree": ([_images(), torch.randn(2, 3)], "batch 1 has shape (2, 3) where batch 0 has"),
    "integer_images": ([torch.zeros(2, 3, 8, 8, dtype=torch.long)], "the fp32 model fails on the batches"),
    "nan": ([torch.full((2, 3, 8, 8), float("nan"))], "batch 0 has NaN or infinite values"),
    "string": ("images", "got a str, not an iterable of batches"),
    "strings": (["images"], "batch 0 is a str, not a tensor"),
    "all_zero": ([torch.zeros(2, 3, 8, 8)] * 2, "every batch is all zeros"),
    "absurd": ([_images() * 1e30], "over 1e+20 in magnitude"),
    "empty": ([], "gave no batches"),
}


@pytest.mark.parametrize("batches,expected", list(BAD_BATCHES.values()), ids=list(BAD_BATCHES))
def test_apply_policy_refuses_bad_calibration_in_one_line(batches, expected):
    model = _conv()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PolicyError) as info:
        autoprec.apply_policy(model, STATIC_INT8, calibration=batches)
    message = str(info.value)
    assert message.startswith("calibration: ") and expected in message and "\n" not in message, message
    assert "calibration=" in message  # what to pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing converted


def test_apply_policy_takes_a_bare_tensor_as_one_batch():
    x = _images(4, 1)
    one = autoprec.apply_policy(_conv(), STATIC_INT8, calibration=x)
    listed = autoprec.apply_policy(_conv(), STATIC_INT8, calibration=[x])
    with torch.inference_mode():
        assert torch.equal(one(x), listed(x))


# a space whose formats this device cannot run ------------------------------------------------------


def test_formats_the_device_cannot_run_are_named_and_a_space_left_with_fp32_alone_is_refused(tmp_path, capsys,
                                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOPREC_STORAGE", raising=False)
    some = tmp_path / "some.yaml"
    some.write_text("name: some\ndtypes: [fp32, bf16, fp8]\n")
    assert main(["layers", str(TINY), "--space", str(some), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp8 dropped: fp8 needs a CUDA GPU of compute capability 8.9" in err
    only = tmp_path / "only.yaml"
    only.write_text("name: only\ndtypes: [fp32, fp8]\n")
    store = tmp_path / "autoprec.db"
    assert main(["search", str(TINY), "--space", str(only), "--device", "cpu", "--trials", "2",
                 "--storage", f"sqlite:///{store}", "--no-progress"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "fp8 dropped" in line and "nothing but fp32 is left" in line and str(only) in line
    assert not store.exists()  # nothing written


# a resume whose space kept its name but not its formats ------------------------------------------


def test_a_space_changed_under_its_name_is_refused_naming_the_formats_then_and_now(store):
    import dataclasses

    import optuna
    import torch

    from autoprec.search.space import load_space
    from autoprec.search.study_setup import check_resume
    from autoprec.store import schema

    info = schema.read_info(optuna.load_study(study_name=STUDY, storage=f"sqlite:///{store}"))
    space = load_space(info.space.get("name"))
    narrowed = dataclasses.replace(space, dtypes=tuple(d for d in space.dtypes if d != "fp16"))
    with pytest.raises(StoreError) as err:
        check_resume(info, info.model_fingerprint, narrowed, torch.device("cpu"), None, STUDY,
                     bool(info.cpu_freed_memory_kept))
    message = str(err.value)
    assert f"another version of search space {space.name!r}" in message
    assert f"formats then: {', '.join(info.space['dtypes'])}; now: {', '.join(narrowed.dtypes)}" in message
    assert "--study NEW_NAME" in message
