"""``gpntk.settings.gpytorch_defaults``: GPyTorch's own values of every setting importing BoTorch changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gpytorch
import pytest
from linear_operator import settings as linop_settings

import gpntk

ROOT = Path(__file__).resolve().parents[2]


def _current() -> tuple:
    fast = gpytorch.settings.fast_computations
    return (gpytorch.settings.max_cholesky_size.value(), gpytorch.settings.max_eager_kernel_size.value(),
            gpytorch.settings.cholesky_max_tries.value(), fast.covar_root_decomposition.on(), fast.log_prob.on(),
            fast.solves.on())


def test_restores_gpytorchs_defaults_where_botorch_changed_them(monkeypatch):
    # what `import botorch` does to the globals (botorch/__init__.py), without needing BoTorch
    monkeypatch.setattr(linop_settings._fast_covar_root_decomposition, "_default", False)
    monkeypatch.setattr(linop_settings._fast_log_prob, "_default", False)
    monkeypatch.setattr(linop_settings._fast_solves, "_default", False)
    monkeypatch.setattr(linop_settings.cholesky_max_tries, "_global_value", 6)
    monkeypatch.setattr(linop_settings.max_cholesky_size, "_global_value", 4096)
    monkeypatch.setattr(gpytorch.settings.max_eager_kernel_size, "_global_value", 4096)
    changed = _current()
    assert changed == (4096, 4096, 6, False, False, False)
    with gpntk.settings.gpytorch_defaults():
        assert _current() == (800, 512, 3, True, True, True)
        with gpytorch.settings.max_cholesky_size(100):  # settings entered inside still apply
            assert gpytorch.settings.max_cholesky_size.value() == 100
    assert _current() == changed


def test_an_exact_gp_takes_the_cg_path_after_importing_botorch():
    """The marginal likelihood at n = 300 > max_cholesky_size(100) uses CG under gpytorch_defaults, Cholesky without."""
    pytest.importorskip("botorch")
    code = """
import gpytorch, torch, linear_operator
import gpntk
torch.manual_seed(0)
x = torch.rand(300, 3, dtype=torch.float64); y = torch.sin(3 * x[:, 0])
class GP(gpytorch.models.ExactGP):
    def forward(self, z):
        return gpytorch.distributions.MultivariateNormal(torch.zeros_like(z[:, 0]), self.k(z))
model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood()).double(); model.k = gpntk.NTKKernel(gpntk.layers.mlp(2))
mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
import botorch  # noqa: F401  (turns GPyTorch's fast computations off)
calls = []
cg = linear_operator.utils.linear_cg
def counted(*args, **kwargs):
    calls.append(1)
    return cg(*args, **kwargs)
linear_operator.utils.linear_cg = counted
for pinned in (False, True):
    calls.clear()
    with gpytorch.settings.max_cholesky_size(100) if not pinned else gpntk.settings.gpytorch_defaults():
        with gpytorch.settings.max_cholesky_size(100):
            mll(model(x), y).backward()
    print(pinned, len(calls))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(line.split() for line in done.stdout.strip().splitlines()[-2:])
    assert counts["False"] == "0" and int(counts["True"]) >= 1, done.stdout
