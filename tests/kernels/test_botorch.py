"""gpntk kernels inside BoTorch models, and agreement with BoTorch's own infinite-width kernel."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("botorch")  # an optional extra: gpntk[botorch]

from botorch.exceptions.warnings import BotorchWarning  # noqa: E402
from botorch.fit import fit_gpytorch_mll  # noqa: E402
from botorch.models import SingleTaskGP  # noqa: E402
from botorch.models.kernels import InfiniteWidthBNNKernel  # noqa: E402
from gpytorch.mlls import ExactMarginalLogLikelihood  # noqa: E402
from gpytorch.utils.warnings import GPInputWarning  # noqa: E402
from linear_operator.utils.warnings import NumericalWarning  # noqa: E402

import gpntk  # noqa: E402
from gpntk import layers as L  # noqa: E402

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("float64_default")


@contextmanager
def no_kernel_warnings():
    """Fail if anything related to models, kernels or numerics is warned inside the block.

    All warnings are recorded (``simplefilter("always")``, so nothing is hidden by the
    once-per-location default); BoTorch, GPyTorch and linear_operator warnings, warnings raised
    from gpntk, and any warning whose message mentions a kernel are errors.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    bad = [
        w
        for w in caught
        if issubclass(w.category, (BotorchWarning, GPInputWarning, NumericalWarning))
        or "gpntk" in str(w.filename)
        or "kernel" in str(w.message).lower()
        or "covar" in str(w.message).lower()
    ]
    assert not bad, "unexpected warnings:\n" + "\n".join(
        f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in bad
    )


def branin_like(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(6 * x[..., 0]) * torch.cos(4 * x[..., 1]) + x[..., 2] ** 2 - 0.5 * x[..., 0] * x[..., 1]


def hyperparameter_values(kernel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in kernel.named_parameters()}


# --------------------------------------------------------------------------------------------
# SingleTaskGP with gpntk kernels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel_class", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_single_task_gp_single_output(kernel_class):
    train_X = torch.rand(20, 3)
    train_Y = branin_like(train_X).unsqueeze(-1)
    net = L.mlp(depth=2, activation="relu", weight_variance=1.0, bias_variance=0.5)
    covar = kernel_class(net)
    with no_kernel_warnings():
        model = SingleTaskGP(train_X, train_Y, covar_module=covar)
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        before = hyperparameter_values(covar)
        model.train()
        with torch.no_grad():
            initial = mll(model(*model.train_inputs), model.train_targets).item()
        fit_gpytorch_mll(mll)
        with torch.no_grad():
            model.train()
            final = mll(model(*model.train_inputs), model.train_targets).item()
        model.eval()
        test_X = torch.rand(7, 3)
        posterior = model.posterior(test_X)
        mean, variance = posterior.mean, posterior.variance
        batched = model.posterior(torch.rand(4, 5, 3))
        samples = posterior.rsample(torch.Size([3]))

    assert model.covar_module is covar
    assert final > initial, (initial, final)
    after = hyperparameter_values(covar)
    assert any(not torch.allclose(before[k], after[k]) for k in before), "the net's hyperparameters were not fitted"
    assert mean.shape == (7, 1) and variance.shape == (7, 1)
    assert mean.dtype == DTYPE
    assert torch.isfinite(mean).all() and torch.isfinite(variance).all() and (variance > 0).all()
    assert batched.mean.shape == (4, 5, 1)
    assert samples.shape == (3, 7, 1) and torch.isfinite(samples).all()
    # the fitted model interpolates its (noisy) training data reasonably
    train_mean = model.posterior(train_X).mean
    assert torch.corrcoef(torch.cat([train_mean, train_Y], dim=-1).T)[0, 1] > 0.9


def test_single_task_gp_multi_output_batched_kernel():
    train_X = torch.rand(16, 3)
    train_Y = torch.stack([branin_like(train_X), torch.cos(5 * train_X.sum(-1))], dim=-1)
    net = L.mlp(depth=2, activation="erf", weight_variance=2.0, bias_variance=0.3)
    covar = gpntk.NTKKernel(net, batch_shape=torch.Size([2]))
    net = covar.net  # a batched kernel works on its own copy of the network
    with no_kernel_warnings():
        model = SingleTaskGP(train_X, train_Y, covar_module=covar)
        assert model._aug_batch_shape == torch.Size([2])
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        fit_gpytorch_mll(mll)
        model.eval()
        test_X = torch.rand(6, 3)
        posterior = model.posterior(test_X)
        mean, variance = posterior.mean, posterior.variance
        joint = model.posterior(test_X).mvn.covariance_matrix

    assert mean.shape == (6, 2) and variance.shape == (6, 2)
    assert torch.isfinite(mean).all() and torch.isfinite(variance).all() and (variance > 0).all()
    assert joint.shape == (12, 12) and torch.isfinite(joint).all()
    # one (σw², σb²) pair per output, fitted independently
    wv = net.layers[0].weight_variance
    assert wv.shape == (2, 1, 1)
    assert not torch.allclose(wv[0], wv[1])
    # each output's posterior is that of a single-output model with that output's hyperparameters
    for i in range(2):
        single_net = L.mlp(depth=2, activation="erf", weight_variance=2.0, bias_variance=0.3)
        single_net.layers[0].weight_variance = wv[i].detach()
        single_net.layers[0].bias_variance = net.layers[0].bias_variance[i].detach()
        single = SingleTaskGP(train_X, train_Y[:, i : i + 1], covar_module=gpntk.NTKKernel(single_net))
        single.likelihood.noise = model.likelihood.noise[i].detach()
        single.mean_module.constant.data = model.mean_module.constant[i].detach()
        single.eval()
        torch.testing.assert_close(single.posterior(test_X).mean[:, 0], mean[:, i], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# NNGP of a ReLU MLP == BoTorch's InfiniteWidthBNNKernel
# --------------------------------------------------------------------------------------------
WEIGHT_VAR, BIAS_VAR = 1.6, 0.25


def botorch_kernel(depth, weight_var=WEIGHT_VAR, bias_var=BIAS_VAR, batch_shape=torch.Size([]), acos_eps=1e-7):
    """BoTorch's kernel; it clamps cosines to ±(1 - acos_eps), which moves its diagonal by ~acos_eps."""
    kernel = InfiniteWidthBNNKernel(depth=depth, batch_shape=batch_shape, acos_eps=acos_eps).to(DTYPE)
    kernel.weight_var = weight_var
    kernel.bias_var = bias_var
    return kernel


def assert_relative_close(actual, expected, rtol):
    scale = expected.abs().max()
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"relative error {float(err / scale):.3g} > {rtol}"


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_relu_nngp_equals_botorch_infinite_width_bnn(depth):
    ours = gpntk.NNGPKernel(L.mlp(depth, "relu", WEIGHT_VAR, BIAS_VAR))
    theirs = botorch_kernel(depth)
    x1, x2 = torch.rand(12, 4), torch.rand(9, 4)
    with no_kernel_warnings(), torch.no_grad():
        K = ours(x1, x2).to_dense()
        K_ref = theirs(x1, x2).to_dense()
        assert_relative_close(K, K_ref, 1e-6)
        # square kernels: off-diagonal and diagonal
        S = ours(x1).to_dense()
        S_ref = theirs(x1).to_dense()
        off = ~torch.eye(12, dtype=torch.bool)
        assert_relative_close(S[off], S_ref[off], 1e-6)
        assert_relative_close(S.diagonal(), S_ref.diagonal(), 1e-6)
        # BoTorch's diag=True is its exact per-point recursion, and so is ours
        d, d_ref = ours(x1, diag=True), theirs(x1, diag=True)
        torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(S.diagonal(), d_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("depth", [1, 3])
def test_relu_nngp_gradients_match_botorch(depth):
    """Same kernel, same raw parameterization (softplus): the same likelihood and gradients.

    BoTorch's default clamp (1e-7) perturbs its diagonal at the 1e-7 level, which the likelihood
    amplifies; with a tiny clamp both are exact up to rounding.
    """
    net = L.mlp(depth, "relu", WEIGHT_VAR, BIAS_VAR)
    ours, theirs = gpntk.NNGPKernel(net), botorch_kernel(depth, acos_eps=1e-13)
    x = torch.rand(10, 3)
    y = torch.randn(10)
    with no_kernel_warnings():
        losses = []
        for kernel in (ours, theirs):
            K = kernel(x).to_dense() + 0.1 * torch.eye(10)
            losses.append(torch.distributions.MultivariateNormal(torch.zeros(10), K).log_prob(y))
            losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-12)
    dense = net.layers[0]
    torch.testing.assert_close(dense.raw_weight_variance.grad, theirs.raw_weight_var.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dense.raw_bias_variance.grad, theirs.raw_bias_var.grad, rtol=1e-8, atol=1e-10)


def test_relu_nngp_equals_botorch_batched_hyperparameters():
    ours = gpntk.NNGPKernel(L.mlp(2, "relu", WEIGHT_VAR, BIAS_VAR), batch_shape=torch.Size([2]))
    dense = ours.net.layers[0]
    wv, bv = torch.tensor([0.7, 2.3]).view(2, 1, 1), torch.tensor([0.05, 0.9]).view(2, 1, 1)
    dense.weight_variance, dense.bias_variance = wv, bv
    theirs = botorch_kernel(2, wv, bv, batch_shape=torch.Size([2]))
    x1, x2 = torch.rand(2, 8, 3), torch.rand(2, 5, 3)
    with no_kernel_warnings(), torch.no_grad():
        assert_relative_close(ours(x1, x2).to_dense(), theirs(x1, x2).to_dense(), 1e-6)
        torch.testing.assert_close(ours(x1, diag=True), theirs(x1, diag=True), rtol=1e-12, atol=1e-14)


def test_botorch_model_with_both_kernels_agrees():
    """A SingleTaskGP with gpntk's NNGP and one with BoTorch's kernel give the same posterior."""
    train_X = torch.rand(15, 2)
    train_Y = branin_like(torch.cat([train_X, train_X[:, :1]], -1)).unsqueeze(-1)
    test_X = torch.rand(5, 2)
    posteriors = []
    with no_kernel_warnings():
        for covar in (gpntk.NNGPKernel(L.mlp(3, "relu", WEIGHT_VAR, BIAS_VAR)), botorch_kernel(3, acos_eps=1e-13)):
            model = SingleTaskGP(train_X, train_Y, covar_module=covar)
            model.likelihood.noise = 1e-3
            model.eval()
            posteriors.append(model.posterior(test_X))
    torch.testing.assert_close(posteriors[0].mean, posteriors[1].mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(posteriors[0].variance, posteriors[1].variance, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(posteriors[0].mean).all()


def test_the_warning_guard_catches_kernel_warnings():
    """The guard used above is not vacuous."""
    from botorch.exceptions.warnings import InputDataWarning

    for category, message in [
        (InputDataWarning, "data not scaled"),
        (NumericalWarning, "added jitter"),
        (UserWarning, "this kernel is odd"),
    ]:
        with pytest.raises(AssertionError, match="unexpected warnings"):
            with no_kernel_warnings():
                warnings.warn(message, category)
    with no_kernel_warnings():
        warnings.warn("something unrelated", DeprecationWarning)
