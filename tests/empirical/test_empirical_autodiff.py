"""EmpiricalNTKKernel and gpntk.empirical_ntk / empirical_nngp are differentiable in their inputs.

Gradients (and second derivatives) with respect to the inputs are checked against central finite
differences in float64, for the layer-by-layer path (networks built by ``net.finite``) and the
``torch.func.jacrev`` path (any module), full matrices and diagonals, NTK and NNGP; no gradient
reaches the network's weights; equal-valued inputs that are different tensors each get their own
gradient; and BoTorch's ``optimize_acqf`` runs on a GP with the kernel (issue 14, item 6).
"""

from __future__ import annotations

import gpytorch
import pytest
import torch
from torch import nn

import gpntk
from gpntk.empirical.structured import structured_applicable

DTYPE = torch.float64
D = 3


def _finite() -> nn.Module:
    """A smooth (erf) network from ``net.finite``: the structured path, and finite differences are valid."""
    net = gpntk.layers.mlp(2, "erf", weight_variance=1.5, bias_variance=0.2)
    return net.finite(16, in_features=D, out_features=2, generator=torch.Generator().manual_seed(0)).to(DTYPE)


class _Scaled(nn.Module):
    """A row-wise module gpntk does not know: the generic Jacobian path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.first = nn.Linear(D, 8)
        self.second = nn.Linear(8, 2)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)) * 1.3)


def _generic() -> nn.Module:
    return _Scaled().to(DTYPE)


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _central_difference(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``d f / d x`` for scalar ``f`` by central differences, entry by entry."""
    grad = torch.zeros_like(x)
    for index in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[index] = eps
        step = step.view_as(x)
        grad.view(-1)[index] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


MODELS = {"structured": _finite, "jacobian": _generic}


def test_models_take_the_intended_paths():
    assert structured_applicable(_finite()) and not structured_applicable(_generic())


@pytest.mark.parametrize("path", sorted(MODELS))
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("diag", [False, True])
def test_kernel_gradient_in_inputs_matches_finite_differences(path, kind, diag):
    model = MODELS[path]()
    kernel = gpntk.EmpiricalNTKKernel(model, kind=kind)
    x_train = _x(4, D, seed=0)
    weights = _x(3, 4, seed=2)

    def value(x):
        if diag:
            return (kernel(x, x_train[:3], diag=True) * weights[:, 0]).sum()
        return (kernel(x, x_train).to_dense() * weights).sum()

    x = _x(3, D, seed=1).requires_grad_(True)
    (grad,) = torch.autograd.grad(value(x), x)
    with torch.no_grad():
        expected = _central_difference(value, x.detach())
    assert grad.abs().max() > 1e-3  # a real gradient, not zeros
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("path", sorted(MODELS))
def test_symmetric_kernel_gradient_and_weights_untouched(path):
    """k(x, x) with one tensor on both sides, through ``backward``: the weights get no gradient."""
    model = MODELS[path]()
    kernel = gpntk.EmpiricalNTKKernel(model)
    weights = _x(4, 4, seed=3)

    def value(x):
        return (kernel(x).to_dense() * weights).sum()

    x = _x(4, D, seed=4).requires_grad_(True)
    value(x).backward()
    with torch.no_grad():
        expected = _central_difference(value, x.detach())
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("path", sorted(MODELS))
def test_equal_valued_leaves_each_get_their_gradient(path):
    """x1 and x2 equal in value but different tensors: each gets d k / d x_i (no value-keyed sharing)."""
    kernel = gpntk.EmpiricalNTKKernel(MODELS[path]())
    base = _x(3, D, seed=5)
    x1 = base.clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    weights = _x(3, 3, seed=6)
    (kernel(x1, x2).to_dense() * weights).sum().backward()
    with torch.no_grad():
        g1 = _central_difference(lambda x: (kernel(x, base).to_dense() * weights).sum(), base)
        g2 = _central_difference(lambda x: (kernel(base, x).to_dense() * weights).sum(), base)
    torch.testing.assert_close(x1.grad, g1, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x2.grad, g2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("path", sorted(MODELS))
def test_second_derivative_matches_finite_differences_of_the_gradient(path):
    kernel = gpntk.EmpiricalNTKKernel(MODELS[path]())
    p = _x(1, D, seed=7)

    def value(x):
        return kernel(x, p).to_dense().sum()

    def gradient(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(value(x), x)[0]

    x = _x(1, D, seed=8).requires_grad_(True)
    hessian = torch.autograd.functional.hessian(value, x)  # (1, D, 1, D)
    expected = torch.stack(
        [_central_difference(lambda y: gradient(y)[0, i], x.detach(), eps=1e-5)[0] for i in range(D)]
    )
    torch.testing.assert_close(hessian[0, :, 0, :], expected, rtol=1e-5, atol=1e-7)


def test_empirical_ntk_and_nngp_functions_are_differentiable_in_inputs():
    model = _finite()
    x2 = _x(2, D, seed=9)
    for function in (gpntk.empirical_ntk, gpntk.empirical_nngp):
        x = _x(3, D, seed=10).requires_grad_(True)
        (grad,) = torch.autograd.grad(function(model, x, x2).sum(), x)
        with torch.no_grad():
            expected = _central_difference(lambda y: function(model, y, x2).sum(), x.detach())
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_botorch_optimize_acqf_with_empirical_ntk_kernel():
    pytest.importorskip("botorch")  # an optional extra
    from botorch.acquisition import LogExpectedImprovement
    from botorch.models import SingleTaskGP
    from botorch.optim import optimize_acqf

    torch.manual_seed(0)
    train_x = torch.rand(12, D, dtype=DTYPE)
    train_y = torch.sin(3 * train_x.sum(-1, keepdim=True))
    model = _finite()
    gp = SingleTaskGP(train_x, train_y, covar_module=gpytorch.kernels.ScaleKernel(gpntk.EmpiricalNTKKernel(model)))
    gp.eval()
    acq = LogExpectedImprovement(gp, best_f=train_y.max())
    # the acquisition's gradient in x is the finite-difference one
    x = torch.rand(1, 1, D, dtype=DTYPE, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    (grad,) = torch.autograd.grad(acq(x).sum(), x)
    with torch.no_grad():
        expected = _central_difference(lambda y: acq(y).sum(), x.detach())
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)
    bounds = torch.stack([torch.zeros(D, dtype=DTYPE), torch.ones(D, dtype=DTYPE)])
    candidate, value = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=2, raw_samples=32)
    assert candidate.shape == (1, D) and bool(((candidate >= 0) & (candidate <= 1)).all())
    with torch.no_grad():
        start = acq(torch.rand(32, 1, D, dtype=DTYPE, generator=torch.Generator().manual_seed(4)))
    assert torch.isfinite(value) and value >= start.max() - 1e-9  # the optimiser improved on random points
    assert all(p.grad is None for p in model.parameters())
