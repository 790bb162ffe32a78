"""Processes sharing a pykeops build folder take turns compiling (:mod:`gpntk.contrib.keops.build_lock`).

pykeops writes a compiled library under its final name without a lock; two pytest-xdist workers
compiling one formula failed in CI with ``ImportError: ... file too short``. The fast tests check
which calls hold the lock (with a stand-in routine, no pykeops needed); the slow one starts six
processes, a second apart, that compile the same formula in one empty build folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpntk.contrib.keops import build_lock

ROOT = Path(__file__).resolve().parents[2]


def _held(folder: Path) -> bool:
    """Whether another open file description holds the lock of ``folder``."""
    with open(folder / build_lock.LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def test_the_first_call_per_signature_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(build_lock, "build_folder", lambda: str(tmp_path))
    observed = []

    def routine(*args, backend):
        observed.append(_held(tmp_path))
        return args[0] * 2

    locked = build_lock.LockedRoutine(routine)
    x = torch.ones(1, 3, 2)
    assert torch.equal(locked(x, x, backend="auto"), 2 * x)
    locked(x + 1, x, backend="auto")  # same signature: compiled already
    locked(x[0], x[0], backend="auto")  # other numbers of dimensions: pykeops may compile again
    locked(x[0], x[0], backend="auto")
    assert observed == [True, False, True, False]
    assert not _held(tmp_path)


def test_a_failing_first_call_releases_the_lock_and_is_retried_locked(tmp_path, monkeypatch):
    monkeypatch.setattr(build_lock, "build_folder", lambda: str(tmp_path))
    observed = []

    def routine(*args, backend):
        observed.append(_held(tmp_path))
        if len(observed) == 1:
            raise RuntimeError("compiler failed")
        return args[0]

    locked = build_lock.LockedRoutine(routine)
    x = torch.ones(1, 3, 2)
    with pytest.raises(RuntimeError, match="compiler failed"):
        locked(x, backend="auto")
    assert not _held(tmp_path)
    locked(x, backend="auto")
    assert observed == [True, True]


def test_a_folder_where_the_lock_file_cannot_be_created_takes_no_lock(tmp_path, monkeypatch):
    """As in a read-only folder of formulas compiled beforehand (a path under a file fails for root too)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(build_lock, "build_folder", lambda: str(blocker / "keops"))
    x = torch.ones(1, 3, 2)
    assert torch.equal(build_lock.LockedRoutine(lambda *a, backend: a[0] + 1)(x, backend="auto"), x + 1)


_COMPILE_AND_COMPARE = """
import json, sys, time
time.sleep(float(sys.argv[1]))  # staggered starts: each finds the folder in another phase of the first compile
import torch
from gpntk import layers as L
from gpntk.contrib.keops import keops_covariance
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels import dense
torch.manual_seed(int(float(sys.argv[1])))
net = L.serial(L.Dense(1.3, 0.2), L.Erf(), L.Dense(1.7, 0.1), L.ReLU(), L.Dense(1.1, 0.3))
x = torch.randn(40, 3, dtype=torch.float64)
v = torch.randn(40, 2, dtype=torch.float64)
hyper = Hyperparameters.collect(net, like=x)
out = keops_covariance(x, x, net=net, output="ntk", hyper=hyper) @ v
_, ntk = dense.evaluate(net, x, x, hyper, track_ntk=True)
print(json.dumps({"error": float(((out - ntk @ v).abs().max() / (ntk @ v).abs().max()).item())}))
"""


@pytest.mark.slow  # compiles one formula (tens of seconds on a CPU)
def test_processes_compiling_one_formula_in_one_folder_all_succeed(tmp_path):
    """Six processes started a second apart: without the lock, 2-3 of them failed with "file too short" in each of
    three runs (2-core machine, pykeops 2.3); with it, none."""
    pytest.importorskip("pykeops")
    env = {**os.environ, "KEOPS_CACHE_FOLDER": str(tmp_path / "keops"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, "-c", _COMPILE_AND_COMPARE, str(delay)], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for delay in range(6)
    ]
    results = [proc.communicate() for proc in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["error"] < 1e-10
    assert list((tmp_path / "keops").rglob(build_lock.LOCK_NAME))  # the lock was taken in that folder
