"""Helpers the test modules share: the test specs, the CLI in a subprocess, short timing settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna

from autoprec.measure.timing import TimingSettings

SPECS = Path(__file__).parent / "specs"
TINY = SPECS / "tiny_mlp.py"
FIXTURES = Path(__file__).parent / "fixtures"
STORE = FIXTURES / "store_main_9952712.db"  # study "tiny_mlp", six complete trials

# A conv and a Linear taking 2 x 3 x 8 x 8 images: the body of a model file written by a test.
TINY_CONV_SPEC = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))

def example_inputs():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
"""

# Few, short timing rounds: the tests check behaviour, not speed.
FAST = TimingSettings(rounds=3, min_round_s=0.005, warmup_calls=1, max_rounds=3)


def autoprec_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`python -m autoprec ARGS` in a subprocess; raises with its stderr when `check` and it fails."""
    proc = subprocess.run([sys.executable, "-m", "autoprec", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoprec {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def load_study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)
