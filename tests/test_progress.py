"""Progress bars (``gpntk._progress``, ``settings.progress``): on a terminal only, silenceable, no-ops without tqdm.

A fake terminal (a text stream whose ``isatty`` is true) stands in for stderr; the bars' delay is
set to 0 so that the tiny computations of these tests draw them. Every computation is run with and
without bars and must give bit-identical results.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import gpytorch  # noqa: F401  # imported before any fake terminal: pykeops' import notice goes to stderr
import numpy as np
import pytest
import torch

import gpntk
from gpntk import _progress
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.blockwise import kernel_matmul
from gpntk.kernels.dense import evaluate


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal; ``with terminal:`` makes it sys.stderr."""

    def isatty(self) -> bool:
        return True

    def __enter__(self) -> "FakeTerminal":
        self._previous, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc: object) -> None:  # restore stderr, keep the text
        sys.stderr = self._previous


@pytest.fixture
def terminal(monkeypatch):
    """A fake terminal, and bars that show at once; the test's body does ``with terminal:`` to draw on it.

    (Not set in the fixture: pytest's output capture sets sys.stderr again between a fixture's
    setup and the test.)
    """
    pytest.importorskip("tqdm")  # bars need the optional extra gpntk[progress]; without it: see below
    monkeypatch.setattr(gpntk.settings, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(gpntk.settings.progress, "_mode", True)  # whatever GPNTK_PROGRESS says
    return FakeTerminal()


def _data(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _kernel_products(x):
    """A blockwise product and a blockwise kernel matrix, in blocks of 40 pairs (many blocks)."""
    net = L.mlp(2, "relu", 2.0, 0.1)
    hyper = Hyperparameters.collect(net, like=x)
    product = kernel_matmul(net, x, x, hyper, x[:, :2], kinds=("nngp", "ntk"), block_elements=40)
    matrix = evaluate(net, x, x, hyper, track_ntk=True, block_elements=40)
    return (*product, *matrix)


def test_bars_are_drawn_on_a_terminal_and_change_nothing(terminal):
    with terminal:
        x, _ = _data()
        with gpntk.settings.progress(False):
            quiet = _kernel_products(x)
        assert terminal.getvalue() == ""
        shown = _kernel_products(x)
        drawn = terminal.getvalue()
        assert "kernel product" in drawn and "kernel matrix" in drawn and "block" in drawn
        for a, b in zip(shown, quiet):
            assert torch.equal(a, b)


def test_no_bar_without_a_terminal(monkeypatch):
    stream = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(gpntk.settings, "PROGRESS_DELAY", 0.0)
    x, _ = _data()
    _kernel_products(x)
    assert not _progress.bars_shown()
    assert stream.getvalue() == ""


def test_no_bar_when_switched_off_or_without_tqdm(terminal, monkeypatch):
    with terminal:
        x, _ = _data()
        assert _progress.bars_shown()
        gpntk.settings.progress.set(False)  # for the rest of the process (the fixture restores it)
        _kernel_products(x)
        assert not _progress.bars_shown()
        gpntk.settings.progress.set(True)
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError: not installed
        _kernel_products(x)
        assert not _progress.bars_shown()
        assert terminal.getvalue() == ""
        with pytest.raises(ValueError, match="progress mode must be True or False, got 'yes'"):
            gpntk.settings.progress("yes")


def test_environment_variable_switches_bars_off():
    """``GPNTK_PROGRESS=0``: the setting starts off (checked in a fresh process)."""
    code = "import gpntk.settings as s, sys; print(s.progress.on()); print('torch' in sys.modules)"
    for value, expected in (("0", "False"), ("1", "True")):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "GPNTK_PROGRESS": value})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [expected, "False"]  # and the settings import no torch


def test_short_work_and_one_step_draw_nothing(terminal, monkeypatch):
    with terminal:
        assert list(_progress.track([7], "one")) == [7]  # a single step shows no progress
        assert terminal.getvalue() == ""
        monkeypatch.setattr(gpntk.settings, "PROGRESS_DELAY", 60.0)  # work shorter than the delay
        assert list(_progress.track(range(5), "short")) == list(range(5))
        assert terminal.getvalue() == ""


def test_posterior_solvers_draw_bars_and_agree(terminal):
    with terminal:
        x, y = _data(n=30)
        xt = x[:5] + 0.1
        net = L.mlp(2, "erf", 2.0, 0.1)
        results = {}
        for shown in (False, True):
            with gpntk.settings.progress(shown):
                for solver in ("eigh", "lanczos"):
                    post = gpntk.TrainedEnsemble(net, x, y, diag_reg=1e-2, solver=solver)
                    results[shown, solver] = post.moments(xt, torch.tensor([1.0, math.inf]))
            if not shown:
                assert terminal.getvalue() == ""
        drawn = terminal.getvalue()
        assert "posterior (ntk)" in drawn and "Lanczos" in drawn
        for solver in ("eigh", "lanczos"):
            for a, b in zip(results[True, solver], results[False, solver]):
                assert torch.equal(a, b)


def test_kernel_gradients_draw_bars_and_agree(terminal):
    """The blockwise backward (recomputed blocks) and the matrix-free operator's bilinear derivative."""
    with terminal:
        x, y = _data(n=16)
        net = L.mlp(1, "relu", 2.0, 0.1)

        def gradients():
            kernel = gpntk.NTKKernel(net, block_elements=40).double()
            out = []
            for backend in ("dense", "blockwise"):
                kernel.zero_grad()
                with gpntk.settings.kernel_backend(backend), gpntk.settings.recompute_backward(True):
                    k = kernel(x)
                    value = (k @ y).dot(y) if backend == "blockwise" else k.to_dense().sum()
                    value.backward()
                out += [p.grad.clone() for p in kernel.parameters()]
            return out

        with gpntk.settings.progress(False):
            quiet = gradients()
        shown = gradients()
        assert "kernel gradient" in terminal.getvalue()
        for a, b in zip(shown, quiet):
            assert torch.equal(a, b)


def test_graph_gram_draws_a_bar_by_default(terminal):
    with terminal:
        rng = np.random.default_rng(0)
        graphs = []
        for n in (3, 5, 8, 4, 6):
            a = (rng.random((n, n)) < 0.5).astype(float)
            graphs.append((rng.standard_normal((n, 2)), np.triu(a, 1) + np.triu(a, 1).T))
        net = L.gntk(2, 1)
        with gpntk.settings.progress(False):
            quiet = gpntk.graph_kernel_matrices(net, graphs, pairs_per_call=3)
        assert terminal.getvalue() == ""
        shown = gpntk.graph_kernel_matrices(net, graphs, pairs_per_call=3)
        assert "graph kernel" in terminal.getvalue() and "pair" in terminal.getvalue()
        for a, b in zip(shown, quiet):
            assert torch.equal(a, b)


def test_cli_fit_draws_a_bar(terminal, tmp_path):
    with terminal:
        from gpntk.cli.csv_fit import fit_csv

        x, y = _data(n=12, d=2)
        path = tmp_path / "train.csv"
        path.write_text("a,b,y\n" + "".join(f"{u!r},{v!r},{w!r}\n" for (u, v), w in zip(x.tolist(), y.tolist())))
        with gpntk.settings.progress(False):
            quiet = fit_csv(str(path), output=str(tmp_path / "quiet.csv"), print_fn=lambda s: None)
        assert terminal.getvalue() == ""
        shown = fit_csv(str(path), output=str(tmp_path / "shown.csv"), print_fn=lambda s: None)
        assert "gpntk fit" in terminal.getvalue()
        assert np.array_equal(shown["mean"], quiet["mean"]) and np.array_equal(shown["std"], quiet["std"])
        assert (tmp_path / "quiet.csv").read_text() == (tmp_path / "shown.csv").read_text()
