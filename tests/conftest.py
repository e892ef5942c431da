"""Shared fixtures. Nothing here is autouse: modules opt in."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from helpers import STORE

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


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A copy of a small store (study "tiny_mlp", six complete trials) as ./autoprec.db, the default
    store of a command run in tmp_path."""
    path = tmp_path / "autoprec.db"
    shutil.copy(STORE, path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUTOPREC_STORAGE", raising=False)
    return path
