"""A TrainedEnsemble is a snapshot taken at construction: nothing done later to the network or data changes it.

References are closed forms with kernels of a copy of the network taken before any change:
ridgeless kernel regression :math:`\\Theta(x, X)\\Theta^{-1} Y` at :math:`t = \\infty` and the
matrix exponential of gradient flow at finite :math:`t`.
"""

from __future__ import annotations

import copy
import math

import gpytorch
import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.posterior import TrainedEnsemble

pytestmark = pytest.mark.usefixtures("float64_default")


def _problem(n=10, d=3, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, generator=g), torch.randn(m, d, generator=g)


def _closed_form(net, x, y, test_x, t, learning_rate=1.0):
    """The "ntk" regime's mean (NTK gradient flow) and the "ntkgp" variances (NTK prior), dense float64."""
    theta = gpntk.NTKKernel(net)
    theta_xx = theta(x).to_dense().detach()
    theta_tx = theta(test_x, x).to_dense().detach()
    theta_tt = theta(test_x, diag=True).detach()
    if math.isinf(t):
        fitted = torch.eye(len(x))
        fitted_twice = fitted
    else:
        tau = learning_rate * t / len(x)
        fitted = torch.eye(len(x)) - torch.linalg.matrix_exp(-tau * theta_xx)
        fitted_twice = torch.eye(len(x)) - torch.linalg.matrix_exp(-2 * tau * theta_xx)
    mean = theta_tx @ torch.linalg.solve(theta_xx, fitted @ y)
    variances = theta_tt - (theta_tx * torch.linalg.solve(theta_xx, fitted_twice @ theta_tx.mT).mT).sum(-1)
    return mean, variances


def _fit_gp_on(net, x, y, steps=5):
    """A few marginal-likelihood steps of an ExactGP whose kernel shares ``net`` (changes its hyperparameters)."""

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.covar = gpntk.NTKKernel(net)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(torch.zeros(len(z)), self.covar(z))

    model = GP().double()
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        (-mll(model(x), y)).backward()
        optimizer.step()


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
def test_fitting_a_gp_on_the_same_network_does_not_change_the_ensemble(solver):
    x, y, test_x = _problem()
    net = L.mlp(2, "relu", 2.0, 0.1)
    original = copy.deepcopy(net)
    post = TrainedEnsemble(net, x, y, solver=solver)
    first = post.moments(test_x, math.inf, "ntk", diag=True)  # caches the training spectrum (eigh)
    _fit_gp_on(net, x, y)
    assert abs(net.layers[0].weight_variance.item() - 2.0) > 0.5  # the shared network did change
    for points in (test_x + 0.5, x):  # new test inputs: new kernels, evaluated after the change
        for t in (3.0, math.inf):
            mean, _ = post.moments(points, t, "ntk", diag=True)
            _, variances = post.moments(points, t, "ntkgp", diag=True)
            ref_mean, ref_variances = _closed_form(original, x, y, points, t)
            torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(variances, ref_variances, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(post.mean(x, math.inf, "ntk"), y, rtol=1e-6, atol=1e-6)  # still interpolates
    again = post.moments(test_x, math.inf, "ntk", diag=True)
    torch.testing.assert_close(again, first, rtol=1e-9, atol=1e-9)


def test_changing_hyperparameters_before_the_first_call_does_not_change_the_ensemble():
    """Nothing is read lazily: not the kernels, not the Lanczos solver's products."""
    x, y, test_x = _problem()
    for solver in ("eigh", "lanczos"):
        net = L.mlp(2, "erf", 2.0, 0.1)
        original = copy.deepcopy(net)
        post = TrainedEnsemble(net, x, y, solver=solver)
        with torch.no_grad():
            net.layers[0].weight_variance = 9.0
            net.layers[0].bias_variance = 3.0
        mean = post.mean(test_x, 5.0, "ntk")
        torch.testing.assert_close(mean, _closed_form(original, x, y, test_x, 5.0)[0], rtol=1e-7, atol=1e-7)


def test_in_place_changes_to_the_data_do_not_change_the_ensemble():
    x, y, test_x = _problem()
    net = L.mlp(2, "erf")
    post = TrainedEnsemble(net, x, y)
    expected = _closed_form(net, x.clone(), y.clone(), test_x, 2.0)[0]
    x.mul_(3.0)
    y.add_(1.0)
    torch.testing.assert_close(post.mean(test_x, 2.0), expected, rtol=1e-9, atol=1e-9)


def test_net_is_a_read_only_copy_of_the_snapshot():
    x, y, test_x = _problem()
    net = L.mlp(2, "erf", 2.0, 0.1)
    post = TrainedEnsemble(net, x, y)
    before = post.mean(test_x, 2.0)
    copy_of_net = post.net
    assert copy_of_net is not net and copy_of_net is not post.net
    with torch.no_grad():
        copy_of_net.layers[0].weight_variance = 7.0
        net.layers[0].weight_variance = 7.0
    assert post.net.layers[0].weight_variance.item() == pytest.approx(2.0)
    assert all(value.item() == pytest.approx(v) for value, v in zip(post.hyperparameters.values(), (2.0, 0.1)))
    expected = _closed_form(L.mlp(2, "erf", 2.0, 0.1), x, y, test_x + 1.0, 2.0)[0]
    torch.testing.assert_close(post.mean(test_x + 1.0, 2.0), expected)
    torch.testing.assert_close(post.mean(test_x, 2.0), before, rtol=0, atol=0)
    with pytest.raises(AttributeError):
        post.net = net  # no setter: rebuild the ensemble instead


def test_batched_hyperparameters_are_refused():
    x, y, _ = _problem()
    net = L.mlp(1, "erf")
    net.layers[0].expand_hyperparameters(torch.Size([2]))  # one set of hyperparameters per batch element
    with pytest.raises(ValueError, match="batch of hyperparameters"):
        TrainedEnsemble(net, x, y)
