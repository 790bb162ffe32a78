"""Derivatives of the NTK/NNGP kernels: exact (gradcheck) and finite in the hard places.

``torch.autograd.gradcheck`` compares autograd with central finite differences in float64, for
kernel entries as functions of the inputs ``x1``, ``x2`` and of the raw hyperparameters. The
robustness tests check that values and gradients stay finite where closed forms are singular:
identical inputs (correlation exactly one), zero inputs (zero variance), deep nets and float32.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from _models import ExactGP
from torch.autograd import gradcheck

import gpntk
from gpntk import layers as L

DTYPE = torch.float64
KERNELS = {"ntk": gpntk.NTKKernel, "nngp": gpntk.NNGPKernel}
SMOOTH_ACTIVATIONS = ["relu", "erf", "gelu", "tanh"]
ALL_ACTIVATIONS = ["relu", "erf", "gelu", "abs", "sign", "tanh"]


pytestmark = pytest.mark.usefixtures("float64_default")


def make_net(activation: str, depth: int, bias: bool = True, shared: bool = False) -> L.Serial:
    """An MLP with per-layer hyperparameters of different values (so each gradient is distinct)."""
    kwargs = {"degree": 24} if activation == "tanh" else {}  # cheaper quadrature, still smooth
    net = L.mlp(depth, activation, weight_variance=1.7, bias_variance=0.2 if bias else 0.0, shared=shared, **kwargs)
    if not shared:
        for i, layer in enumerate(net.layers[::2]):
            layer.weight_variance = 1.2 + 0.3 * i
            if bias:
                layer.bias_variance = 0.1 + 0.05 * i
    return net


def kernel_for(kind: str, activation: str, depth: int, bias: bool = True) -> gpntk.kernels.InfiniteWidthKernel:
    return KERNELS[kind](make_net(activation, depth, bias)).to(DTYPE)


def raw_parameters(kernel) -> tuple[list[str], list[torch.Tensor]]:
    names, values = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in kernel.named_parameters()])
    return list(names), list(values)


def with_raw(kernel, names, raws, *args, **kwargs):
    """The kernel evaluated with its raw hyperparameters replaced by ``raws`` (differentiably)."""
    with gpytorch.settings.lazily_evaluate_kernels(False):
        out = torch.func.functional_call(kernel, dict(zip(names, raws)), args, kwargs)
    return out.to_dense() if not torch.is_tensor(out) else out


def distinct_points(n: int, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, dtype=DTYPE)


# --------------------------------------------------------------------------------------------
# gradcheck: inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_gradcheck_wrt_inputs(kind, activation, depth):
    kernel = kernel_for(kind, activation, depth)
    x1 = distinct_points(3).requires_grad_(True)
    x2 = distinct_points(2).requires_grad_(True)
    assert gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
    # a square kernel of distinct points (the same-inputs path: exact per-point diagonal)
    x = distinct_points(3).requires_grad_(True)
    assert gradcheck(lambda a: kernel(a).to_dense(), (x,))


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_gradcheck_wrt_raw_hyperparameters(kind, activation, depth):
    kernel = kernel_for(kind, activation, depth)
    names, raws = raw_parameters(kernel)
    assert len(names) == 2 * (depth + 1)
    x1, x2 = distinct_points(3), distinct_points(2)
    assert gradcheck(lambda *r: with_raw(kernel, names, r, x1, x2), raws)
    x = distinct_points(3)
    assert gradcheck(lambda *r: with_raw(kernel, names, r, x), raws)


def test_raw_hyperparameter_gradients_via_setter_function():
    """The same check, with the raw parameters set through a function instead of functional_call."""
    net = make_net("erf", 2, shared=True)
    kernel = gpntk.NTKKernel(net)
    dense = net.layers[0]
    x1, x2 = distinct_points(4), distinct_points(3)

    def entries(raw_w, raw_b):
        del dense.raw_weight_variance, dense.raw_bias_variance
        dense.raw_weight_variance, dense.raw_bias_variance = raw_w, raw_b  # plain tensors, not Parameters
        return kernel(x1, x2).to_dense()

    raw_w = dense.raw_weight_variance.detach().clone().requires_grad_(True)
    raw_b = dense.raw_bias_variance.detach().clone().requires_grad_(True)
    assert gradcheck(entries, (raw_w, raw_b))


def test_hyperparameter_gradients_match_property_derivatives():
    """d K / d raw = d K / d σ² · softplus'(raw): the constraint's chain rule is applied once."""
    net = make_net("relu", 2, shared=True)
    kernel = gpntk.NNGPKernel(net)
    x = distinct_points(5)
    kernel(x).to_dense().sum().backward()
    dense = net.layers[0]
    grad_raw = dense.raw_weight_variance.grad.clone()
    sigma = dense.weight_variance.detach()
    eps = 1e-6
    values = []
    for s in (sigma + eps, sigma - eps):
        probe = gpntk.NNGPKernel(make_net("relu", 2, shared=True))
        probe.net.layers[0].weight_variance = s
        probe.net.layers[0].bias_variance = dense.bias_variance.detach()
        values.append(probe(x).to_dense().sum())
    dK_dsigma = (values[0] - values[1]) / (2 * eps)
    softplus_derivative = torch.sigmoid(dense.raw_weight_variance.detach())
    torch.testing.assert_close(grad_raw.squeeze(), (dK_dsigma * softplus_derivative).squeeze(), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# gradcheck: diag=True
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS + ["abs"])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_gradcheck_diag(kind, activation):
    kernel = kernel_for(kind, activation, 2)
    x = distinct_points(4).requires_grad_(True)
    # per-point recursion k(x, x)
    assert gradcheck(lambda a: kernel(a, diag=True), (x,))
    # pairs k(x1_i, x2_i)
    y = distinct_points(4).requires_grad_(True)
    assert gradcheck(lambda a, b: kernel(a, b, diag=True), (x, y))
    names, raws = raw_parameters(kernel)
    xd = x.detach()
    assert gradcheck(lambda *r: with_raw(kernel, names, r, xd, diag=True), raws)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_nngp_diagonal_gradient_matches_finite_differences(activation):
    """d/dx k(x, x): from the diagonal of the full matrix and from diag=True, against central differences."""
    kernel = kernel_for("nngp", activation, 3)
    x = distinct_points(4)
    x_req = x.clone().requires_grad_(True)
    grad_full = torch.autograd.grad(kernel(x_req).to_dense().diagonal().sum(), x_req, materialize_grads=True)[0]
    x_req = x.clone().requires_grad_(True)
    grad_diag = torch.autograd.grad(kernel(x_req, diag=True).sum(), x_req, materialize_grads=True)[0]

    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                step = torch.zeros_like(x)
                step[i, j] = eps
                plus = kernel(x + step, diag=True)[i]
                minus = kernel(x - step, diag=True)[i]
                fd[i, j] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(grad_diag, fd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_full, fd, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# equal inputs held in two tensors are two arguments
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "erf", "gelu"])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_equal_but_distinct_inputs_diag_partial_derivatives(kind, activation):
    """k(x1_i, x2_i) with x2 an equal copy of x1: by symmetry each argument gets half of d k(x, x)/dx."""
    kernel = kernel_for(kind, activation, 2)
    x = distinct_points(4)
    xt = x.clone().requires_grad_(True)
    (total,) = torch.autograd.grad(kernel(xt, diag=True).sum(), xt)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g1, g2 = torch.autograd.grad(kernel(x1, x2, diag=True).sum(), (x1, x2))
    torch.testing.assert_close(g1, total / 2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g2, total / 2, rtol=1e-12, atol=1e-14)
    # and it is the derivative of the pairwise kernel (central differences in x2 alone)
    assert gradcheck(lambda b: kernel(x, b, diag=True), (x.clone().requires_grad_(True),))


def test_equal_but_distinct_inputs_linear_kernel_gradcheck():
    """The input layer gives x2 its own derivative when x2 equals x1 (Dense-only network)."""
    for kind in ("ntk", "nngp"):
        kernel = KERNELS[kind](L.serial(L.Dense(1.5, 0.2))).to(DTYPE)
        x = distinct_points(4)
        assert gradcheck(lambda b: kernel(x, b).to_dense(), (x.clone().requires_grad_(True),))
        assert gradcheck(lambda a: kernel(a, x).to_dense(), (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("activation", ["relu", "erf", "gelu"])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_equal_but_distinct_inputs_matrix_gradcheck(kind, activation):
    """K(x1, x2) with x2 an equal copy of x1: the gradient w.r.t. x2 alone matches finite differences.

    (Central differences see the symmetric derivative where the NTK has a cusp at x1 == x2.)
    """
    kernel = kernel_for(kind, activation, 2)
    x = distinct_points(4)
    assert gradcheck(lambda b: kernel(x, b).to_dense(), (x.clone().requires_grad_(True),))


# --------------------------------------------------------------------------------------------
# robustness: values and gradients stay finite
# --------------------------------------------------------------------------------------------
def assert_finite_values_and_gradients(kernel, x1, x2=None, diag=False):
    """Kernel values, and their gradients w.r.t. the inputs and the raw hyperparameters, are finite."""
    kernel.zero_grad()
    x1 = x1.clone().requires_grad_(True)
    inputs = [x1]
    if x2 is not None and x2 is not x1:
        x2 = x2.clone().requires_grad_(True)
        inputs.append(x2)
    out = kernel(x1, x2, diag=diag)
    out = out if torch.is_tensor(out) else out.to_dense()
    assert torch.isfinite(out).all(), f"non-finite kernel values:\n{out}"
    # a generic smooth loss of all entries, so every entry's gradient is exercised
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    # (a gradient of None means "does not depend on it", e.g. Sign's k(x, x) = 1: that is finite)
    for i, x in enumerate(inputs):
        assert x.grad is None or torch.isfinite(x.grad).all(), f"non-finite gradient w.r.t. input {i}:\n{x.grad}"
    grads = [(name, param.grad) for name, param in kernel.named_parameters()]
    for name, grad in grads:
        assert grad is None or torch.isfinite(grad).all(), f"non-finite gradient w.r.t. {name}: {grad}"
    assert any(grad is not None for _, grad in grads), "no hyperparameter gradient at all"
    return out


def all_kernels(activation, depth=3, bias=True, dtype=DTYPE):
    for kind in ("ntk", "nngp"):
        yield kind, kernel_for(kind, activation, depth, bias).to(dtype)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_identical_inputs_are_finite(activation):
    x = distinct_points(4)
    for kind, kernel in all_kernels(activation):
        # x1 == x2 as the same tensor, as equal tensors, and through kernel(x)
        K = assert_finite_values_and_gradients(kernel, x, x)
        K2 = assert_finite_values_and_gradients(kernel, x, x.clone())
        K3 = assert_finite_values_and_gradients(kernel, x)
        torch.testing.assert_close(K, K2, rtol=0, atol=0)
        torch.testing.assert_close(K, K3, rtol=0, atol=0)
        d = assert_finite_values_and_gradients(kernel, x, diag=True)
        torch.testing.assert_close(d, K.diagonal(), rtol=1e-12, atol=1e-12)
        # the diagonal of pairs of identical points, x1 and x2 distinct tensors
        assert_finite_values_and_gradients(kernel, x, x.clone(), diag=True)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_duplicate_point_inside_x_is_finite(activation):
    x = distinct_points(5)
    x[3] = x[1]
    for kind, kernel in all_kernels(activation):
        K = assert_finite_values_and_gradients(kernel, x)
        # rows of the duplicated point are identical, and its off-diagonal pair equals its variance
        torch.testing.assert_close(K[1], K[3], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(K[1, 3], K[1, 1], rtol=1e-7, atol=1e-9)
        other = distinct_points(3)
        other[0] = x[1]
        assert_finite_values_and_gradients(kernel, x, other)
        assert_finite_values_and_gradients(kernel, x, diag=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_zero_input_row_is_finite(activation, bias):
    x = distinct_points(4)
    x[2] = 0.0
    for kind, kernel in all_kernels(activation, bias=bias):
        K = assert_finite_values_and_gradients(kernel, x)
        assert_finite_values_and_gradients(kernel, x, distinct_points(3))
        assert_finite_values_and_gradients(kernel, distinct_points(3), x)
        d = assert_finite_values_and_gradients(kernel, x, diag=True)
        torch.testing.assert_close(d, K.diagonal(), rtol=1e-10, atol=1e-12)
        if not bias and activation in ("relu", "abs", "gelu", "erf", "tanh"):
            # φ(0) = 0 for these: a zero input has zero NNGP covariance with everything
            if kind == "nngp":
                torch.testing.assert_close(K[2], torch.zeros_like(K[2]), rtol=0, atol=1e-12)
    # two zero rows: identical and zero at once
    x[0] = 0.0
    for _, kernel in all_kernels(activation, bias=bias):
        assert_finite_values_and_gradients(kernel, x)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_depth_20_is_finite(activation):
    x = distinct_points(4)
    x[3] = x[0]
    for kind, kernel in all_kernels(activation, depth=20):
        assert_finite_values_and_gradients(kernel, x)
        assert_finite_values_and_gradients(kernel, x, distinct_points(2))
        assert_finite_values_and_gradients(kernel, x, diag=True)


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_float32_is_finite(activation):
    x = distinct_points(5).float()
    x[3] = x[1]
    x[4] = 0.0
    for kind, kernel in all_kernels(activation, dtype=torch.float32):
        K = assert_finite_values_and_gradients(kernel, x)
        assert K.dtype == torch.float32
        assert_finite_values_and_gradients(kernel, x, x.clone())
        assert_finite_values_and_gradients(kernel, x, torch.randn(3, 3, dtype=torch.float32))
        assert_finite_values_and_gradients(kernel, x, diag=True)
        # float32 agrees with float64
        K64 = kernel_for(kind, activation, 3)(x.double()).to_dense().detach()
        torch.testing.assert_close(K.detach().double(), K64, rtol=1e-4, atol=1e-5)
    # float32 inputs with a float64 kernel: gradients reach the float64 parameters
    for kind, kernel in all_kernels(activation):
        assert_finite_values_and_gradients(kernel, x)


# --------------------------------------------------------------------------------------------
# marginal likelihood with duplicated training inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_mll_gradient_finite_with_duplicate_training_inputs(kind, activation):
    train_x = torch.rand(8, 2)
    train_x = torch.cat([train_x, train_x[:3], torch.zeros(1, 2)])  # three duplicates and a zero row
    train_y = torch.sin(3 * train_x.sum(-1))
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    covar = gpytorch.kernels.ScaleKernel(kernel_for(kind, activation, 2))
    model = ExactGP(train_x, train_y, covar, likelihood, gpytorch.means.ZeroMean())
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    loss = -mll(model(train_x), train_y)
    assert torch.isfinite(loss)
    loss.backward()
    net_params = [(name, p) for name, p in model.named_parameters() if ".net." in name]
    assert len(net_params) == 6
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), (name, param.grad)
    if activation != "sign":  # below a Sign the NTK gets no contribution and k(x, x) is scale-free
        for name, param in net_params:
            assert param.grad.abs().sum() > 0, name
