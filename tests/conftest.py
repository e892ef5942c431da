"""Shared fixtures. Nothing here is autouse: modules opt in."""

from __future__ import annotations

import os

import pytest
import torch

# Searches started by the tests (subprocesses included) time on one thread: on a busy 2-core
# machine two OpenMP threads wait on each other and tiny forwards slow down a hundredfold.
os.environ.setdefault("AUTOPREC_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's forwards on one intra-op thread, restoring the count afterwards.

    On a shared, oversubscribed 2-core machine two OpenMP threads wait on each other at every
    parallel region: a tiny MLP's forward took 80 ms with two threads and 0.1 ms with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
