"""Finite networks with Dropout (train mode) and sum pooling converge to their analytic kernels.

What a train-mode dropout kernel means for a finite network: every forward pass draws a fresh mask
for every input row. ``gpntk.monte_carlo_kernel(net, x1)`` (``x2`` left out) evaluates the network
*once* on ``x1``, so ``x_i`` meets itself with one mask: its expectation over initialisations and
masks is ``K(X, X)``, whose diagonal carries the factor ``1/(1 - p)``. With a separate ``x2``
the network is evaluated again, with new masks, so a row of ``x2`` identical to a row of ``x1`` is
another draw: its expectation is ``K(x1, x2)``, which has no factor anywhere. Both are checked,
on the empirical NTK (Jacobians, one evaluation per input set) and the empirical NNGP ``f fᵀ``
(averaged over ``2 * width`` output channels):

* ``dropmlp``: Dense, ReLU, Dropout(0.3), Dense (one hidden layer: unbiased at any width);
* ``dropdeep``: the architecture of ``a2_dropout_fc_relu_d2`` (two Dropout(0.2));
* ``sumpool``: Conv(3), ReLU, SumPool(2, 1, "same"), Dropout(0.5), Conv(2), ReLU, GlobalSumPool,
  Dense (inputs 2 x 6).

Measured (64 networks per width, seeded): relative Frobenius errors 0.9-2.9 % at width 512
(256 for ``sumpool``) against 2.2-12 % at width 32; every entry within 2.6 standard errors. The
wrong twins — the self-kernel's diagonal without the factor, the identical cross pairs with it —
lie 12-35 standard errors from the estimates where they differ by more than 20 % (all but the
``sumpool`` NNGP, 13 % apart). The same network with average instead of sum pooling is rejected.
"""

from __future__ import annotations

import functools

import pytest
import torch

import gpntk
from gpntk import layers as L

N_SAMPLES = 64
TOLERANCE = 0.05  # relative Frobenius error at the largest width
N_SE = 4.0  # per-entry bound: N_SE standard errors plus the finite-width bias allowance
BIAS_PER_LAYER = 2.0  # ... BIAS_PER_LAYER * depth / width * sqrt(K(x, x) K(x', x')) for depth > 1
WRONG_SE = 6.0  # a wrong twin at least 20 % away must be this many standard errors off


def _dropmlp():
    return L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dropout(0.3), L.Dense(2.0, 0.1))


def _dropdeep():
    return L.serial(
        L.Dense(2.0, 0.1), L.ReLU(), L.Dropout(0.2), L.Dense(2.0, 0.1), L.ReLU(), L.Dropout(0.2), L.Dense(2.0, 0.1)
    )


def _sumpool(pool=L.SumPool, global_pool=L.GlobalSumPool):
    return L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), pool(2, 1, "same"), L.Dropout(0.5),
        L.Conv(2, weight_variance=1.0, bias_variance=0.1), L.ReLU(), global_pool(), L.Dense(0.5, 0.1),
    )


#: name: (net, input_shape, features per input, hidden layers, widths)
ARCHITECTURES = {
    "dropmlp": (_dropmlp, None, 5, 1, (32, 512)),
    "dropdeep": (_dropdeep, None, 5, 2, (32, 512)),
    "sumpool": (_sumpool, (2, 6), 12, 2, (32, 256)),
}
KERNELS = {"nngp": gpntk.NNGPKernel, "ntk": gpntk.NTKKernel}


def _inputs(features):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, features, generator=g, dtype=torch.float64)
    # rows 0 and 1 of x2 are rows 0 and 2 of x1: identical points in a different set
    x2 = torch.cat([x1[[0, 2]], torch.randn(1, features, generator=g, dtype=torch.float64)])
    return x1, x2


@functools.lru_cache(maxsize=None)
def _estimates(name, kind, width, n_samples=N_SAMPLES):
    make, shape, features, _, _ = ARCHITECTURES[name]
    x1, x2 = _inputs(features)
    torch.manual_seed(0)  # the dropout masks (torch.nn.Dropout draws from the global generator)
    options = dict(width=width, n_samples=n_samples, kind=kind, input_shape=shape, seed=width)
    options["out_features"] = 2 * width if kind == "nngp" else 1
    self_kernel = gpntk.monte_carlo_kernel(make(), x1, **options)  # one evaluation: one mask per row
    cross_kernel = gpntk.monte_carlo_kernel(make(), x1, x2, **options)  # a second evaluation for x2
    return self_kernel, cross_kernel


def _analytic(net, kind, shape, x1, x2=None):
    with torch.no_grad():
        kernel = KERNELS[kind](net, input_shape=shape)
        return (kernel(x1) if x2 is None else kernel(x1, x2)).to_dense()


def _relative(estimate, exact):
    return float((estimate - exact).norm() / exact.norm())


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_monte_carlo_converges_to_train_mode_kernel(name, kind):
    make, shape, features, depth, widths = ARCHITECTURES[name]
    x1, x2 = _inputs(features)
    net = make()
    exact11, exact12 = _analytic(net, kind, shape, x1), _analytic(net, kind, shape, x1, x2)
    errors = {}
    for width in widths:
        (m11, s11), (m12, s12) = _estimates(name, kind, width)
        errors[width] = _relative(m11, exact11) + _relative(m12, exact12)
    width = widths[-1]
    (m11, s11), (m12, s12) = _estimates(name, kind, width)
    assert _relative(m11, exact11) <= TOLERANCE and _relative(m12, exact12) <= TOLERANCE, errors
    assert errors[width] <= 0.6 * errors[widths[0]], f"no convergence: {errors}"
    for estimate, se, exact, var1, var2 in (
        (m11, s11, exact11, exact11.diagonal()[:, None], exact11.diagonal()[None, :]),
        (m12, s12, exact12, exact11.diagonal()[:, None], _analytic(net, kind, shape, x2).diagonal()[None, :]),
    ):
        bias = 0.0 if depth == 1 else BIAS_PER_LAYER * depth / width * (var1 * var2).sqrt()
        assert ((estimate - exact).abs() <= N_SE * se + bias).all(), (estimate - exact).abs() / se
    # the wrong twins: no factor on the self-kernel's diagonal, the factor on identical cross pairs
    no_factor = exact12[[0, 2], [0, 1]]  # K(x1_i, x2_j) at the identical pairs (0, 0) and (2, 1)
    with_factor = exact11.diagonal()[[0, 2]]
    far = (with_factor - no_factor).abs() > 0.2 * no_factor.abs()
    if far.any():
        off_self = (m11.diagonal()[[0, 2]] - no_factor).abs() / s11.diagonal()[[0, 2]]
        off_cross = (m12[[0, 2], [0, 1]] - with_factor).abs() / s12[[0, 2], [0, 1]]
        assert (off_self[far] > WRONG_SE).all() and (off_cross[far] > WRONG_SE).all(), (off_self, off_cross)


@pytest.mark.slow
def test_sum_pool_twin_with_average_pooling_is_rejected():
    """The same network with AvgPool / GlobalAvgPool (normalised windows) is far from the estimate."""
    _, shape, features, _, widths = ARCHITECTURES["sumpool"]
    x1, _ = _inputs(features)
    (m11, _), _ = _estimates("sumpool", "ntk", widths[-1])
    wrong = _analytic(_sumpool(L.AvgPool, L.GlobalAvgPool), "ntk", shape, x1)
    assert _relative(m11, wrong) > 10 * TOLERANCE


def test_dropout_masks_quick():
    """Fast tier: one hidden layer, width 256, 32 networks: the factor on the self-entries only."""
    x1, x2 = _inputs(5)
    net = _dropmlp()
    exact11, exact12 = _analytic(net, "ntk", None, x1), _analytic(net, "ntk", None, x1, x2)
    (m11, s11), (m12, s12) = _estimates("dropmlp", "ntk", 256, 32)
    assert ((m11 - exact11).abs() <= N_SE * s11).all() and ((m12 - exact12).abs() <= N_SE * s12).all()
    no_factor, with_factor = exact12[[0, 2], [0, 1]], exact11.diagonal()[[0, 2]]
    assert ((m11.diagonal()[[0, 2]] - no_factor).abs() > WRONG_SE * s11.diagonal()[[0, 2]]).all()
    assert ((m12[[0, 2], [0, 1]] - with_factor).abs() > WRONG_SE * s12[[0, 2], [0, 1]]).all()
