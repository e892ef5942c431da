"""model.py contract: every broken spec gives a one-line SpecError naming the file and the callable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from autoprec.measure.machine import configure_cpu
from autoprec.errors import SpecError
from autoprec.measure.evaluator import Evaluator
from autoprec.measure.timing import TimingSettings
from autoprec.model.model_file import call_model, first_float_tensor, load_spec, move_inputs
from helpers import FAST

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = Path(__file__).parent / "specs"

GOOD_MODEL = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
"""
GOOD_INPUTS = """
def example_inputs():
    return torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
"""


def spec_file(tmp_path: Path, source: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def run_stage(path: Path, stage: str):
    """Go as far as `stage` goes: load the file, build the model, make the inputs, or build an Evaluator."""
    spec = load_spec(path)
    if stage == "model":
        return spec.new_model()
    if stage == "example":
        return spec.example()
    if stage == "batches":
        return spec.eval_batches()
    if stage == "evaluator":
        configure_cpu(1, False)
        return Evaluator(spec, "cpu", timing=FAST, measure_peak=False)
    assert stage == "load"
    return spec


# name: (source, stage, callable named in the message (None: the problem is the file), distinctive parts)
BROKEN = {
    "syntax_error": ("import torch\ndef build_model(:\n    pass\n", "load", None, [":2: syntax error"]),
    "import_error": ("import no_such_package_autoprec_test\n" + GOOD_MODEL + GOOD_INPUTS, "load", None,
                     ["importing it raised ModuleNotFoundError", "no_such_package_autoprec_test", "installed?"]),
    "import_raises_multiline": ("raise RuntimeError('first line\\nsecond line')\n", "load", None,
                                ["importing it raised RuntimeError: first line second line"]),
    "import_exits": ("import sys\nsys.exit(3)\n" + GOOD_MODEL + GOOD_INPUTS, "load", None,
                     ["importing it raised SystemExit: 3"]),
    "example_inputs_exits": (GOOD_MODEL + "def example_inputs():\n    raise SystemExit('no data')\n", "example",
                             "example_inputs", ["example_inputs: raised SystemExit: no data"]),
    "build_model_missing": ("import torch\n" + GOOD_INPUTS, "load", "build_model",
                            ["build_model is missing; define build_model() returning a fresh fp32"]),
    "example_inputs_missing": (GOOD_MODEL, "load", "example_inputs",
                               ["example_inputs is missing; define example_inputs() returning one CPU batch"]),
    "build_model_not_callable": ("import torch\nbuild_model = 3\n" + GOOD_INPUTS, "load", "build_model",
                                 ["build_model is a int, not a function"]),
    "evaluate_not_callable": (GOOD_MODEL + GOOD_INPUTS + "evaluate = 0.5\n", "load", "evaluate",
                              ["evaluate is a float, not a function", "must return a finite number"]),
    "build_model_raises": ("import torch\ndef build_model():\n    raise FileNotFoundError('weights.pt\\nis gone')\n"
                           + GOOD_INPUTS, "model", "build_model",
                           ["build_model: raised FileNotFoundError: weights.pt is gone"]),
    "build_model_returns_dict": ("import torch\ndef build_model():\n    return {'weight': torch.zeros(2)}\n"
                                 + GOOD_INPUTS, "model", "build_model",
                                 ["build_model: returned dict, not a torch.nn.Module"]),
    "build_model_returns_class": ("import torch\nfrom torch import nn\ndef build_model():\n    return nn.Linear\n"
                                  + GOOD_INPUTS, "model", "build_model", ["returned type, not a torch.nn.Module"]),
    "build_model_half": (GOOD_MODEL.replace("nn.Linear(8, 2))", "nn.Linear(8, 2)).half()") + GOOD_INPUTS,
                         "model", "build_model", ["returned parameters in ['torch.float16']",
                                                  "return the fp32 model"]),
    "example_inputs_string": (GOOD_MODEL + "def example_inputs():\n    return 'a photo of a cat'\n", "example",
                              "example_inputs", ["example_inputs: returned str, not a tensor"]),
    "example_inputs_int": (GOOD_MODEL + "def example_inputs():\n    return 4\n", "example", "example_inputs",
                           ["example_inputs: returned int, not a tensor"]),
    "example_inputs_empty_tuple": (GOOD_MODEL + "def example_inputs():\n    return ()\n", "example",
                                   "example_inputs", ["example_inputs: returned tuple"]),
    "example_inputs_dict_of_ints": (GOOD_MODEL + "def example_inputs():\n    return {'x': 1}\n", "example",
                                    "example_inputs", ["example_inputs: returned dict"]),
    "example_inputs_raises": (GOOD_MODEL + "def example_inputs():\n    raise KeyError('tokenizer')\n", "example",
                              "example_inputs", ["example_inputs: raised KeyError"]),
    "example_inputs_wrong_shape": (GOOD_MODEL + "def example_inputs():\n    return torch.randn(2, 5)\n",
                                   "evaluator", "example_inputs",
                                   ["example_inputs: the fp32 model fails on them: RuntimeError",
                                    "make example_inputs() match"]),
    "eval_inputs_empty": (GOOD_MODEL + GOOD_INPUTS + "def eval_inputs():\n    return []\n", "batches",
                          "eval_inputs", ["eval_inputs: gave no batches"]),
    "eval_inputs_bad_batch": (GOOD_MODEL + GOOD_INPUTS + "def eval_inputs():\n    return [torch.randn(2, 4), 'x']\n",
                              "batches", "eval_inputs", ["eval_inputs: gave a str batch"]),
    "eval_inputs_other_keys": (GOOD_MODEL + GOOD_INPUTS + "def eval_inputs():\n    return [{'y': torch.randn(2, 4)}]\n",
                               "batches", "eval_inputs", ["eval_inputs: batch 0 is a dict where example_inputs() is a Tensor"]),
    "evaluate_nan": (GOOD_MODEL + GOOD_INPUTS + "def evaluate(model, device):\n    return float('nan')\n",
                     "evaluator", "evaluate", ["evaluate: returned nan for the fp32 model"]),
    "evaluate_string": (GOOD_MODEL + GOOD_INPUTS + "def evaluate(model, device):\n    return '0.93'\n",
                        "evaluator", "evaluate", ["evaluate: returned str, not a number"]),
    "evaluate_raises": (GOOD_MODEL + GOOD_INPUTS + "def evaluate(model, device):\n    raise ValueError('no labels')\n",
                        "evaluator", "evaluate", ["evaluate: raised ValueError: no labels"]),
    "output_returns_string": (GOOD_MODEL + GOOD_INPUTS + "def output(outputs):\n    return 'logits'\n",
                              "evaluator", "output", ["output: returned str, not a floating tensor"]),
    "no_float_output": ("import torch\nfrom torch import nn\nclass M(nn.Module):\n"
                        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(4, 2)\n"
                        "    def forward(self, x):\n        return self.fc(x).argmax(-1)\n"
                        "def build_model():\n    return M()\n" + GOOD_INPUTS, "evaluator", "output",
                        ["model returned Tensor with no floating tensor", "define output(outputs)"]),
}


@pytest.mark.parametrize("source,stage,name,parts", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_spec_gives_one_line_error(tmp_path, source, stage, name, parts):
    path = spec_file(tmp_path, source)
    with pytest.raises(SpecError) as info:
        run_stage(path, stage)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(str(path) + ":"), message
    if name is not None:
        assert message.startswith(f"{path}: {name}"), message
    for part in parts:
        assert part in message, (part, message)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "model.py"
    with pytest.raises(SpecError, match=r"model\.py: file not found; pass the path to a model\.py that defines "
                                        r"build_model\(\) and example_inputs\(\)"):
        load_spec(path)
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path)  # a folder is not a model.py


def test_model_py_imports_its_neighbours_and_sys_path_is_restored(tmp_path):
    (tmp_path / "helpers_autoprec_test.py").write_text("WIDTH = 6\n")
    path = spec_file(tmp_path, GOOD_MODEL.replace("nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)",
                                                  "nn.Linear(4, WIDTH)") + GOOD_INPUTS
                     + "from helpers_autoprec_test import WIDTH\n")
    before = list(sys.path)
    model = load_spec(path).new_model()
    assert sys.path == before
    assert model[0].out_features == 6
    assert not model.training


def test_same_file_name_in_two_folders_are_two_specs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = spec_file(tmp_path / "a", GOOD_MODEL + GOOD_INPUTS)
    b = spec_file(tmp_path / "b", GOOD_MODEL.replace("nn.Linear(8, 2)", "nn.Linear(8, 3)") + GOOD_INPUTS)
    assert load_spec(a).new_model()[2].out_features == 2
    assert load_spec(b).new_model()[2].out_features == 3
    assert load_spec(a).fingerprint() != load_spec(b).fingerprint()


def test_spec_reports_optional_callables():
    spec = load_spec(SPECS / "mlp.py")
    assert spec.evaluate is None and spec.output is None and not spec.can_train
    assert len(spec.eval_batches()) == 3
    spec = load_spec(SPECS / "tuple_inputs.py")
    (batch,) = spec.eval_batches()  # without eval_inputs(), the example batch
    assert all(torch.equal(a, b) for a, b in zip(batch, spec.example()))


@pytest.mark.parametrize("spec_name,kind", [("mlp.py", torch.Tensor), ("tuple_inputs.py", tuple),
                                            ("dict_inputs.py", dict)])
def test_good_specs_call_the_model_the_contract_way(spec_name, kind):
    spec = load_spec(SPECS / spec_name)
    inputs = spec.example()
    assert isinstance(inputs, kind)
    model = spec.new_model()
    with torch.inference_mode():
        out = first_float_tensor(call_model(model, move_inputs(inputs, "cpu")))
    assert out is not None and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_move_inputs_casts_only_floating_tensors():
    inputs = {"ids": torch.arange(3), "x": (torch.zeros(2), [torch.ones(1)]), "n": 3}
    moved = move_inputs(inputs, "cpu", torch.bfloat16)
    assert moved["ids"].dtype == torch.int64
    assert moved["x"][0].dtype == torch.bfloat16 and moved["x"][1][0].dtype == torch.bfloat16
    assert isinstance(moved["x"], tuple) and isinstance(moved["x"][1], list) and moved["n"] == 3


# --------------------------------------------------------------------------- through the CLI


def autoprec_layers(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoprec", "layers", str(path)], capture_output=True, text=True,
                          timeout=120)


CLI_BROKEN = ["syntax_error", "build_model_raises", "build_model_returns_dict"]  # each run costs a torch import


@pytest.mark.slow
@pytest.mark.parametrize("case", CLI_BROKEN)
def test_cli_layers_on_a_broken_spec_exits_2_with_one_line(tmp_path, case):
    source, _, name, parts = BROKEN[case]
    path = spec_file(tmp_path, source, "BAD.py")
    result = autoprec_layers(path)
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"autoprec: error: {path}:"), lines[0]
    if name is not None:
        assert name in lines[0]
    assert parts[0] in lines[0]


@pytest.mark.slow
def test_cli_layers_on_a_missing_file(tmp_path):
    result = autoprec_layers(tmp_path / "BAD.py")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"autoprec: error: {tmp_path / 'BAD.py'}: file not found; pass the path "
                                          "to a model.py that defines build_model() and example_inputs()"]


@pytest.mark.parametrize("spec_name,expected", [
    ("mlp.py", {"0": ("Linear", "32x16", "fp32,fp16,bf16,int8"), "2": ("Linear", "32x32", "fp32,fp16,bf16,int8"),
                "4": ("Linear", "8x32", "fp32,fp16,bf16,int8")}),
    ("tuple_inputs.py", {"conv1": ("Conv1d", "4x3x3", "fp32,fp16,bf16,int8"),
                         "conv2": ("Conv2d", "4x1x3x3", "fp32,fp16,bf16,int8"),
                         "head": ("Linear", "5x96", "fp32,fp16,bf16,int8")}),
    ("dict_inputs.py", {"proj": ("Linear", "16x16", "fp32,fp16,bf16,int8"),
                        "out": ("Linear", "4x16", "fp32,fp16,bf16,int8")}),
])
@pytest.mark.slow
def test_cli_layers_on_good_specs(spec_name, expected):
    result = autoprec_layers(SPECS / spec_name)
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines()[2:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = (cells[1], cells[2], cells[-1])
    assert rows == expected
    assert f"{len(expected)} searchable layers" in result.stdout
