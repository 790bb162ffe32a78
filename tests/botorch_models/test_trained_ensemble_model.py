"""gpntk.botorch: the trained ensemble as a BoTorch model, input centring, the hyperparameter fit.

References are independent of the model's code: the GP posterior written densely from the kernel
matrices (at t = inf, regimes nngp/ntkgp), GPyTorch's own ExactGP prediction, TrainedEnsemble
called per batch, transforms applied by hand, BoTorch's own transforms and acquisition functions.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("botorch")  # an optional extra: gpntk[botorch]

from botorch.acquisition import (  # noqa: E402
    LogExpectedImprovement,
    UpperConfidenceBound,
    qLogNoisyExpectedImprovement,
)
from botorch.acquisition.objective import ScalarizedPosteriorTransform  # noqa: E402
from botorch.exceptions.errors import UnsupportedError  # noqa: E402
from botorch.models.transforms.input import ChainedInputTransform, Normalize  # noqa: E402
from botorch.models.transforms.outcome import Standardize  # noqa: E402
from botorch.optim import optimize_acqf  # noqa: E402
from botorch.sampling import SobolQMCNormalSampler  # noqa: E402
from gpytorch.kernels import RBFKernel  # noqa: E402
from gpytorch.likelihoods import GaussianLikelihood  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402
from gpntk.botorch import Center, TrainedEnsembleModel, fit_network  # noqa: E402
from gpntk.kernels import Centered  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_default")

D = 3


def net():
    return L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1)


def data(n=10, m=1, seed=1234):
    g = torch.Generator().manual_seed(seed)
    X = 2 * torch.rand(n, D, generator=g) - 1
    cols = [torch.sin(3 * X[:, 0] + j) + X[:, 1] * X[:, 2] for j in range(m)]
    return X, torch.stack(cols, -1)


def dense_kernel(kind, a, b):
    kernel = (gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel)(net())
    return kernel(a, b).to_dense().detach()


def gp_posterior(kind, X, Y, Xs, noise):
    """The GP posterior with prior covariance `kind`, written densely: mean (q, m), cov (q, q)."""
    K = dense_kernel(kind, X, X) + noise * torch.eye(X.shape[0])
    Ks = dense_kernel(kind, Xs, X)
    Kss = dense_kernel(kind, Xs, Xs)
    solve = torch.linalg.solve(K, torch.cat([Y, Ks.mT], -1))
    return Ks @ solve[:, : Y.shape[1]], Kss - Ks @ solve[:, Y.shape[1]:]


# --- the posterior -------------------------------------------------------------------------------------
@pytest.mark.parametrize("regime,kind", [("ntkgp", "ntk"), ("nngp", "nngp")])
@pytest.mark.parametrize("diag_reg", [0.0, 0.05])
def test_infinite_time_is_the_exact_gp_posterior(regime, kind, diag_reg):
    X, Y = data(m=2)
    Xs = 2 * torch.rand(4, 3, D) - 1
    model = TrainedEnsembleModel(X, Y, net(), t=math.inf, regime=regime, diag_reg=diag_reg)
    post = model.posterior(Xs)
    assert post.mean.shape == (4, 3, 2)
    for b in range(4):
        mean, cov = gp_posterior(kind, X, Y, Xs[b], diag_reg)
        torch.testing.assert_close(post.mean[b], mean, rtol=1e-6, atol=1e-7)
        full = post.distribution.covariance_matrix[b]  # (q*m, q*m), outputs independent
        for j in range(2):
            block = full.reshape(3, 2, 3, 2)[:, j, :, j]  # interleaved (point, output)
            torch.testing.assert_close(block, cov, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(full.reshape(3, 2, 3, 2)[:, 0, :, 1], torch.zeros(3, 3))


@pytest.mark.parametrize("t", [math.inf, 7.0])
@pytest.mark.parametrize("q", [1, 3])
def test_batched_posterior_matches_the_ensemble_per_batch(t, q):
    X, Y = data(m=1)
    Xs = 2 * torch.rand(2, 5, q, D) - 1
    model = TrainedEnsembleModel(X, Y, net(), t=t, regime="ntk", learning_rate=0.5, chunk_points=4)
    post = model.posterior(Xs)
    assert post.mean.shape == (2, 5, q, 1) and post.variance.shape == (2, 5, q, 1)
    reference = gpntk.TrainedEnsemble(net(), X, Y[:, 0], learning_rate=0.5)
    for index in [(0, 0), (1, 4), (0, 3)]:
        mean, cov = reference.moments(Xs[index], t, "ntk")
        torch.testing.assert_close(post.mean[index][:, 0], mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(post.distribution.covariance_matrix[index], cov, rtol=1e-9, atol=1e-10)


def test_multi_output_shares_the_kernel_and_counts_time_over_all_outputs():
    X, Y = data(m=2)
    Xs = 2 * torch.rand(6, 1, D) - 1
    model = TrainedEnsembleModel(X, Y, net(), t=5.0, learning_rate=1.0)
    post = model.posterior(Xs)
    # each output alone, with its tau = eta t / (n m) kept by eta / m
    for j in range(2):
        alone = gpntk.TrainedEnsemble(net(), X, Y[:, j], learning_rate=0.5)
        mean, var = alone.moments(Xs[:, 0], 5.0, "ntk", diag=True)
        torch.testing.assert_close(post.mean[:, 0, j], mean)
        torch.testing.assert_close(post.variance[:, 0, j], var)
        sub = model.subset_output([j]).posterior(Xs)
        torch.testing.assert_close(sub.mean[..., 0], post.mean[..., j])
    chosen = model.posterior(Xs, output_indices=[1])
    torch.testing.assert_close(chosen.mean[..., 0], post.mean[..., 1])
    assert model.num_outputs == 2 and model.batch_shape == torch.Size([])


def test_transforms_are_applied_and_untransformed_as_by_hand():
    X, Y = data(n=12, m=2)
    lo, hi = torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([3.0, 5.0, 2.0])
    raw_X = lo + (X + 1) / 2 * (hi - lo)
    raw_Y = 3.0 + 10.0 * Y
    bounds = torch.stack([lo, hi])
    transform = ChainedInputTransform(normalize=Normalize(D, bounds=bounds), center=Center(D))
    model = TrainedEnsembleModel(
        raw_X, raw_Y, net(), t=20.0, input_transform=transform, outcome_transform=Standardize(m=2)
    )
    test = torch.rand(4, 2, D) * (hi - lo) + lo
    post = model.posterior(test)
    # by hand: centred normalized inputs, standardized outputs
    mu, sd = raw_Y.mean(0), raw_Y.std(0)
    plain = TrainedEnsembleModel(X, (raw_Y - mu) / sd, net(), t=20.0)
    ref = plain.posterior(2 * (test - lo) / (hi - lo) - 1)
    torch.testing.assert_close(post.mean, ref.mean * sd + mu)
    torch.testing.assert_close(post.variance, ref.variance * sd**2)
    torch.testing.assert_close(model.train_inputs_transformed, X)


def test_posterior_transform_scalarizes_independent_outputs():
    X, Y = data(m=2)
    model = TrainedEnsembleModel(X, Y, net(), t=3.0, outcome_transform=Standardize(m=2))
    Xs = 2 * torch.rand(4, 1, D) - 1
    both = model.posterior(Xs)
    weights = torch.tensor([1.0, -2.0])
    scalar = model.posterior(Xs, posterior_transform=ScalarizedPosteriorTransform(weights, offset=0.5))
    torch.testing.assert_close(scalar.mean[..., 0], 0.5 + both.mean @ weights)
    torch.testing.assert_close(scalar.variance[..., 0], both.variance @ weights**2)


def test_observation_noise():
    X, Y = data()
    model = TrainedEnsembleModel(X, Y, net(), regime="ntkgp", diag_reg=0.1)
    Xs = 2 * torch.rand(3, 2, D) - 1
    base = model.posterior(Xs).variance
    torch.testing.assert_close(model.posterior(Xs, observation_noise=True).variance, base + 0.1)
    torch.testing.assert_close(model.posterior(Xs, observation_noise=torch.tensor([0.3])).variance, base + 0.3)
    with pytest.raises(ValueError, match="observation_noise"):
        model.posterior(Xs, observation_noise=torch.ones(5))


def test_bad_arguments_are_refused():
    X, Y = data()
    with pytest.raises(ValueError, match=r"\(n, m\)"):
        TrainedEnsembleModel(X, Y[:, 0], net())
    with pytest.raises(UnsupportedError, match="batched"):
        TrainedEnsembleModel(X.expand(2, *X.shape), Y.expand(2, *Y.shape), net())
    with pytest.raises(ValueError, match="regime"):
        TrainedEnsembleModel(X, Y, net(), regime="gp")
    with pytest.raises(ValueError, match=">= 0"):
        TrainedEnsembleModel(X, Y, net(), t=-1.0)
    with pytest.raises(ValueError, match="output_indices"):
        TrainedEnsembleModel(X, Y, net()).posterior(X[:2], output_indices=[3])


# --- acquisition -----------------------------------------------------------------------------------------
def test_optimize_acqf_with_analytic_and_monte_carlo_acquisitions():
    X, Y = data(n=8)
    raw_X = (X + 1) / 2
    bounds = torch.stack([torch.zeros(D), torch.ones(D)])
    transform = ChainedInputTransform(normalize=Normalize(D, bounds=bounds), center=Center(D))
    model = TrainedEnsembleModel(raw_X, Y, net(), t=50.0, input_transform=transform, outcome_transform=Standardize(1))
    sampler = SobolQMCNormalSampler(torch.Size([32]), seed=0)
    acquisitions = {
        1: [LogExpectedImprovement(model, best_f=Y.max()), UpperConfidenceBound(model, beta=2.0)],
        2: [
            qLogNoisyExpectedImprovement(model, X_baseline=raw_X, sampler=sampler, prune_baseline=False),
            qLogNoisyExpectedImprovement(model, X_baseline=raw_X),  # BoTorch's defaults (pruning, no cached root)
        ],
    }
    for q, acqfs in acquisitions.items():
        for acqf in acqfs:
            candidate, value = optimize_acqf(acqf, bounds=bounds, q=q, num_restarts=2, raw_samples=16)
            assert candidate.shape == (q, D) and torch.isfinite(value)
            assert ((candidate >= 0) & (candidate <= 1)).all()
    # the acquisition's gradient reaches X (what optimize_acqf's L-BFGS-B uses): finite differences
    acqf = acquisitions[1][0]
    x = torch.full((1, 1, D), 0.3, requires_grad=True)
    acqf(x).sum().backward()
    eps = 1e-6
    for i in range(D):
        step = torch.zeros(1, 1, D)
        step[..., i] = eps
        with torch.no_grad():
            fd = (acqf(x + step) - acqf(x - step)) / (2 * eps)
        torch.testing.assert_close(x.grad[..., i].reshape(1), fd, rtol=1e-4, atol=1e-7)


# --- conditioning --------------------------------------------------------------------------------------
def test_conditioning_is_exact_where_the_ensemble_is_a_gp_posterior():
    X, Y = data(n=12, m=2)
    Xs = 2 * torch.rand(3, 2, D) - 1
    model = TrainedEnsembleModel(
        X[:8], 5 * Y[:8], net(), regime="ntkgp", diag_reg=0.02, outcome_transform=Standardize(2)
    )
    conditioned = model.condition_on_observations(X[8:], 5 * Y[8:])
    post = conditioned.posterior(Xs)
    # reference: the GP posterior given all 12 points, in the first model's standardized space
    mu, sd = (5 * Y[:8]).mean(0), (5 * Y[:8]).std(0)
    for b in range(3):
        mean, cov = gp_posterior("ntk", X, (5 * Y - mu) / sd, Xs[b], 0.02)
        torch.testing.assert_close(post.mean[b], mean * sd + mu, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(post.variance[b], cov.diagonal().unsqueeze(-1) * sd**2, rtol=1e-6, atol=1e-7)
    assert model.posterior(Xs).mean.shape == post.mean.shape  # the original is unchanged
    with pytest.raises(UnsupportedError, match="diag_reg"):
        model.condition_on_observations(X[8:], Y[8:], noise=torch.full((4, 2), 0.5))


@pytest.mark.parametrize("t,regime", [(math.inf, "ntk"), (10.0, "ntkgp"), (10.0, "nngp")])
def test_conditioning_is_refused_where_it_is_not_defined(t, regime):
    X, Y = data()
    model = TrainedEnsembleModel(X, Y, net(), t=t, regime=regime)
    with pytest.raises(UnsupportedError, match="GP posterior"):
        model.condition_on_observations(X[:2], Y[:2])


def test_fantasies_are_refused_clearly():
    X, Y = data()
    model = TrainedEnsembleModel(X, Y, net(), regime="nngp", diag_reg=0.01)
    with pytest.raises(UnsupportedError, match="fantasize"):
        model.fantasize(X[:2], SobolQMCNormalSampler(torch.Size([4])))


# --- hyperparameters -------------------------------------------------------------------------------------
def test_fit_network_gives_the_fitted_gp_posterior_through_gpytorch():
    X, Y = data(n=16)
    fitted = fit_network(X, Y, net(), kernel="ntk")
    assert set(fitted.hyperparameters) == {"layers.0.weight_variance", "layers.0.bias_variance"}
    assert fitted.hyperparameters != {"layers.0.weight_variance": 2.0, "layers.0.bias_variance": 0.1}
    model = TrainedEnsembleModel(X, Y, fitted.net, regime="ntkgp", diag_reg=float(fitted.noise))
    Xs = 2 * torch.rand(5, D) - 1
    with torch.no_grad():
        reference = fitted.gp(Xs.unsqueeze(0))  # GPyTorch's own ExactGP prediction (latent f)
    post = model.posterior(Xs)
    torch.testing.assert_close(post.mean[:, 0], reference.mean[0], rtol=1e-5, atol=1e-6)
    covariance = post.distribution.covariance_matrix
    torch.testing.assert_close(covariance, reference.covariance_matrix[0], rtol=1e-4, atol=1e-6)
    assert isinstance(fitted.gp.likelihood, GaussianLikelihood)


# --- centring ------------------------------------------------------------------------------------------
def test_center_maps_the_unit_cube_and_composes_with_normalize():
    lo, hi = torch.tensor([-5.0, 0.0]), torch.tensor([10.0, 15.0])
    chained = ChainedInputTransform(normalize=Normalize(2, bounds=torch.stack([lo, hi])), center=Center(2))
    chained.eval()
    x = torch.tensor([[-5.0, 0.0], [10.0, 15.0], [2.5, 7.5], [0.0, 3.0]])
    expected = 2 * (x - lo) / (hi - lo) - 1
    torch.testing.assert_close(chained(x), expected)
    torch.testing.assert_close(chained.untransform(expected), x)
    partial = Center(3, indices=[0, 2])
    z = torch.rand(4, 3)
    torch.testing.assert_close(partial(z), torch.stack([2 * z[:, 0] - 1, z[:, 1], 2 * z[:, 2] - 1], -1))
    with pytest.raises(ValueError, match="positive integer"):
        Center(0)


def test_centered_kernel_evaluates_the_base_on_mapped_inputs():
    x1, x2 = torch.rand(5, D), torch.rand(4, D)
    base = gpntk.NTKKernel(net())
    wrapped = Centered(base)
    torch.testing.assert_close(wrapped(x1, x2).to_dense(), base(2 * x1 - 1, 2 * x2 - 1).to_dense())
    torch.testing.assert_close(wrapped(x1, diag=True), base(2 * x1 - 1, diag=True))
    other = Centered(RBFKernel(), center=1.0, scale=3.0)
    torch.testing.assert_close(other(x1, x2).to_dense(), RBFKernel()(3 * (x1 - 1), 3 * (x2 - 1)).to_dense())
    with pytest.raises(ValueError, match="scale"):
        Centered(base, scale=0.0)


def test_centring_decompresses_the_ntk_correlations():
    """The issue's numbers: 100 random points in 6-D, smallest NTK correlation on [0,1]^d vs [-1,1]^d."""
    x = torch.rand(100, 6, generator=torch.Generator().manual_seed(0))
    kernel = gpntk.NTKKernel(L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1))

    def smallest_correlation(k):
        s = k.diagonal().sqrt()
        return (k / s / s.unsqueeze(-1)).min().item()

    raw = smallest_correlation(kernel(x).to_dense())
    centred = smallest_correlation(Centered(kernel)(x).to_dense())
    assert raw > 0.35 and centred < 0.2


# --- the optional extra ----------------------------------------------------------------------------------
def test_import_gpntk_does_not_import_botorch_and_the_extra_is_named():
    code = "import sys, gpntk; gpntk.TrainedEnsemble; dir(gpntk); assert 'botorch' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    code = (
        "import sys; sys.modules['botorch'] = None\n"
        "try:\n    import gpntk.botorch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert 'pip install "gpntk[botorch]"' in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpntk.botorch.TrainedEnsembleModel is TrainedEnsembleModel
