"""The HTML report and the trials export, on a small real study; the report opened in headless Chromium."""

from __future__ import annotations

import copy
import re
import shutil
import struct
import subprocess
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from autoprec.cli import main
from autoprec.results.html_report import PROFILE_ATTR, _profile_section, build_report
from autoprec.results.frames import pareto_front, trials_frame

SPEC = Path(__file__).parent / "specs" / "report_mlp.py"
STUDY = "report"


@pytest.fixture(scope="module")
def study_url(tmp_path_factory):
    """A 7-trial study of report_mlp: fp16 refused (failed trials); max drop 5e-5 between bf16 (drop about
    1e-5) and int8 (about 2e-4), so all-int8 is infeasible."""
    from autoprec.search.loop import SearchConfig, Search
    from autoprec.measure.timing import TimingSettings

    threads = torch.get_num_threads()
    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'study.db'}"
    options = dict(model=str(SPEC), trials=7, storage=url, study=STUDY, max_drop=5e-5, seed=3, threads=1,
                   progress=False, timing=TimingSettings(rounds=3, min_round_s=0.002, warmup_calls=1, max_rounds=3),
                   # plain TPE and no re-timing: the profile is tested with a profile set by hand below
                   strategy="tpe", retime_front=False)
    fields = SearchConfig.__dataclass_fields__
    try:
        search = Search.open(SearchConfig(**{k: v for k, v in options.items() if k in fields}))
        search.evaluator.measure_peak = False  # the profiler's first start imports for seconds; not tested here
        search.run(7)
    finally:
        torch.set_num_threads(threads)
    return url


@pytest.fixture(scope="module")
def report_file(study_url, tmp_path_factory):
    """`autoprec report` of the study, written once for the tests that read it and open it."""
    target = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", "--storage", study_url, "--study", STUDY, "-o", str(target)]) == 0
    return target


def _load(url, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def _section(document: str, element_id: str) -> str:
    start = document.index(f'id="{element_id}"')
    end = document.find("<h2", start)
    return document[start:end if end >= 0 else None]


@pytest.mark.slow
def test_report_holds_the_plots_the_front_and_the_failures(study_url, report_file):
    document = report_file.read_text(encoding="utf-8")
    study = _load(study_url)
    assert document.startswith("<!DOCTYPE html>") and document.rstrip().endswith("</html>")

    # the plots are inline SVG: the front scatter and the map of the front's policies
    assert _section(document, "front-plot").count("<svg") == 1
    assert _section(document, "policy-map").count("<svg") == 1
    assert "Score against latency" in document and "Score against memory" in document
    for fmt in ("fp32", "bf16", "int8"):
        assert f"all {fmt}" in _section(document, "front-plot"), "uniform policies are marked"
    assert "fp32 reference" in document

    # the front's trial numbers: in the plot labels, the map columns and the front table
    front = pareto_front(trials_frame(study))
    assert not front.empty
    numbers = [int(n) for n in front.trial]
    table = _section(document, "front-table")
    for n in numbers:
        assert f"#{n}" in _section(document, "front-plot")
        assert f"#{n}" in _section(document, "policy-map")
        assert f'data-trial="{n}"' in table
    assert table.count("data-trial=") == len(numbers)
    assert re.findall(r'<tr class="front" data-trial="(\d+)"', document) == [str(n) for n in sorted(numbers)]

    # failures with their reasons, infeasible trials, the environment, and no profile
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, "report_mlp refuses fp16, so the uniform fp16 trial fails"
    for t in failed:
        row = re.search(rf'<tr class="fail" data-trial="{t.number}">.*?</tr>', document)
        assert row and "refuses fp16 weights on purpose" in row.group(0)
    assert re.search(r'<tr class="infeasible"', document), "all-int8 is over max drop 5e-5"
    environment = _section(document, "environment")
    assert torch.__version__ in environment and "cpu" in environment
    assert 'id="no-profile"' in document

    # self-contained: no script, no stylesheet link, nothing fetched from anywhere
    assert "<script" not in document and "<link" not in document
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#|data:)""", document)
    assert not re.search(r"url\((?!#)", document)


@pytest.mark.slow
def test_report_renders_a_sensitivity_profile(study_url):
    storage = optuna.storages.InMemoryStorage()
    optuna.copy_study(from_study_name=STUDY, from_storage=study_url, to_storage=storage, to_study_name="profiled")
    study = _load(storage, "profiled")
    layers = study.user_attrs["autoprec"]["layers"]
    profile = {"layers": {name: {"fp32": {"drop": 0.0, "latency_ms": 0.05},
                                 "bf16": {"drop": 2e-6 * (i + 1), "latency_ms": 0.03},
                                 "int8": {"drop": 3e-4 * 10 ** -i, "latency_ms": 0.02}}
                          for i, name in enumerate(layers)},
               "reference_latency_ms": 0.4}
    profile["layers"][layers[0]]["fp16"] = {"drop": -1e-9, "latency_ms": 0.2}  # negative, one layer only
    study.set_user_attr(PROFILE_ATTR, profile)
    document = build_report(study)
    section = _section(document, "sensitivity")
    assert 'id="profile-plot"' in section and section.count("<svg") == 1
    assert "no-profile" not in document
    for name in layers:
        assert f">{name}<" in section, "each layer labels a row of the heat map"
    assert "drop with only this layer changed" in section and "layer latency" in section

    study.set_user_attr(PROFILE_ATTR, {"layers": "not a mapping"})
    section = _profile_section(study)  # the section alone: the rest of the report is as above
    assert "cannot be read" in section and "<svg" not in section


def test_report_of_a_study_without_complete_trials(study_url):
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("autoprec", copy.deepcopy(_load(study_url).user_attrs["autoprec"]))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={},
                                              user_attrs={"failure_reason": "out of memory"}))
    document = build_report(study)
    assert "No feasible trial yet" in document and "no complete trial yet" in document
    assert "out of memory" in _section(document, "trials")


def test_trials_export_csv_and_parquet(study_url, tmp_path, capsys):
    study = _load(study_url)
    layers = study.user_attrs["autoprec"]["layers"]
    for name in ("trials.csv", "trials.parquet"):
        target = tmp_path / name
        assert main(["trials", "--storage", study_url, "--study", STUDY, "-o", str(target)]) == 0
        frame = pd.read_csv(target) if name.endswith(".csv") else pd.read_parquet(target)
        assert len(frame) == len(study.trials)
        assert [c for c in frame.columns if c.startswith("layer:")] == [f"layer:{n}" for n in layers]
        for t in study.trials:
            row = frame[frame.trial == t.number].iloc[0]
            assert row.state == t.state.name
            for n in layers:
                assert row[f"layer:{n}"] == t.user_attrs["policy"]["layers"][n]
            if t.state == optuna.trial.TrialState.COMPLETE:
                assert row.score == pytest.approx(t.values[0]) and row.latency_ms == pytest.approx(t.values[1])
            else:
                assert "refuses fp16" in row.reason
    capsys.readouterr()
    assert main(["trials", "--storage", study_url, "--study", STUDY, "-o", str(tmp_path / "trials.xlsx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'.xlsx'" in err and ".csv or .parquet" in err
    assert not (tmp_path / "trials.xlsx").exists()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium package (apt-get install chromium; .ci/run installs it)")
def test_report_opens_in_headless_chromium(report_file, tmp_path):
    report = report_file
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in (proc.stdout + proc.stderr).splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not console, "the page logged to the console:\n" + "\n".join(console)
    assert shot.exists() and _png_size(shot) == (1200, 2000)
    assert shot.stat().st_size > 50_000, "a screenshot of the plots and tables is not a near-empty image"
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"
