"""``LayerNorm``'s kernel includes the ``eps`` its finite module adds to the channel variance.

The finite module normalises by :math:`\\sqrt{\\mathrm{var} + \\epsilon}`; at infinite width the
channel variance is :math:`\\Sigma(x, x)_{p,p}`, so the kernel divides by
:math:`\\sqrt{(q + \\epsilon)(q' + \\epsilon)}`. With ``eps=1`` (variances about 1.7) leaving it out
changes the kernels by about 40 %; the Monte Carlo average of finite networks must side with the
kernel that includes it. The reference case ``fc_layernorm`` (default ``eps=1e-12``, as Neural
Tangents' default) is checked in ``tests/test_reference.py`` at 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import build_net, load_case

import gpntk
from gpntk import layers as L

EPS = 1.0


def _net(eps: float) -> L.Serial:
    return L.serial(L.Dense(1.5, 0.2), L.LayerNorm(eps=eps), L.ReLU(), L.Dense(2.0, 0.1))


def _inputs() -> torch.Tensor:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1] = -0.7 * x[0] + 0.3 * x[1]
    x[3] = 0.2 * x[3]  # a small input: there eps matters most
    return x


def test_kernel_divides_by_variance_plus_eps(float64_default):
    x = _inputs()
    dense = L.serial(L.Dense(1.5, 0.2))
    normed = L.serial(L.Dense(1.5, 0.2), L.LayerNorm(eps=EPS))
    with torch.no_grad():
        k = gpntk.NNGPKernel(dense)(x).to_dense()
        t = gpntk.NTKKernel(dense)(x).to_dense()
        k_ln = gpntk.NNGPKernel(normed)(x).to_dense()
        t_ln = gpntk.NTKKernel(normed)(x).to_dense()
        diag = gpntk.NTKKernel(normed)(x, diag=True)
    scale = (k.diagonal() + EPS).rsqrt()
    torch.testing.assert_close(k_ln, k * scale[:, None] * scale[None, :], rtol=1e-14, atol=0)
    torch.testing.assert_close(t_ln, t * scale[:, None] * scale[None, :], rtol=1e-14, atol=0)
    torch.testing.assert_close(diag, t_ln.diagonal(), rtol=1e-14, atol=0)


def test_zero_input_and_float32_finite():
    x = torch.zeros(2, 3)
    x[1] = 1.0
    net = L.serial(L.Dense(1.0, 0.0), L.LayerNorm(), L.ReLU(), L.Dense(1.0, 0.0))
    with torch.no_grad():
        k = gpntk.NTKKernel(net)(x).to_dense()
    assert torch.isfinite(k).all()
    assert k[0].abs().max() == 0  # a zero vector normalises to zero


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_gradcheck_wrt_inputs_and_first_variances(kind, float64_default):
    """Finite differences of the map with eps, in the inputs (a zero input included: there the
    normaliser is 1/sqrt(eps)) and in the variances of the Dense before it."""
    net = L.serial(L.Dense(1.5, 0.2), L.LayerNorm(eps=0.3), L.Erf(), L.Dense(2.0, 0.1))
    kernel = (gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel)(net)
    x1 = _inputs()[:3].clone().requires_grad_(True)
    x2 = _inputs()[2:].clone()
    x2[0] = 0.0
    x2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
    dense = net.layers[0]
    raw = (dense.raw_weight_variance.detach().clone().requires_grad_(True),
           dense.raw_bias_variance.detach().clone().requires_grad_(True))

    def entries(raw_w: torch.Tensor, raw_b: torch.Tensor) -> torch.Tensor:
        del dense.raw_weight_variance, dense.raw_bias_variance
        dense.raw_weight_variance, dense.raw_bias_variance = raw_w, raw_b  # plain tensors
        return kernel(x1.detach(), x2.detach()).to_dense()

    assert torch.autograd.gradcheck(entries, raw)


def test_float32_finite():
    net = L.serial(L.Dense(1.0, 0.0), L.LayerNorm(eps=1e-5), L.ReLU(), L.Dense(1.0, 0.1))
    x = torch.randn(4, 3)
    x[0] = 0.0
    with torch.no_grad():
        for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
            assert torch.isfinite(cls(net)(x).to_dense()).all()
            assert torch.isfinite(cls(net)(x, diag=True)).all()


def test_reference_case_unchanged(float64_default):
    case = load_case("fc_layernorm")
    assert "eps" not in case.layers[1][1]  # Neural Tangents' default eps (1e-12), gpntk's default too
    net = build_net(case.layers)
    x1, x2 = (torch.tensor(case[k]) for k in ("x1", "x2"))
    with torch.no_grad():
        for kind, cls in (("nngp", gpntk.NNGPKernel), ("ntk", gpntk.NTKKernel)):
            ours = cls(net)(x1, x2).to_dense().numpy()
            ref = case[f"{kind}_12"]
            assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-10


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_monte_carlo_agrees_with_eps_in_the_kernel(kind, float64_default):
    """Finite networks (width 512, 64 draws) against the kernels with and without eps.

    Measured: relative Frobenius error 1.0 % (NNGP) / 0.6 % (NTK) with eps, 55 % / 59 % without.
    """
    x = _inputs()
    width = 512
    out_features = 1 if kind == "ntk" else 512
    mean, se = gpntk.monte_carlo_kernel(
        _net(EPS), x, width=width, n_samples=64, kind=kind, out_features=out_features, seed=11
    )
    cls = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    with torch.no_grad():
        right = cls(_net(EPS))(x).to_dense()
        without = cls(_net(1e-12))(x).to_dense()  # the kernel as it was: eps left out
    error = ((mean - right).norm() / right.norm()).item()
    wrong = ((mean - without).norm() / without.norm()).item()
    assert error < 0.04, f"{kind}: Monte Carlo is {error:.3f} away from the kernel with eps"
    assert wrong > 5 * error, f"{kind}: the kernel without eps ({wrong:.3f}) is not clearly worse ({error:.3f})"
