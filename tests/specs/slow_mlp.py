"""The tiny MLP with a slow evaluate() that logs each call: lets a test kill a search mid-trial.

When the file named by SLOW_MLP_HOLD appears, the first evaluate() to see it takes it (renames it to
`<file>.<pid>`) and never returns, so a test can kill that worker while its trial is surely running.
"""

import os
import time

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))


def example_inputs():
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(1))


def evaluate(model, device):
    with open(os.environ["SLOW_MLP_LOG"], "a") as log:
        log.write("call\n")
    hold = os.environ.get("SLOW_MLP_HOLD")
    if hold:
        try:
            os.rename(hold, f"{hold}.{os.getpid()}")
        except FileNotFoundError:
            pass
        else:
            while True:
                time.sleep(1)
    time.sleep(float(os.environ.get("SLOW_MLP_SLEEP", "1.0")))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.inference_mode():
        y = model(x).float()
    return float(-(y - y.round(decimals=1)).abs().mean())
