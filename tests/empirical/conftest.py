"""Fixtures of the empirical (finite-width) tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many small products (Monte Carlo over finite networks): one thread is as fast on a free machine
    and far faster on a busy one (OpenMP threads waiting on each other made test_monte_carlo.py ~8x
    slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
