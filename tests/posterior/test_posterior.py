"""The trained-ensemble posterior: reference values, closed-form limits, invariants and errors."""

from __future__ import annotations

import math
import warnings

import gpytorch
import pytest
import torch
from _reference import build_net, load_case

import gpntk
from gpntk import layers as L
from gpntk.posterior import TrainedEnsemble

POSTERIOR_CASES = ["post_relu_d2", "post_erf_d3_multi"]


pytestmark = pytest.mark.usefixtures("float64_default")


def _times(spec) -> list[float]:
    return [math.inf if t == "inf" else float(t) for t in spec["times"]]


def _relative(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    scale = b.abs().max().item() if scale is None else scale
    return ((a - b).abs().max() / scale).item()


# --- the Neural Tangents reference ------------------------------------------------------------


@pytest.mark.parametrize("regime", ["ntk", "nngp"])
@pytest.mark.parametrize("name", POSTERIOR_CASES)
def test_matches_reference(name, regime):
    case = load_case(name)
    net = build_net(case.layers)
    x_train, y_train, x_test = (torch.tensor(case[k]) for k in ("x_train", "y_train", "x_test"))
    targets = y_train if y_train.shape[1] > 1 else y_train[:, 0]
    post = TrainedEnsemble(net, x_train, targets, case.spec["learning_rate"], case.spec["diag_reg"])
    # covariances that vanish (training inputs at long times) are compared to the prior's scale
    prior_scale = gpntk.NNGPKernel(net)(x_train).to_dense().detach().diagonal().max().item()
    for i, t in enumerate(_times(case.spec)):
        for points, key in ((x_test, ""), (x_train, "train")):
            mean, cov = post.moments(points, t, regime)
            mean = mean if mean.dim() == 2 else mean.unsqueeze(-1)
            ref_mean = torch.tensor(case[f"{regime}_{key}mean_{i}"])
            ref_cov = torch.tensor(case[f"{regime}_{key}cov_{i}"])
            if t == 0:
                assert mean.abs().max() == 0 and ref_mean.abs().max() == 0
            else:
                assert _relative(mean, ref_mean) <= 1e-8, (t, key)
            assert _relative(cov, ref_cov, max(ref_cov.abs().max().item(), prior_scale)) <= 1e-8, (t, key)


@pytest.mark.parametrize("name", POSTERIOR_CASES)
def test_tensor_of_times_equals_one_time_at_a_time(name):
    case = load_case(name)
    net = build_net(case.layers)
    x_train, y_train, x_test = (torch.tensor(case[k]) for k in ("x_train", "y_train", "x_test"))
    post = TrainedEnsemble(net, x_train, y_train, case.spec["learning_rate"], case.spec["diag_reg"])
    times = torch.tensor(_times(case.spec))
    for regime in ("ntk", "nngp", "ntkgp"):
        means, covs = post.moments(x_test, times, regime)
        assert means.shape == (len(times), len(x_test), y_train.shape[1])
        assert covs.shape == (len(times), len(x_test), len(x_test))
        for i, t in enumerate(times.tolist()):
            mean, cov = post.moments(x_test, t, regime)
            torch.testing.assert_close(means[i], mean, rtol=0, atol=0)
            torch.testing.assert_close(covs[i], cov, rtol=0, atol=0)


# --- limits and invariants ----------------------------------------------------------------


def _problem(n=12, d=4, k=None, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, generator=g) if k is None else torch.randn(n, k, generator=g)
    return x, y, torch.randn(m, d, generator=g)


@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_variance_vanishes_at_training_inputs_as_t_goes_to_infinity(regime, activation):
    x, y, _ = _problem()
    net = L.mlp(2, activation, 2.0, 0.1)
    post = TrainedEnsemble(net, x, y)
    prior = gpntk.NNGPKernel(net)(x, diag=True) if regime != "ntkgp" else gpntk.NTKKernel(net)(x, diag=True)
    mean, cov = post.moments(x, math.inf, regime)
    assert (cov.diagonal() / prior.detach()).abs().max() <= 1e-8
    torch.testing.assert_close(mean, y, rtol=1e-9, atol=1e-9)  # interpolation
    early_mean, early_cov = post.moments(x, 1.0, regime)
    assert (early_cov.diagonal() / prior.detach()).min() > 1e-3


def test_time_zero_is_the_prior():
    x, y, xt = _problem()
    net = L.mlp(2, "relu", 2.0, 0.1)
    post = TrainedEnsemble(net, x, y)
    nngp = gpntk.NNGPKernel(net)(xt).to_dense().detach()
    ntk = gpntk.NTKKernel(net)(xt).to_dense().detach()
    for regime, prior in (("ntk", nngp), ("nngp", nngp), ("ntkgp", ntk)):
        mean, cov = post.moments(xt, 0.0, regime)
        assert mean.abs().max() == 0
        torch.testing.assert_close(cov, prior, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
def test_covariances_are_symmetric_and_psd(regime):
    x, y, xt = _problem(n=20, m=15)
    post = TrainedEnsemble(L.mlp(3, "relu", 2.0, 0.1), x, y)
    points = torch.cat([xt, x])
    covs = post.moments(points, torch.tensor([0.0, 0.5, 10.0, 1e4, math.inf]), regime)[1]
    assert torch.equal(covs, covs.mT)
    eigenvalues = torch.linalg.eigvalsh(covs)
    scale = covs.diagonal(dim1=-2, dim2=-1).max()
    assert eigenvalues.min() >= -1e-10 * scale


def test_ntk_mean_is_kernel_regression_at_infinity_and_gradient_flow_in_between():
    x, y, xt = _problem()
    net = L.mlp(2, "gelu", 1.5, 0.2)
    lr = 0.7
    post = TrainedEnsemble(net, x, y, learning_rate=lr)
    theta = gpntk.NTKKernel(net)
    theta_xx = theta(x).to_dense().detach()
    theta_tx = theta(xt, x).to_dense().detach()
    mean_inf, _ = post.moments(xt, math.inf, "ntk")
    torch.testing.assert_close(mean_inf, theta_tx @ torch.linalg.solve(theta_xx, y), rtol=1e-9, atol=1e-9)
    # finite t: the matrix exponential of the gradient-flow ODE, tau = lr * t / (n k)
    t = 3.0
    tau = lr * t / len(x)
    decay = torch.eye(len(x)) - torch.linalg.matrix_exp(-tau * theta_xx)
    expected = theta_tx @ torch.linalg.solve(theta_xx, decay @ y)
    torch.testing.assert_close(post.moments(xt, t, "ntk")[0], expected, rtol=1e-10, atol=1e-10)


def test_ntkgp_at_infinity_is_the_exact_gp_posterior_with_ntk_prior():
    """diag_reg plays the observation noise: compare with GPyTorch's exact GP posterior (latent f)."""
    x, y, xt = _problem(n=15)
    net = L.mlp(2, "relu", 2.0, 0.1)
    noise = 0.05
    post = TrainedEnsemble(net, x, y, diag_reg=noise)
    mean, cov = post.moments(xt, math.inf, "ntkgp")

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            super().__init__(x, y, likelihood)
            self.covar = gpntk.NTKKernel(net)

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(torch.zeros(len(z)), self.covar(z))

    model = GP().double()
    model.likelihood.noise = noise
    model.eval()
    with torch.no_grad(), gpytorch.settings.fast_computations(False, False, False):
        latent = model(xt)
    torch.testing.assert_close(mean, latent.mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(cov, latent.covariance_matrix, rtol=1e-7, atol=1e-8)


def test_distribution_types_and_shapes():
    x, y1, xt = _problem()
    _, y3, _ = _problem(k=3)
    net = L.mlp(1, "erf")
    single = TrainedEnsemble(net, x, y1)
    dist = single(xt, 2.0)
    assert isinstance(dist, gpytorch.distributions.MultivariateNormal)
    assert dist.mean.shape == (5,) and dist.covariance_matrix.shape == (5, 5)
    batched = single(xt, torch.tensor([1.0, math.inf]))
    assert batched.mean.shape == (2, 5) and batched.batch_shape == (2,)

    multi = TrainedEnsemble(net, x, y3)
    dist = multi(xt, 2.0, "nngp")
    assert isinstance(dist, gpytorch.distributions.MultitaskMultivariateNormal)
    assert dist.mean.shape == (5, 3)
    mean, cov = multi.moments(xt, 2.0, "nngp")
    torch.testing.assert_close(dist.mean, mean)
    torch.testing.assert_close(dist.covariance_matrix, torch.kron(cov, torch.eye(3)))
    batched = multi(xt, torch.tensor([0.5, 1.0, 2.0]))
    assert batched.mean.shape == (3, 5, 3)
    torch.testing.assert_close(
        batched.variance[2], dist.variance * 0 + multi.moments(xt, 2.0)[1].diagonal()[:, None].expand(5, 3)
    )


def test_multi_output_uses_the_same_covariance_for_every_output():
    x, y3, xt = _problem(k=3)
    net = L.mlp(2, "relu")
    multi = TrainedEnsemble(net, x, y3, learning_rate=0.5)
    for j in range(3):
        # each output column trained alone, with time rescaled: tau = lr t / (n k)
        single = TrainedEnsemble(net, x, y3[:, j], learning_rate=0.5 / 3)
        mean_multi, cov_multi = multi.moments(xt, 4.0)
        mean_single, cov_single = single.moments(xt, 4.0)
        torch.testing.assert_close(mean_multi[:, j], mean_single, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov_multi, cov_single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
@pytest.mark.parametrize("diag_reg", [0.0, 0.01])
def test_train_loss_agrees_with_the_moments_at_the_training_inputs(regime, diag_reg):
    x, y, _ = _problem(n=10, k=2)
    post = TrainedEnsemble(L.mlp(2, "erf", 2.0, 0.1), x, y, learning_rate=0.8, diag_reg=diag_reg)
    times = torch.tensor([0.0, 0.3, 3.0, 30.0, math.inf])
    losses = post.train_loss(times, regime)
    mean_losses = post.train_loss(times, regime, include_variance=False)
    n, k = y.shape
    for i, t in enumerate(times.tolist()):
        mean, cov = post.moments(x, t, regime)
        expected_mean = (mean - y).square().sum() / (2 * n * k)
        torch.testing.assert_close(mean_losses[i], expected_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(losses[i], expected_mean + cov.diagonal().sum() / (2 * n), rtol=1e-9, atol=1e-12)
    assert torch.all(mean_losses[1:] <= mean_losses[:-1] + 1e-15)
    if diag_reg == 0:
        assert losses[-1] <= 1e-10


def test_max_learning_rate_is_the_stability_edge_of_gradient_descent():
    x, y, _ = _problem(n=10)
    net = L.mlp(2, "relu", 2.0, 0.1)
    post = TrainedEnsemble(net, x, y)
    eta_max = post.max_learning_rate()
    theta = gpntk.NTKKernel(net)(x).to_dense().detach()
    torch.testing.assert_close(torch.tensor(eta_max), 2 * len(x) / torch.linalg.eigvalsh(theta)[-1])

    def residual_after(eta, steps=400):
        r = y.clone()
        step = torch.eye(len(x)) - eta * theta / len(x)
        for _ in range(steps):
            r = step @ r
        return r.norm()

    assert residual_after(0.95 * eta_max) < y.norm()
    assert residual_after(1.05 * eta_max) > 1e3 * y.norm()


def test_samples_have_the_posterior_moments():
    x, y, xt = _problem(n=8, m=4)
    post = TrainedEnsemble(L.mlp(2, "relu"), x, y)
    mean, cov = post.moments(xt, 5.0)
    draws = post.sample(xt, 5.0, 40000, generator=torch.Generator().manual_seed(1))
    assert draws.shape == (40000, 4)
    std_err = (cov.diagonal() / 40000).sqrt()
    assert ((draws.mean(0) - mean).abs() <= 5 * std_err).all()
    torch.testing.assert_close(torch.cov(draws.T), cov, rtol=0.05, atol=0.05 * cov.diagonal().max().item())
    # at the training inputs at t = inf the covariance is singular: sampling still works
    train_draws = post.sample(x, math.inf, 10)
    torch.testing.assert_close(train_draws, y.expand(10, -1), rtol=1e-6, atol=1e-6)
    multi = TrainedEnsemble(L.mlp(1, "erf"), x, torch.randn(8, 2))
    assert multi.sample(xt, torch.tensor([1.0, 2.0]), 3).shape == (3, 2, 4, 2)


def test_ill_conditioned_training_kernel_warns_instead_of_returning_nan():
    x, y, xt = _problem(n=6)
    x = torch.cat([x, x[:2]])  # duplicated inputs with different targets: a singular kernel
    y = torch.cat([y, y[:2] + 1.0])
    post = TrainedEnsemble(L.mlp(2, "relu"), x, y)
    with pytest.warns(RuntimeWarning, match="numerically singular"):
        mean, cov = post.moments(xt, math.inf)
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, cov = post.moments(xt, 1e6)  # finite times need no pseudo-inverse
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all()


def test_test_kernels_are_cached_and_follow_new_inputs():
    x, y, xt = _problem()
    post = TrainedEnsemble(L.mlp(2, "relu"), x, y)
    first = post.moments(xt, 1.0)[0]
    again = post.moments(xt.clone(), 1.0)[0]
    other = post.moments(xt + 1.0, 1.0)[0]
    torch.testing.assert_close(first, again)
    assert (first - other).abs().max() > 1e-3


# --- errors -----------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x, y, xt = _problem()
    net = L.mlp(1, "relu")
    post = TrainedEnsemble(net, x, y)
    with pytest.raises(ValueError, match="t must be >= 0"):
        post.moments(xt, -1.0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        post.moments(xt, torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="t must be >= 0"):
        post.moments(xt, float("nan"))
    with pytest.raises(ValueError, match="1-D tensor of times"):
        post.moments(xt, torch.ones(2, 2))
    with pytest.raises(TypeError, match="t must be a number"):
        post.moments(xt, "soon")
    with pytest.raises(ValueError, match="unknown regime 'bayes'"):
        post(xt, 1.0, regime="bayes")
    with pytest.raises(ValueError, match="test_x has 3 features but train_x has 4"):
        post.moments(xt[:, :3], 1.0)
    bad = xt.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="test_x contains 1 NaN"):
        post.moments(bad, 1.0)
    with pytest.raises(ValueError, match="train_y contains 1 NaN"):
        TrainedEnsemble(net, x, torch.where(torch.arange(12) == 3, float("nan"), y))
    with pytest.raises(ValueError, match="train_x has 12 points but train_y has 11 targets"):
        TrainedEnsemble(net, x, y[:11])
    with pytest.raises(ValueError, match=r"train_y must have shape \(n,\) or \(n, k\)"):
        TrainedEnsemble(net, x, y.reshape(12, 1, 1))
    with pytest.raises(ValueError, match=r"train_x must have shape \(n, d\)"):
        TrainedEnsemble(net, x[0, 0], y)
    with pytest.raises(ValueError, match="train_x has 4 points but train_y has 12 targets"):
        TrainedEnsemble(net, x[0], y)  # a 1-D tensor: 4 one-feature points, as for GPyTorch kernels
    with pytest.raises(ValueError, match="test_x has 1 features but train_x has 4"):
        post.moments(xt[0], 1.0)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        TrainedEnsemble(net, x, y, learning_rate=0.0)
    with pytest.raises(ValueError, match="diag_reg must be non-negative"):
        TrainedEnsemble(net, x, y, diag_reg=-1e-3)
    with pytest.raises(TypeError, match="architecture built from gpntk.layers"):
        TrainedEnsemble(torch.nn.Linear(4, 1), x, y)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        post.sample(xt, 1.0, 0)


def test_one_dimensional_inputs_are_one_feature_points_as_in_gpytorch():
    """``(n,)`` train and test inputs are ``n`` one-feature points, ``(n, 1)``, as GPyTorch kernels read them."""
    g = torch.Generator().manual_seed(3)
    x, y, xt = (torch.randn(n, generator=g, dtype=torch.float64) for n in (10, 10, 4))
    net = L.mlp(2, "relu", 2.0, 0.1)
    flat = TrainedEnsemble(net, x, y, diag_reg=1e-3)
    column = TrainedEnsemble(net, x[:, None], y, diag_reg=1e-3)
    assert flat.train_x.shape == (10, 1)
    times = torch.tensor([0.0, 3.0, math.inf], dtype=torch.float64)
    for regime in ("ntk", "nngp", "ntkgp"):
        expected = column.moments(xt[:, None], times, regime)
        for post, test in ((flat, xt), (flat, xt[:, None]), (column, xt)):
            mean, cov = post.moments(test, times, regime)
            torch.testing.assert_close(mean, expected[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cov, expected[1], rtol=1e-12, atol=1e-12)
    # against GPyTorch's own reading of 1-D inputs (Kernel.__call__): at t = inf, ntkgp is kernel ridge regression
    kernel = gpntk.NTKKernel(net).double()
    gram = kernel(x).to_dense() + 1e-3 * torch.eye(10, dtype=torch.float64)
    ridge = kernel(xt, x).to_dense() @ torch.linalg.solve(gram, y)
    torch.testing.assert_close(flat.mean(xt, math.inf, "ntkgp"), ridge, rtol=1e-8, atol=1e-10)
    assert flat(xt, 1.0).mean.shape == (4,) and flat.sample(xt, 1.0, 3).shape == (3, 4)


def test_complex_targets_and_malformed_numbers_raise_and_numpy_numbers_are_accepted():
    import numpy as np

    x, y, xt = _problem()
    net = L.mlp(1, "erf")
    with pytest.raises(TypeError, match="train_y must be real"):
        TrainedEnsemble(net, x, y.to(torch.complex128))
    with pytest.raises(TypeError, match="train_y must be real"):
        TrainedEnsemble(net, x, torch.complex(y, torch.zeros_like(y)))
    with pytest.raises(ValueError, match="train_y contains 1 NaN or infinite"):
        TrainedEnsemble(net, x, torch.where(torch.arange(12) == 0, math.inf, y))
    for learning_rate in ("0.1", True, None, 1 + 1j):
        with pytest.raises(TypeError, match="learning_rate must be a real number"):
            TrainedEnsemble(net, x, y, learning_rate=learning_rate)
    for learning_rate in (0.0, -1.0, math.nan, math.inf, np.float64(-2.0)):
        with pytest.raises(ValueError, match="learning_rate must be positive and finite"):
            TrainedEnsemble(net, x, y, learning_rate=learning_rate)
    post = TrainedEnsemble(net, x, y, learning_rate=0.5, diag_reg=0.01)
    mean, var = post.moments(xt, torch.tensor([0.0, 3.0, math.inf]), diag=True)
    # NumPy numbers and arrays wherever Python numbers and tensors are accepted
    same = TrainedEnsemble(
        net,
        x,
        y,
        learning_rate=np.float32(0.5),
        diag_reg=np.float64(0.01),
        tolerance=np.float32(1e-8),
        max_iterations=np.int64(1000),
    )
    np_mean, np_var = same.moments(xt, np.array([0.0, 3.0, math.inf]), diag=True)
    torch.testing.assert_close(np_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(np_var, var, rtol=0, atol=0)
    torch.testing.assert_close(same.moments(xt, np.float64(3.0), diag=True)[0], mean[1], rtol=0, atol=0)
    torch.testing.assert_close(same.moments(xt, np.int64(3), diag=True)[0], mean[1], rtol=0, atol=0)
    torch.testing.assert_close(same.moments(xt, np.array(3), diag=True)[0], mean[1], rtol=0, atol=0)
    assert same.sample(xt, 3.0, np.int64(4)).shape == (4, len(xt))
    with pytest.raises(ValueError, match="t must be >= 0"):
        post.moments(xt, np.array([1.0, -1.0]))
    for bad in (np.array([1.0 + 0j]), torch.tensor([1.0 + 0j]), True, torch.tensor([True]), 2 + 0j):
        with pytest.raises(TypeError, match="t must"):
            post.moments(xt, bad)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        post.sample(xt, 1.0, 2.0)


@pytest.mark.parametrize("regime", ["ntk", "nngp", "ntkgp"])
@pytest.mark.parametrize("multi", [False, True])
def test_mean_only_and_diagonal_variances_match_the_full_moments(regime, multi):
    g = torch.Generator().manual_seed(21)
    net = L.mlp(2, "erf", 1.5, 0.1)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = (
        torch.randn(9, 2, generator=g, dtype=torch.float64)
        if multi
        else torch.randn(9, generator=g, dtype=torch.float64)
    )
    post = gpntk.TrainedEnsemble(net, x, y, learning_rate=0.5, diag_reg=1e-3)
    test_x = torch.cat([torch.randn(5, 3, generator=g, dtype=torch.float64), x[:2]])
    times = torch.tensor([0.0, 3.0, 50.0, math.inf], dtype=torch.float64)
    mean, cov = post.moments(test_x, times, regime)
    torch.testing.assert_close(post.mean(test_x, times, regime), mean, rtol=1e-12, atol=1e-12)
    diag_mean, variances = post.moments(test_x, times, regime, diag=True)
    torch.testing.assert_close(diag_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variances, cov.diagonal(dim1=-2, dim2=-1), rtol=1e-9, atol=1e-11)
    assert variances.shape == (4, 7)


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
def test_with_diag_reg_equals_a_new_ensemble_and_reuses_the_eigendecomposition(solver, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    test_x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    net = L.mlp(2, "relu", 2.0, 0.1)
    times = torch.tensor([0.0, 5.0, 500.0, math.inf], dtype=torch.float64)
    base = TrainedEnsemble(net, x, y, learning_rate=0.7, diag_reg=1e-3, solver=solver)
    if solver == "lanczos":
        times = times[1:3]
    for regime in ("ntk", "nngp", "ntkgp"):
        base.moments(test_x, times, regime)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    ridges, regimes = ((0.0, 0.05, 2.0), ("ntk", "nngp", "ntkgp")) if solver == "eigh" else ((0.05,), ("ntk",))
    for ridge in ridges:
        shifted = base.with_diag_reg(ridge)
        assert shifted.diag_reg == ridge and base.diag_reg == 1e-3
        fresh = TrainedEnsemble(net, x, y, learning_rate=0.7, diag_reg=ridge, solver=solver)
        for regime in regimes:
            tol = dict(rtol=1e-9, atol=1e-9) if solver == "eigh" else dict(rtol=1e-5, atol=1e-6)
            for ours, theirs in zip(shifted.moments(test_x, times, regime), fresh.moments(test_x, times, regime)):
                torch.testing.assert_close(ours, theirs, **tol)
            torch.testing.assert_close(shifted.train_loss(times, regime), fresh.train_loss(times, regime), **tol)
            assert shifted.max_learning_rate(regime) == pytest.approx(fresh.max_learning_rate(regime), rel=1e-6)
    if solver == "eigh":  # only the fresh ensembles decomposed their kernels (2 dynamics kernels each)
        assert len(calls) == 3 * 2
    # the original is untouched
    torch.testing.assert_close(
        base.mean(test_x, 5.0),
        TrainedEnsemble(net, x, y, 0.7, 1e-3, solver=solver).mean(test_x, 5.0),
        rtol=1e-9,
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="diag_reg must be non-negative"):
        base.with_diag_reg(-1.0)
    with pytest.raises(TypeError, match="diag_reg must be a number"):
        base.with_diag_reg("0.1")
