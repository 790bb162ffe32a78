"""A residual block nested in the residual branch of another: ``h + (b + g(b))``, ``b = Dense(relu(h))``.

Its kernel is exact: ``b`` and ``g(b) = Dense(relu(b))`` end with their own affine layers, so each is
a zero-mean function of weights the outer skip branch ``h`` does not have, and their sum is
uncorrelated with ``h`` (in Σ and in Θ) although the copies of ``b`` inside the inner block depend
on each other. The build-time checks track this per ``FanOut`` (``Signature.outer_independent``).

Checked here: the kernel against the recursion derived by hand (arc-cosine formulas in numpy), the
``diag=True`` path, the Monte Carlo average of finite networks (and a wrong twin, ``h + b`` without
``g``; slow tier), the structured empirical NTK of the nested finite network against the full
Jacobian, and the cases that stay refused, with their messages: sums that need the
cross-covariance of ``h`` with a nonlinear function of ``h``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.errors import ArchitectureError

W1, B1 = 1.5, 0.1  # h = Dense(x)
W2, B2 = 2.0, 0.1  # b = Dense(relu(h))
W3, B3 = 1.5, 0.05  # g = Dense(relu(b))
W4, B4 = 1.0, 0.1  # readout after relu


def _nested(with_g: bool = True) -> L.Serial:
    inner: list = [L.ReLU(), L.Dense(W2, B2)]
    if with_g:
        inner += [L.FanOut(2), L.parallel(L.Identity(), L.serial(L.ReLU(), L.Dense(W3, B3))), L.FanInSum()]
    return L.serial(
        L.Dense(W1, B1), L.FanOut(2), L.parallel(L.Identity(), L.serial(*inner)), L.FanInSum(),
        L.ReLU(), L.Dense(W4, B4),
    )


def _inputs() -> torch.Tensor:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[1] = -0.8 * x[0] + 0.2 * x[1]
    x[4] = 0.3 * x[4]
    return x


def _relu(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[relu(u) relu(v)] and E[relu'(u) relu'(v)] for (u, v) ~ N(0, k) (Cho & Saul 2009)."""
    d = np.sqrt(np.diag(k))
    cos = np.clip(k / np.outer(d, d), -1.0, 1.0)
    theta = np.arccos(cos)
    np.fill_diagonal(theta, 0.0)  # exact on the diagonal
    value = np.outer(d, d) / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta))
    return value, (np.pi - theta) / (2 * np.pi)


def _by_hand(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The NNGP and NTK of ``_nested()``, derived layer by layer (NTK parameterization)."""
    k0 = x @ x.T / x.shape[1]
    k1 = W1 * k0 + B1
    t1 = k1  # Θ of the first layer: its input has no parameters
    r, dr = _relu(k1)
    kb = W2 * r + B2
    tb = W2 * dr * t1 + kb
    r, dr = _relu(kb)
    kg = W3 * r + B3
    tg = W3 * dr * tb + kg
    # h + (b + g): three mutually uncorrelated terms
    ko, to = k1 + kb + kg, t1 + tb + tg
    r, dr = _relu(ko)
    k = W4 * r + B4
    return k, W4 * dr * to + k


def test_nested_residual_is_accepted_and_matches_the_hand_recursion(float64_default):
    net = _nested()
    x = _inputs()
    with torch.no_grad():
        nngp = gpntk.NNGPKernel(net)(x).to_dense().numpy()
        ntk = gpntk.NTKKernel(net)(x).to_dense().numpy()
        ntk_diag = gpntk.NTKKernel(net)(x, diag=True).numpy()
        nngp_diag = gpntk.NNGPKernel(net)(x, diag=True).numpy()
    k, t = _by_hand(x.numpy())
    np.testing.assert_allclose(nngp, k, rtol=1e-12)
    np.testing.assert_allclose(ntk, t, rtol=1e-12)
    np.testing.assert_allclose(ntk_diag, np.diag(ntk), rtol=1e-12)
    np.testing.assert_allclose(nngp_diag, np.diag(nngp), rtol=1e-12)


def test_structured_empirical_ntk_of_the_nested_finite_network(float64_default):
    x = _inputs()
    model = _nested().finite(8, in_features=4, out_features=2, generator=torch.Generator().manual_seed(0))
    structured = gpntk.empirical_ntk(model, x, x[:3], method="structured")
    full = gpntk.empirical_ntk(model, x, x[:3], method="jacobian")
    torch.testing.assert_close(structured, full, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_monte_carlo_of_finite_nested_networks(kind, float64_default):
    """Width 512, 48 networks: measured relative Frobenius errors 1.5 % (NTK), 1.0 % (NNGP);
    the twin without ``g`` is 64 % / 43 % away (about 4 s each on one core)."""
    x = _inputs()
    mean, _ = gpntk.monte_carlo_kernel(
        _nested(), x, width=512, n_samples=48, kind=kind, out_features=1 if kind == "ntk" else 512, seed=5
    )
    cls = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    with torch.no_grad():
        right = cls(_nested())(x).to_dense()
        twin = cls(_nested(with_g=False))(x).to_dense()
    error = ((mean - right).norm() / right.norm()).item()
    wrong = ((mean - twin).norm() / twin.norm()).item()
    assert error < 0.04, f"{kind}: {error:.3f}"
    assert wrong > 4 * error, f"{kind}: twin {wrong:.3f} vs {error:.3f}"


def _skip_plus(inner: list, merge=L.FanInSum) -> L.Serial:
    return L.serial(
        L.Dense(), L.FanOut(2), L.parallel(L.Identity(), L.serial(*inner)), merge(), L.ReLU(), L.Dense()
    )


@pytest.mark.parametrize(
    "build, message",
    [
        # h + (relu(h) + g(h)): relu(h) is a nonlinear function of h, correlated with it
        (lambda: _skip_plus([L.ReLU(), L.FanOut(2), L.parallel(L.Identity(), L.Dense()), L.FanInSum()]),
         r"FanInSum of branches \[0, 1\] is not computable"),
        # h + (h + g(h)) is refused too: the inner copy of h is the outer skip branch itself
        (lambda: _skip_plus([L.FanOut(2), L.parallel(L.Identity(), L.serial(L.ReLU(), L.Dense())), L.FanInSum()]),
         r"FanInSum of branches \[0, 1\] is not computable"),
        # a product inside: b * g(b) is not treated as a fresh function
        (lambda: _skip_plus([L.ReLU(), L.Dense(), L.FanOut(2), L.parallel(L.Identity(), L.serial(L.ReLU(), L.Dense())),
                             L.FanInProd()]),
         r"FanInSum of branches \[0, 1\] is not computable"),
        # the inner block itself: two dependent branches of the inner FanOut
        (lambda: _skip_plus([L.ReLU(), L.Dense(), L.FanOut(2), L.parallel(L.Identity(), L.ReLU()), L.FanInSum()]),
         r"FanInSum of branches \[0, 1\] is not computable.*end all branches but one with Dense or Conv"),
        # a nonlinearity after the nested block: relu(b + g(b)) is no longer fresh
        (lambda: _skip_plus([L.ReLU(), L.Dense(), L.FanOut(2), L.parallel(L.Identity(), L.serial(L.ReLU(), L.Dense())),
                             L.FanInSum(), L.ReLU()]),
         r"FanInSum of branches \[0, 1\] is not computable"),
    ],
)
def test_dependent_sums_stay_refused(build, message):
    with pytest.raises(ArchitectureError, match=message):
        gpntk.NTKKernel(build())(torch.randn(3, 2))


def test_deeper_nesting_and_concat(float64_default):
    """Three levels of fresh residual branches, and a concatenation of fresh branches, are accepted."""
    def block(depth: int) -> list:
        layers: list = [L.ReLU(), L.Dense(1.2, 0.1)]
        if depth:
            layers += [L.FanOut(2), L.parallel(L.Identity(), L.serial(*block(depth - 1))), L.FanInSum()]
        return layers

    net = L.serial(L.Dense(), L.FanOut(2), L.parallel(L.Identity(), L.serial(*block(2))), L.FanInSum(), L.ReLU(),
                   L.Dense())
    x = _inputs()
    with torch.no_grad():
        k = gpntk.NTKKernel(net)(x).to_dense()
    assert torch.isfinite(k).all() and math.isfinite(k.sum().item())
    model = net.finite(4, in_features=4)
    assert model(x).shape == (5, 1)
