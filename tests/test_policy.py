"""The policy file: JSON round trip, every refusal with its own message, fuzzing, apply_policy."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autoprec.errors import AutoprecError, PolicyError
from autoprec.policy import (POLICY_FORMAT, POLICY_VERSION, Policy, TrainingSettings, apply_policy, load_policy,
                             model_fingerprint, policy_from_json)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()


def valid_document(**changes) -> dict:
    doc = {"format": POLICY_FORMAT, "version": POLICY_VERSION, "default": "fp32", "layers": {"0": "int8", "3": "bf16"}}
    doc.update(changes)
    return doc


def write(tmp_path: Path, content, name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# --------------------------------------------------------------------------- round trip


def test_round_trip_with_training_measured_and_model(tmp_path):
    model = small_model()
    policy = Policy(layers={"0": "int8", "3": "fp16"}, default="bf16",
                    training=TrainingSettings(loss_scale=1024.0, dynamic_loss_scale=False, learning_rate=3e-4,
                                              steps=50, optimizer="sgd"),
                    measured={"score": 0.9991, "latency_ms": 312.4, "memory_bytes": 51234567, "device": "cpu",
                              "torch": torch.__version__, "study": "tiny", "trial": 17,
                              "nested": {"a": [1, 2.5, None, True]}},
                    model={"class": "Sequential", "fingerprint": model_fingerprint(model)})
    path = policy.save(tmp_path / "p.json")
    assert path == tmp_path / "p.json"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind
    loaded = load_policy(path)
    assert loaded == policy
    assert loaded.training == policy.training and loaded.measured == policy.measured
    raw = json.loads(path.read_text())
    assert raw["format"] == "autoprec.policy" and raw["version"] == 1
    assert raw["training"] == {"loss_scale": 1024.0, "dynamic_loss_scale": False, "learning_rate": 3e-4,
                               "steps": 50, "optimizer": "sgd"}


def test_round_trip_minimal_has_no_optional_sections(tmp_path):
    policy = Policy()
    path = policy.save(tmp_path / "p.json")
    assert json.loads(path.read_text()) == {"format": "autoprec.policy", "version": 1, "default": "fp32",
                                            "layers": {}}
    assert load_policy(path) == policy


def test_default_is_fp32_when_absent():
    doc = valid_document()
    del doc["default"]
    assert policy_from_json(doc).default == "fp32"


def test_counts():
    policy = Policy(layers={"a": "int8", "b": "int8", "c": "bf16"})
    assert policy.counts() == {"fp32": 0, "fp16": 0, "bf16": 1, "int8": 2, "fp8": 0, "int4": 0, "int8_static": 0}


# --------------------------------------------------------------------------- refusals, each with its own message


BAD_DOCUMENTS = {
    "not_json": ("{'format': 'autoprec.policy',", r"not JSON \(.*\); a policy file is the JSON `autoprec export`"),
    "top_level_list": ([1, 2], r"a policy is a JSON object, not list"),
    "top_level_string": ('"fp32"', r"a policy is a JSON object, not str"),
    "wrong_format": (valid_document(format="onnx.quant"),
                     r"field 'format' is 'onnx\.quant', expected 'autoprec\.policy' \(is this an autoprec"),
    "missing_format": ({k: v for k, v in valid_document().items() if k != "format"}, r"field 'format' is None"),
    "unknown_version": (valid_document(version=2), r"field 'version' is 2; this autoprec reads version 1"),
    "bool_version": (valid_document(version=True), r"field 'version' is True"),
    "float_version": (valid_document(version=1.0), r"field 'version' is 1\.0"),
    "unknown_dtype": (valid_document(layers={"0": "int3"}), r"layer '0' has format 'int3'; use one of fp32, fp16"),
    "unknown_default": (valid_document(default="fp8"), r"field 'default' is 'fp8'; use one of fp32, fp16, bf16"),
    "int8_default": (valid_document(default="int8"), r"field 'default' is 'int8'"),
    "layers_not_object": (valid_document(layers=["0", "3"]), r"field 'layers' must be an object .* not list"),
    "layers_missing": ({k: v for k, v in valid_document().items() if k != "layers"}, r"field 'layers' is missing"),
    "empty_layer_name": (valid_document(layers={"": "bf16"}), r"empty or non-string layer name ''"),
    "unknown_field": (valid_document(layer_formats={}), r"unknown field 'layer_formats'; known fields: calibration, default"),
    "calibration_not_object": (valid_document(calibration=["smooth"]),
                               r"field 'calibration' must be an object of layer name -> recipe \(histogram, minmax"),
    "calibration_unknown_recipe": (valid_document(calibration={"0": "entropy"}),
                                   r"field 'calibration\.0' is 'entropy'; use one of histogram, minmax, smooth"),
    "calibration_unlisted_layer": (valid_document(calibration={"9": "minmax"}),
                                   r"field 'calibration' names layer '9', which 'layers' does not list"),
    "training_not_object": (valid_document(training=[1]), r"field 'training' must be an object, not list"),
    "training_string_number": (valid_document(training={"loss_scale": "1024"}),
                               r"field 'training\.loss_scale' is '1024'; it must be a positive finite number"),
    "training_bool_number": (valid_document(training={"learning_rate": True}),
                             r"field 'training\.learning_rate' is True; it must be a positive finite number"),
    "training_negative": (valid_document(training={"learning_rate": -0.1}),
                          r"field 'training\.learning_rate' is -0\.1"),
    "training_number_for_bool": (valid_document(training={"dynamic_loss_scale": 1}),
                                 r"field 'training\.dynamic_loss_scale' is 1; it must be true or false"),
    "training_float_steps": (valid_document(training={"steps": 2.5}),
                             r"field 'training\.steps' is 2\.5; it must be a positive integer"),
    "training_huge_int": ('{"format": "autoprec.policy", "version": 1, "layers": {}, "training": {"loss_scale": 1'
                          + "0" * 400 + "}}", r"field 'training\.loss_scale' is 10+; it must be a positive finite"),
    "training_unknown_key": (valid_document(training={"momentum": 0.9}), r"unknown field 'training\.momentum'"),
    "measured_not_object": (valid_document(measured=[0.99]), r"field 'measured' must be an object, not list"),
    "model_not_strings": (valid_document(model={"class": 3}), r"field 'model' must be an object of strings"),
    "huge_integer_text": ('{"version": ' + "1" * 5000 + "}", r"not JSON \(Exceeds the limit"),
}


@pytest.mark.parametrize("content,message", list(BAD_DOCUMENTS.values()), ids=list(BAD_DOCUMENTS))
def test_bad_policy_file_names_the_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(PolicyError, match=message) as info:
        load_policy(path)
    text = str(info.value)
    assert text.startswith(str(path) + ": "), text
    assert "\n" not in text


def test_bad_policy_messages_are_all_different(tmp_path):
    messages = set()
    for i, (content, _) in enumerate(BAD_DOCUMENTS.values()):
        with pytest.raises(PolicyError) as info:
            load_policy(write(tmp_path, content, f"p{i}.json"))
        messages.add(str(info.value).split(": ", 1)[1])
    assert len(messages) == len(BAD_DOCUMENTS)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match=r"nope\.json: policy file not found; write one with `autoprec export`"):
        load_policy(tmp_path / "nope.json")


def test_unreadable_file(tmp_path):
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path)  # a folder


def test_layer_missing_from_the_model_at_apply_time(tmp_path):
    path = write(tmp_path, valid_document(layers={"0": "bf16", "encoder.query": "int8"}))
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PolicyError, match=r"layer 'encoder\.query' is not in the model \(Sequential\); use a name "
                                          r"from `autoprec layers MODEL\.py`"):
        apply_policy(model, path)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_unsearchable_layer_at_apply_time(tmp_path):
    path = write(tmp_path, valid_document(layers={"1": "bf16"}))
    with pytest.raises(PolicyError, match=r"layer '1' is a LayerNorm, which takes no per-layer format; list only "
                                          r"Linear"):
        apply_policy(small_model(), path)


def test_int8_conv_at_apply_time_needs_the_calibration_batches(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    path = write(tmp_path, valid_document(layers={"0": "int8"}))
    with pytest.raises(PolicyError, match=r"layer '0' takes static int8.*pass calibration=<batches>"):
        apply_policy(model, path)
    assert isinstance(model[0], nn.Conv2d)  # refused: nothing changed
    apply_policy(model, path, calibration=[torch.randn(2, 3, 6, 6)])
    assert type(model[0]).__name__ == "StaticInt8Conv"


def test_policy_object_validates_itself():
    with pytest.raises(PolicyError, match=r"policy: layer 'x' has format 'int3'"):
        Policy(layers={"x": "int3"})
    with pytest.raises(PolicyError, match=r"policy: field 'default' is 'int8'"):
        Policy(default="int8")


# --------------------------------------------------------------------------- fuzzing

json_leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**308, max_value=10**330)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
               | st.sampled_from(["fp32", "fp16", "bf16", "int8", "autoprec.policy", "", "0", "3"]))
json_values = st.recursive(json_leaves, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)

TRAINING_KEYS = ("loss_scale", "dynamic_loss_scale", "learning_rate", "steps", "optimizer")
# Sections that keep the keys valid, so the values reach the type checks behind them.
valid_keyed_training = st.fixed_dictionaries({}, optional={k: json_leaves for k in TRAINING_KEYS})
mostly_valid_layers = st.dictionaries(st.text(max_size=6), st.sampled_from(["fp32", "fp16", "bf16", "int8"]),
                                      max_size=4)
SECTIONS = {
    "format": st.just("autoprec.policy") | json_leaves,
    "version": st.sampled_from([1, 1.0, 2, 0, True]) | json_leaves,
    "default": st.sampled_from(["fp32", "fp16", "bf16", "int8"]) | json_leaves,
    "layers": mostly_valid_layers | st.dictionaries(st.text(max_size=6), json_leaves, max_size=3) | json_values,
    "training": valid_keyed_training | st.dictionaries(st.sampled_from([*TRAINING_KEYS, "x"]), json_leaves)
    | json_values,
    "measured": st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values,
    "model": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2) | json_values,
}


@st.composite
def mutated_documents(draw):
    """The valid skeleton with each section kept, fuzzed or deleted, plus sometimes an unknown field."""
    doc = valid_document(training={"loss_scale": 8.0, "learning_rate": 1e-3},
                         measured={"score": 0.5}, model={"class": "Sequential"})
    for key, strategy in SECTIONS.items():
        action = draw(st.sampled_from(["keep", "keep", "fuzz", "fuzz", "delete"]))
        if action == "delete":
            doc.pop(key, None)
        elif action == "fuzz":
            doc[key] = draw(strategy)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=8))] = draw(json_values)
    return doc


def _only_autoprec_errors(data) -> None:
    try:
        policy = policy_from_json(data)
    except AutoprecError:
        return
    # Whatever is accepted survives its own serialisation unchanged.
    assert isinstance(policy, Policy)
    assert policy_from_json(json.loads(json.dumps(policy.to_json()))) == policy


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(json_values)
def test_arbitrary_json_raises_only_autoprec_errors(data):
    _only_autoprec_errors(data)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(mutated_documents())
def test_mutated_skeleton_raises_only_autoprec_errors(data):
    _only_autoprec_errors(data)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(SECTIONS["training"], SECTIONS["layers"] | mostly_valid_layers)
def test_fuzzed_sections_in_a_valid_skeleton_raise_only_autoprec_errors(training, layers):
    _only_autoprec_errors(valid_document(training=training))
    _only_autoprec_errors(valid_document(layers=layers))


def test_mutated_skeleton_strategy_reaches_both_outcomes():
    outcomes = set()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(mutated_documents())
    def collect(data):
        try:
            policy_from_json(data)
            outcomes.add("ok")
        except AutoprecError:
            outcomes.add("refused")

    collect()
    assert outcomes == {"ok", "refused"}


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_file_bytes_raise_only_policy_errors(fuzz_dir, content):
    path = fuzz_dir / "p.json"
    path.write_bytes(content)
    try:
        load_policy(path)
    except PolicyError:
        pass


# --------------------------------------------------------------------------- apply_policy


def test_apply_policy_with_a_path(tmp_path):
    model = small_model()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        reference = model(x)
    path = Policy(layers={"0": "int8", "3": "fp32"}, default="bf16").save(tmp_path / "p.json")
    result = apply_policy(model, str(path))
    assert result is model
    assert not model.training
    assert isinstance(model[0], torch.ao.nn.quantized.dynamic.Linear)
    assert model[1].weight.dtype == torch.bfloat16
    assert model[3].weight.dtype == torch.float32
    with torch.inference_mode():
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.05)


def test_apply_policy_object_and_fingerprint_warning():
    model = small_model()
    fingerprint = model_fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_policy(model, Policy(layers={"0": "fp16"}, model={"class": "Sequential", "fingerprint": fingerprint}))
    other = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 5))
    assert model_fingerprint(other) != fingerprint
    with pytest.warns(UserWarning, match="different structure"):
        apply_policy(other, Policy(layers={"0": "fp16"}, model={"class": "Sequential", "fingerprint": fingerprint}))


def test_fingerprint_ignores_values_but_not_shapes():
    a, b = small_model(), small_model()
    with torch.no_grad():
        b[0].weight.mul_(2)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a.to(torch.bfloat16)) != model_fingerprint(b)


@pytest.mark.slow
def test_import_and_apply_policy_load_no_search_stack(tmp_path):
    path = Policy(layers={"0": "int8", "3": "bf16"}).save(tmp_path / "p.json")
    code = f"""
import sys, torch, autoprec
from torch import nn
model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
model = autoprec.apply_policy(model, {str(path)!r})
model(torch.randn(2, 8))
print(",".join(m for m in ("optuna", "sqlalchemy", "pandas", "transformers") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
