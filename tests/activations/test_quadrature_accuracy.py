"""Kernels by Gauss–Hermite quadrature warn where the rule is measurably inaccurate.

The truth is the same kernel with a 256-point rule (converged to ~1e-8 or better at these
variances); the default 64-point rule is compared with it, and the warning must appear exactly
when the default rule is off by more than the tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gpntk
from gpntk import layers as L

QUADRATURE = {"tanh": L.Tanh, "sigmoid": L.Sigmoid, "softplus": L.Softplus, "silu": L.SiLU}


def _net(activation, degree, weight_variance):
    return L.serial(
        L.Dense(weight_variance, 0.1), activation(degree=degree), L.Dense(weight_variance, 0.1),
        activation(degree=degree), L.Dense(1.0),
    )


def _kernel(activation, degree, weight_variance, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = gpntk.NTKKernel(_net(activation, degree, weight_variance))(x).to_dense()
    return K, [w for w in caught if issubclass(w.category, gpntk.ApproximationWarning)]


def _points(scale):
    return scale * torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(QUADRATURE))
def test_inaccurate_rule_warns(name):
    """Variances up to ~17: the default rule is off by 1e-5 to 1e-1, and warns."""
    x = _points(1.0)
    K, caught = _kernel(QUADRATURE[name], 64, 4.0, x)
    truth, _ = _kernel(QUADRATURE[name], 256, 4.0, x)
    error = ((K - truth).abs().max() / truth.abs().max()).item()
    assert error > 1e-6  # well above the 1e-7 tolerance
    assert caught, f"{name}: relative error {error:.1e} without a warning"
    assert "Gauss–Hermite" in str(caught[0].message) and "degree=256" in str(caught[0].message)


@pytest.mark.parametrize("name", list(QUADRATURE))
def test_accurate_rule_is_silent(name):
    """Small variances (inputs of scale 0.3): the default rule is exact to ~1e-9, no warning."""
    x = _points(0.3)
    K, caught = _kernel(QUADRATURE[name], 64, 1.0, x)
    truth, _ = _kernel(QUADRATURE[name], 256, 1.0, x)
    assert ((K - truth).abs().max() / truth.abs().max()).item() < 1e-7
    assert not caught


def test_diag_and_nngp_warn_too():
    x = _points(1.0)
    net = _net(L.Tanh, 64, 4.0)
    for call in (lambda: gpntk.NNGPKernel(net)(x).to_dense(), lambda: gpntk.NTKKernel(net)(x, diag=True)):
        with pytest.warns(gpntk.ApproximationWarning, match="Gauss–Hermite"):
            call()


def test_rule_error_estimate_tracks_the_truth():
    """The per-point estimate is within a factor of 10 of the true per-point error."""
    tanh = L.Tanh()
    q = torch.tensor([0.5, 2.0, 4.0, 8.0], dtype=torch.float64)
    for variance in q:
        estimate, at = tanh.rule_error(variance.reshape(1))
        exact = L.Tanh(degree=512).dual_diag(variance.reshape(1), need_dot=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gpntk.ApproximationWarning)
            approx = tanh.dual_diag(variance.reshape(1), need_dot=True)
        true = max(((a - e).abs() / e.abs()).item() for a, e in zip(approx, exact))
        assert at == pytest.approx(variance.item())
        assert true / 10 <= estimate <= true * 10 or (true < 1e-12 and estimate < 1e-10)


def test_closed_form_activations_never_warn():
    x = _points(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpntk.ApproximationWarning)
        for activation in ("relu", "erf", "gelu", "sin"):
            gpntk.NTKKernel(L.mlp(2, activation, weight_variance=4.0))(x).to_dense()


@pytest.mark.slow
def test_backward_keeps_no_quadrature_nodes():
    """With gradients, the bytes saved for the backward pass grow like n² (the kernels), not n² D².

    Each block of pairs is checkpointed: its (rows x n2 x D x D) nodes are recomputed in the
    backward pass instead of kept (before: 4 GB at n = 100 for a depth-2 Tanh NTK, out of memory
    at n = 300). The gradient equals the unblocked one.
    """
    torch.manual_seed(0)
    n = 60
    x = (0.5 * torch.randn(n, 3, dtype=torch.float64)).requires_grad_(True)
    net = L.mlp(2, "tanh", weight_variance=1.0)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        K = gpntk.NTKKernel(net)(x).to_dense()
    (grad,) = torch.autograd.grad(K.sum(), x)
    degree = 64
    assert sum(saved) < 200 * n * n * 8  # a few hundred n x n tensors at most
    assert sum(saved) < n * n * degree * degree * 8 / 10  # far below one set of nodes

    from gpntk.activations import quadrature

    blocks = quadrature._BLOCK_ELEMENTS
    try:
        quadrature._BLOCK_ELEMENTS = 1 << 40  # one block, no checkpoint needed to compare
        K_whole = gpntk.NTKKernel(net)(x).to_dense()
        (grad_whole,) = torch.autograd.grad(K_whole.sum(), x)
    finally:
        quadrature._BLOCK_ELEMENTS = blocks
    torch.testing.assert_close(grad, grad_whole, rtol=1e-12, atol=1e-12)
