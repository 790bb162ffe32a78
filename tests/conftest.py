"""Shared fixtures of the test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests mirror the package in subfolders; the shared helpers (_reference, _models, _ensemble_study)
# and the data stay here, at the top of tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per pytest-xdist worker: with -n 2 on two cores, two threads each oversubscribe the
    # cores and OpenMP's spinning threads slow the fast tier down 2.5x (203 s against 80 s)
    torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """Run a test in float64 (the reference precision) with torch seeded, restoring the default dtype."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(default)
