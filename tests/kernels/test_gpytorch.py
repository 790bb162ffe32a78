"""gpntk kernels as GPyTorch citizens.

GPyTorch's own kernel test-suite (``BaseKernelTestCase``, as BoTorch runs it for its kernels) for
several architectures, exact GPs trained by the marginal likelihood, priors, composition, lazy
evaluation, batch shapes, indexing, pickling and dtype handling.
"""

from __future__ import annotations

import copy
import math
import pickle
import unittest

import gpytorch
import pytest
import torch
from _models import ExactGP, Float64Defaults
from gpytorch.kernels import RBFKernel, ScaleKernel
from gpytorch.priors import GammaPrior, NormalPrior
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from linear_operator.operators import LinearOperator

import gpntk
from gpntk import layers as L

DTYPE = torch.float64


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------
def relu_mlp() -> L.Serial:
    return L.mlp(depth=2, activation="relu", weight_variance=1.7, bias_variance=0.2)


def erf_mlp() -> L.Serial:
    return L.mlp(depth=2, activation="erf", weight_variance=2.5, bias_variance=0.3)


def unshared_frozen_mlp() -> L.Serial:
    """``mlp(shared=False)``: a (σw², σb²) pair per layer, here with the first hidden layer frozen."""
    net = L.mlp(depth=2, activation="gelu", weight_variance=1.5, bias_variance=0.1, shared=False)
    net.layers[0].trainable = False
    net.layers[2].weight_variance = 2.0
    net.layers[4].bias_variance = 0.3
    return net


# --------------------------------------------------------------------------------------------
# GPyTorch's BaseKernelTestCase, once per (kernel, architecture)
# --------------------------------------------------------------------------------------------
class _InfiniteWidthKernelTestCase(Float64Defaults, BaseKernelTestCase):
    """Runs GPyTorch's kernel test-suite in float64 (the reference precision)."""

    seed = 0
    kernel_class: type = gpntk.NTKKernel
    make_net = staticmethod(relu_mlp)

    def create_kernel_no_ard(self, **kwargs):
        return self.kernel_class(self.make_net(), **kwargs)

    # --- additions on top of GPyTorch's suite ---------------------------------------------------
    def test_diag_matches_dense_diagonal_for_distinct_inputs(self):
        kernel = self.create_kernel_no_ard()
        x1, x2 = torch.randn(7, 4), torch.randn(7, 4)
        diag = kernel(x1, x2, diag=True)
        full = kernel(x1, x2).to_dense()
        torch.testing.assert_close(diag, full.diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)

    def test_symmetric_positive_semidefinite(self):
        kernel = self.create_kernel_no_ard()
        x = torch.randn(30, 5)
        with torch.no_grad():
            K = kernel(x).to_dense()
        torch.testing.assert_close(K, K.mT, rtol=1e-12, atol=1e-12)
        eig = torch.linalg.eigvalsh(K)
        assert eig.min() > -1e-10 * eig.max()

    def test_hyperparameters_registered(self):
        kernel = self.create_kernel_no_ard()
        names = [name for name, _ in kernel.named_hyperparameters()]
        assert names and all("raw_weight_variance" in n or "raw_bias_variance" in n for n in names)
        for _, param in kernel.named_hyperparameters():
            assert param.shape[-2:] == (1, 1)


def test_unshared_frozen_architecture_is_what_the_suite_tests():
    net = unshared_frozen_mlp()
    kernel = gpntk.NTKKernel(net)
    assert len(list(kernel.named_hyperparameters())) == 6  # three independent (σw², σb²) pairs
    trainable = copy.deepcopy(net)
    trainable.layers[0].trainable = True
    x = torch.randn(6, 3)
    with torch.no_grad():
        frozen_ntk = kernel(x).to_dense()
        full_ntk = gpntk.NTKKernel(trainable)(x).to_dense()
        # the frozen layer's Σ contribution is missing from the NTK, which is therefore smaller ...
        assert (full_ntk - frozen_ntk).diagonal().min() > 1e-3
        # ... while the NNGP does not know about training
        torch.testing.assert_close(gpntk.NNGPKernel(net)(x).to_dense(), gpntk.NNGPKernel(trainable)(x).to_dense())


# one BaseKernelTestCase class per (kernel, architecture), as module globals so unittest finds them
for _kernel_name, _kernel_class in (("NTK", gpntk.NTKKernel), ("NNGP", gpntk.NNGPKernel)):
    for _net_name, _make_net in (("ReLU", relu_mlp), ("Erf", erf_mlp), ("UnsharedFrozen", unshared_frozen_mlp)):
        _name = f"Test{_kernel_name}{_net_name}"
        globals()[_name] = type(
            _name,
            (_InfiniteWidthKernelTestCase, unittest.TestCase),
            {"kernel_class": _kernel_class, "make_net": staticmethod(_make_net)},
        )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture(autouse=True)
def _seed(float64_default):
    torch.manual_seed(1234)


def data(n=20, d=3, fn=None, dtype=DTYPE):
    x = torch.rand(n, d, dtype=dtype) * 2 - 1
    y = torch.sin(3 * x[:, 0]) + 0.5 * x[:, 1] ** 2 - x[:, 2] if fn is None else fn(x)
    return x, y




def net_hyperparameters(net) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


# --------------------------------------------------------------------------------------------
# exact GP with an NTK kernel: training, prediction, priors
# --------------------------------------------------------------------------------------------
def test_exact_gp_training_increases_mll_and_changes_network_hyperparameters():
    train_x, train_y = data(30)
    net = L.mlp(depth=2, activation="relu", weight_variance=1.0, bias_variance=0.5)
    covar = ScaleKernel(gpntk.NTKKernel(net)) + RBFKernel()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGP(train_x, train_y, covar, likelihood).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    # the net's σw², σb² are hyperparameters of the whole model
    names = [name for name, _ in model.named_hyperparameters()]
    assert any(name.endswith("raw_weight_variance") for name in names)
    assert any(name.endswith("raw_bias_variance") for name in names)

    before = net_hyperparameters(net)
    model.train()
    likelihood.train()
    with torch.no_grad():
        initial = mll(model(train_x), train_y).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        for name, param in net.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
        optimizer.step()
    with torch.no_grad():
        final = mll(model(train_x), train_y).item()
    assert math.isfinite(initial) and math.isfinite(final)
    assert final > initial + 0.05, (initial, final)

    after = net_hyperparameters(net)
    for name in before:
        assert not torch.allclose(before[name], after[name]), f"{name} did not change"

    # prediction
    model.eval()
    likelihood.eval()
    test_x = torch.rand(11, 3, dtype=DTYPE) * 2 - 1
    with torch.no_grad():
        pred = likelihood(model(test_x))
    assert pred.mean.shape == (11,)
    assert pred.variance.shape == (11,)
    assert pred.mean.dtype == DTYPE
    assert torch.isfinite(pred.mean).all() and torch.isfinite(pred.variance).all()
    assert (pred.variance > 0).all()
    # at the training inputs the posterior mean follows the data
    with torch.no_grad(), gpytorch.settings.debug(False):
        train_pred = model(train_x).mean
    assert torch.corrcoef(torch.stack([train_pred, train_y]))[0, 1] > 0.9


def test_exact_gp_predictions_batch_of_test_points():
    train_x, train_y = data(15)
    model = ExactGP(train_x, train_y, gpntk.NNGPKernel(L.mlp(1, "erf")), gpytorch.likelihoods.GaussianLikelihood())
    model.eval()
    with torch.no_grad():
        pred = model(torch.randn(4, 6, 3, dtype=DTYPE))
    assert pred.mean.shape == (4, 6)
    assert pred.covariance_matrix.shape == (4, 6, 6)
    assert torch.isfinite(pred.covariance_matrix).all()


def test_priors_on_dense_hyperparameters_enter_the_mll():
    train_x, train_y = data(20)

    def build(with_priors: bool):
        torch.manual_seed(0)
        priors = (
            dict(weight_variance_prior=GammaPrior(2.0, 0.5), bias_variance_prior=NormalPrior(1.0, 0.1))
            if with_priors
            else {}
        )
        net = L.serial(
            L.Dense(weight_variance=2.0, bias_variance=0.1, **priors),
            L.ReLU(),
            L.Dense(weight_variance=2.0, bias_variance=0.1),
        )
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = ExactGP(train_x, train_y, gpntk.NTKKernel(net), likelihood)
        return model, gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model), net

    model, mll, net = build(True)
    prior_names = [name for name, *_ in mll.named_priors()]
    assert any(name.endswith("weight_variance_prior") for name in prior_names), prior_names
    assert any(name.endswith("bias_variance_prior") for name in prior_names), prior_names

    plain_model, plain_mll, _ = build(False)
    model.train()
    plain_model.train()
    value = mll(model(train_x), train_y)
    plain_value = plain_mll(plain_model(train_x), train_y)
    # the MLL divides the log prior by n
    first = net.layers[0]
    expected_log_prior = (
        GammaPrior(2.0, 0.5).log_prob(first.weight_variance).sum()
        + NormalPrior(1.0, 0.1).log_prob(first.bias_variance).sum()
    ) / train_x.shape[0]
    torch.testing.assert_close(value - plain_value, expected_log_prior, rtol=1e-8, atol=1e-10)

    # the prior pulls the hyperparameters: its gradient is part of the loss gradient
    (-value).backward()
    (-plain_value).backward()
    plain_net = plain_model.covar_module.net
    assert not torch.allclose(first.raw_bias_variance.grad, plain_net.layers[0].raw_bias_variance.grad)


def test_prior_values_follow_the_property():
    prior = GammaPrior(3.0, 1.0)
    layer = L.Dense(weight_variance=1.5, bias_variance=0.2, weight_variance_prior=prior)
    kernel = gpntk.NNGPKernel(L.serial(layer, L.ReLU(), L.Dense()))
    (name, module, got_prior, closure, setting_closure) = next(iter(kernel.named_priors()))
    assert name == "net.layers.0.weight_variance_prior" and module is layer and got_prior is prior
    torch.testing.assert_close(closure(layer), layer.weight_variance)
    setting_closure(layer, torch.tensor(2.5))
    torch.testing.assert_close(layer.weight_variance, torch.tensor([[2.5]], dtype=layer.weight_variance.dtype))
    # sampling from the prior sets a positive hyperparameter through the module
    torch.manual_seed(3)
    layer.sample_from_prior("weight_variance_prior")
    value = layer.weight_variance
    assert (value > 0).all() and not torch.allclose(value, torch.tensor(2.5, dtype=value.dtype))


# --------------------------------------------------------------------------------------------
# composition and active_dims
# --------------------------------------------------------------------------------------------
def test_sum_product_and_scale_compose_with_gpytorch_kernels():
    x1, x2 = torch.randn(8, 4, dtype=DTYPE), torch.randn(5, 4, dtype=DTYPE)
    ntk = gpntk.NTKKernel(L.mlp(2, "relu"))
    nngp = gpntk.NNGPKernel(L.mlp(1, "erf"))
    rbf = RBFKernel().to(DTYPE)
    with torch.no_grad():
        K_ntk = ntk(x1, x2).to_dense()
        K_nngp = nngp(x1, x2).to_dense()
        K_rbf = rbf(x1, x2).to_dense()
        torch.testing.assert_close((ntk + nngp)(x1, x2).to_dense(), K_ntk + K_nngp)
        torch.testing.assert_close((ntk * nngp)(x1, x2).to_dense(), K_ntk * K_nngp)
        torch.testing.assert_close((ntk * rbf)(x1, x2).to_dense(), K_ntk * K_rbf)
        scaled = ScaleKernel(ntk).to(DTYPE)
        scaled.outputscale = 3.0
        torch.testing.assert_close(scaled(x1, x2).to_dense(), 3.0 * K_ntk)
        # the diagonal through composed kernels
        x = x1
        diag = (ScaleKernel(ntk) + nngp)(x, diag=True)
        full = (ScaleKernel(ntk) + nngp)(x).to_dense()
        torch.testing.assert_close(diag, full.diagonal(), rtol=1e-10, atol=1e-12)


def _relu_nngp_one_feature(a: torch.Tensor, b: torch.Tensor, wv: float, bv: float) -> torch.Tensor:
    """The NNGP of ``mlp(1, "relu", wv, bv)`` on one-feature inputs, in closed form (Cho and Saul 2009)."""
    k_ab = wv * a[:, None] * b[None, :] + bv
    k_aa, k_bb = wv * a**2 + bv, wv * b**2 + bv
    norms = (k_aa[:, None] * k_bb[None, :]).sqrt()
    theta = torch.arccos((k_ab / norms).clamp(-1, 1))
    return wv * norms * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi) + bv


@pytest.mark.filterwarnings("ignore:AdditiveStructureKernel is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_last_dim_is_batch_is_one_kernel_per_feature(backend):
    """GPyTorch's (deprecated) ``last_dim_is_batch``: each feature a batch of one-feature inputs, ``(..., d, n, m)``."""
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(6, 3, generator=g, dtype=DTYPE), torch.randn(4, 3, generator=g, dtype=DTYPE)
    net = L.mlp(1, "relu", 1.5, 0.2)
    nngp, ntk = gpntk.NNGPKernel(net, backend=backend), gpntk.NTKKernel(net, backend=backend)
    with torch.no_grad(), pytest.warns(DeprecationWarning, match="last_dim_is_batch"):
        cov = nngp(x1, x2, last_dim_is_batch=True).to_dense()
        tangent = ntk(x1, x2, last_dim_is_batch=True).to_dense()
        tangent_sym = ntk(x1, last_dim_is_batch=True).to_dense()
        tangent_diag = ntk(x1, diag=True, last_dim_is_batch=True)
        additive = gpytorch.kernels.AdditiveStructureKernel(ntk, num_dims=3)(x1, x2).to_dense()
    assert cov.shape == tangent.shape == (3, 6, 4) and tangent_sym.shape == (3, 6, 6) and tangent_diag.shape == (3, 6)
    closed_form = torch.stack([_relu_nngp_one_feature(x1[:, i], x2[:, i], 1.5, 0.2) for i in range(3)])
    torch.testing.assert_close(cov, closed_form, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        per_feature = torch.stack([ntk(x1[:, i:i + 1], x2[:, i:i + 1]).to_dense() for i in range(3)])
        per_feature_sym = torch.stack([ntk(x1[:, i:i + 1]).to_dense() for i in range(3)])
    torch.testing.assert_close(tangent, per_feature, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent_sym, per_feature_sym, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent_diag, per_feature_sym.diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(additive, per_feature.sum(0), rtol=1e-12, atol=1e-12)
    # a batched kernel: (batch, d, n, m), each batch member with its own hyperparameters
    batched = gpntk.NNGPKernel(L.mlp(1, "relu", 1.5, 0.2), batch_shape=torch.Size([2]))
    with torch.no_grad():
        batched.net.layers[0].weight_variance = torch.tensor([1.5, 0.7]).reshape(2, 1, 1)
    with torch.no_grad(), pytest.warns(DeprecationWarning):
        out = batched(x1, x2, last_dim_is_batch=True).to_dense()
    assert out.shape == (2, 3, 6, 4)
    torch.testing.assert_close(out[0], closed_form, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[1], closed_form)


def test_active_dims_select_features():
    x1, x2 = torch.randn(6, 5, dtype=DTYPE), torch.randn(4, 5, dtype=DTYPE)
    dims = [0, 3, 4]
    for cls in (gpntk.NTKKernel, gpntk.NNGPKernel):
        net = L.mlp(2, "gelu")
        kernel = cls(net, active_dims=dims)
        plain = cls(net)
        with torch.no_grad():
            torch.testing.assert_close(kernel(x1, x2).to_dense(), plain(x1[:, dims], x2[:, dims]).to_dense())
            torch.testing.assert_close(kernel(x1, diag=True), plain(x1[:, dims], diag=True))
    # an additive model over two disjoint feature groups
    k = gpntk.NTKKernel(L.mlp(1), active_dims=[0, 1]) + gpntk.NTKKernel(L.mlp(1), active_dims=[2, 3, 4])
    assert k(x1, x2).to_dense().shape == (6, 4)


# --------------------------------------------------------------------------------------------
# lazy evaluation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_lazy_linear_operator_agrees_with_dense(cls):
    kernel = cls(L.mlp(2, "relu", 2.0, 0.1))
    x1, x2 = torch.randn(9, 3, dtype=DTYPE), torch.randn(7, 3, dtype=DTYPE)
    with torch.no_grad():
        lazy = kernel(x1, x2)
        assert isinstance(lazy, LinearOperator)
        dense = lazy.to_dense()
        assert isinstance(dense, torch.Tensor) and dense.shape == (9, 7)
        # the evaluated kernel is itself a linear operator
        evaluated = lazy.evaluate_kernel()
        assert isinstance(evaluated, LinearOperator)
        torch.testing.assert_close(evaluated.to_dense(), dense)
        rhs = torch.randn(7, 2, dtype=DTYPE)
        torch.testing.assert_close(lazy @ rhs, dense @ rhs)
        torch.testing.assert_close(lazy.matmul(rhs[:, 0]), dense @ rhs[:, 0])
        torch.testing.assert_close(lazy[2:5, 1:4].to_dense(), dense[2:5, 1:4])

        square = kernel(x1)
        dense_sq = square.to_dense()
        torch.testing.assert_close(square.diagonal(), dense_sq.diagonal(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(kernel(x1, diag=True), dense_sq.diagonal(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense_sq, dense_sq.mT)
        rhs = torch.randn(9, 3, dtype=DTYPE)
        torch.testing.assert_close(square.matmul(rhs), dense_sq @ rhs)


def test_lazy_evaluation_is_deferred():
    """Building the operator does not evaluate the recursion; the dense matrix does, once."""
    calls = []

    class Counting(L.ReLU):
        def dual(self, *args, **kwargs):
            calls.append(1)
            return super().dual(*args, **kwargs)

    net = L.serial(L.Dense(2.0, 0.1), Counting(), L.Dense(2.0, 0.1))
    kernel = gpntk.NTKKernel(net)
    x = torch.randn(5, 3, dtype=DTYPE)
    with torch.no_grad():
        lazy = kernel(x, x)
        assert calls == []
        lazy.to_dense()
        assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# batch shapes, indexing, pickling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_batch_kernel_with_different_hyperparameters_per_batch(cls):
    net = L.mlp(2, "relu", 2.0, 0.1)
    kernel = cls(net, batch_shape=torch.Size([2]))
    assert kernel.batch_shape == torch.Size([2])
    net = kernel.net  # a batched kernel works on its own copy of the network
    dense = net.layers[0]
    assert dense.raw_weight_variance.shape == (2, 1, 1)
    dense.weight_variance = torch.tensor([1.0, 3.0]).view(2, 1, 1)
    dense.bias_variance = torch.tensor([0.05, 0.5]).view(2, 1, 1)

    x1, x2 = torch.randn(6, 3, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)
    with torch.no_grad():
        K = kernel(x1, x2).to_dense()
        assert K.shape == (2, 6, 4)
        for b, (wv, bv) in enumerate([(1.0, 0.05), (3.0, 0.5)]):
            single = cls(L.mlp(2, "relu", wv, bv))
            torch.testing.assert_close(K[b], single(x1, x2).to_dense(), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(K[0], K[1])
        # diag and batched inputs
        diag = kernel(x1, diag=True)
        assert diag.shape == (2, 6)
        torch.testing.assert_close(diag, kernel(x1).to_dense().diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)
        xb = torch.randn(2, 5, 3, dtype=DTYPE)
        Kb = kernel(xb).to_dense()
        for b in range(2):
            torch.testing.assert_close(Kb[b], kernel[b](xb[b]).to_dense())

        # kernel[i]: an independent single-batch kernel with batch i's hyperparameters
        first = kernel[1]
        assert first.batch_shape == torch.Size([])
        torch.testing.assert_close(first(x1, x2).to_dense(), K[1])
        assert first.net.layers[0].raw_weight_variance.shape == (1, 1)
    # indexing does not touch the original kernel
    assert net.layers[0].raw_weight_variance.shape == (2, 1, 1)


def test_batch_kernel_gradients_per_batch():
    net = L.mlp(1, "erf", 2.0, 0.1)
    kernel = gpntk.NTKKernel(net, batch_shape=torch.Size([2]))
    net = kernel.net  # a batched kernel works on its own copy of the network
    x = torch.randn(5, 2, dtype=DTYPE)
    out = kernel(x).to_dense()
    out[0].sum().backward()
    grad = net.layers[0].raw_weight_variance.grad
    assert grad.shape == (2, 1, 1)
    assert grad[0].abs() > 0 and grad[1].abs() == 0


@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_pickle_roundtrip(cls):
    net = unshared_frozen_mlp()
    kernel = ScaleKernel(cls(net, batch_shape=torch.Size([2])))
    net = kernel.base_kernel.net  # a batched kernel works on its own copy of the network
    net.layers[0].weight_variance = torch.tensor([1.0, 2.5]).view(2, 1, 1)
    x = torch.randn(6, 3, dtype=DTYPE)
    clone = pickle.loads(pickle.dumps(kernel))
    with torch.no_grad():
        torch.testing.assert_close(clone(x).to_dense(), kernel(x).to_dense(), rtol=0, atol=0)
    # the clone owns its hyperparameters
    clone.base_kernel.net.layers[0].weight_variance = 4.0
    assert not torch.allclose(clone.base_kernel.net.layers[0].weight_variance, net.layers[0].weight_variance)
    # and state dicts round-trip between kernels of the same architecture
    fresh = ScaleKernel(cls(unshared_frozen_mlp(), batch_shape=torch.Size([2])))
    fresh.load_state_dict(kernel.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).to_dense(), kernel(x).to_dense(), rtol=0, atol=0)
    deep = copy.deepcopy(kernel)
    with torch.no_grad():
        torch.testing.assert_close(deep(x).to_dense(), kernel(x).to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "activation",
    [
        pytest.param(lambda: L.Tanh(degree=8), id="tanh"),
        pytest.param(lambda: L.Elementwise(torch.sin, degree=8), id="elementwise-autograd"),
        pytest.param(lambda: L.Elementwise(torch.sin, torch.cos, degree=8), id="elementwise"),
        pytest.param(lambda: L.SiLU(degree=8), id="silu"),
        pytest.param(lambda: L.Sin(), id="sin"),
        pytest.param(lambda: L.Polynomial([0.0, 1.0, 0.5]), id="polynomial"),
        pytest.param(lambda: L.LeakyReLU(0.1), id="leaky_relu"),
    ],
)
def test_pickle_every_kind_of_activation(activation):
    kernel = gpntk.NTKKernel(L.serial(L.Dense(2.0, 0.1), activation(), L.Dense(1.0, 0.1)))
    clone = pickle.loads(pickle.dumps(kernel))
    x = torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(clone(x).to_dense(), kernel(x).to_dense(), rtol=0, atol=0)


def test_pickle_kernel_with_priors():
    layer = L.Dense(2.0, 0.1, weight_variance_prior=GammaPrior(2.0, 1.0), bias_variance_prior=NormalPrior(0.1, 1.0))
    kernel = gpntk.NTKKernel(L.serial(layer, L.Erf(), L.Dense(1.0, 0.1)))
    clone = pickle.loads(pickle.dumps(kernel))
    x = torch.randn(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(clone(x).to_dense(), kernel(x).to_dense(), rtol=0, atol=0)
    priors = {name: (module, prior, closure) for name, module, prior, closure, _ in clone.named_priors()}
    assert set(priors) == {"net.layers.0.weight_variance_prior", "net.layers.0.bias_variance_prior"}
    module, prior, closure = priors["net.layers.0.weight_variance_prior"]
    torch.testing.assert_close(prior.log_prob(closure(module)), GammaPrior(2.0, 1.0).log_prob(layer.weight_variance))


# --------------------------------------------------------------------------------------------
# dtype and device follow the inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_float32_inputs_with_float64_kernel(cls):
    kernel = cls(L.mlp(2, "relu")).to(torch.float64)
    assert kernel.net.layers[0].raw_weight_variance.dtype == torch.float64
    x64 = torch.randn(7, 3, dtype=torch.float64)
    x32 = x64.float()
    out32 = kernel(x32).to_dense()
    assert out32.dtype == torch.float32
    assert kernel(x32, diag=True).dtype == torch.float32
    assert kernel(x32, x32[:3]).to_dense().dtype == torch.float32
    torch.testing.assert_close(out32.double(), kernel(x64).to_dense(), rtol=1e-5, atol=1e-6)
    # and gradients reach the float64 hyperparameters
    out32.sum().backward()
    grad = kernel.net.layers[0].raw_weight_variance.grad
    assert grad is not None and grad.dtype == torch.float64 and torch.isfinite(grad).all()


def test_float64_inputs_with_float32_kernel():
    kernel = gpntk.NTKKernel(L.mlp(2, "erf")).to(torch.float32)
    x = torch.randn(7, 3, dtype=torch.float64)
    out = kernel(x).to_dense()
    assert out.dtype == torch.float64
    ref = gpntk.NTKKernel(L.mlp(2, "erf")).to(torch.float64)(x).to_dense()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_device_follows_inputs():
    kernel = gpntk.NTKKernel(L.mlp(1, "relu"))
    x = torch.randn(4, 2, dtype=DTYPE)
    assert kernel(x).to_dense().device == x.device
    if torch.cuda.is_available():  # exercised on GPU machines
        xc = x.cuda()
        kernel = kernel.cuda()
        assert kernel(xc).to_dense().device.type == "cuda"
        torch.testing.assert_close(kernel(xc).to_dense().cpu(), kernel.cpu()(x).to_dense())
