"""Dropout: the train-mode kernel (issue 16), its convention for "one input with itself", its checks.

The reference cases (``a2_dropout*``) run in ``tests/test_reference.py``. Here:

* the map itself: on ``K(X, X)`` only the diagonal of the Dropout's own layer changes, by
  ``1/(1 - p)``, for Σ and Θ and (spatial inputs) only at one position with itself;
* the convention (Neural Tangents'): ``K(x1, x2)`` of two different sets gets no factor, not even
  at a pair of identical rows, nor do duplicated rows ``i != j`` of ``K(X, X)``: those entries are
  the limits of nearby pairs; a copy of ``x1`` counts as ``x1`` (the full matrix and ``diag=True``);
  inside a residual branch, the identical rows of the other branch do not restore the exact
  per-point treatment after the merge;
* ``diag=True``, the blockwise backend (blocks on the diagonal of a symmetric kernel), the trained
  ensemble's training and test kernels, float32, finite differences in the inputs;
* refusals: a first layer, a nonlinearity right after it, ``p`` outside [0, 1); KeOps and the
  structured empirical NTK decline it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.empirical.structured import structured_applicable
from gpntk.kernels.blockwise import kernel_matmul

KERNELS = {"nngp": gpntk.NNGPKernel, "ntk": gpntk.NTKKernel}
P = 0.3


def _mlp(p=P, dropout=True):
    drop = [L.Dropout(p)] if dropout else []
    return L.serial(
        L.Dense(2.0, 0.1), L.ReLU(), *drop, L.Dense(1.5, 0.1), L.Erf(), *drop, L.Dense(2.0, 0.1)
    )


def _inputs(n, d=4, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense(kernel, x1, x2=None):
    with torch.no_grad():
        return (kernel(x1) if x2 is None else kernel(x1, x2)).to_dense()


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_one_layer_map(kind):
    """Dense, ReLU, Dropout, Dense readout: Σ(x, x) = σw² E[φ²]/(1 - p) + σb², the rest unchanged."""
    with_drop = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dropout(P), L.Dense(1.5, 0.2))
    without = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dense(1.5, 0.2))
    x, z = _inputs(5), _inputs(3, seed=1)
    k = _dense(KERNELS[kind](with_drop), x)
    k0 = _dense(KERNELS[kind](without), x)
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.equal(k[off], k0[off])
    # the readout's bias (0.2) is not dropped; everything below it is divided by 1 - p
    assert torch.allclose(k.diagonal() - 0.2, (k0.diagonal() - 0.2) / (1 - P), rtol=1e-14)
    assert torch.equal(_dense(KERNELS[kind](with_drop), x, z), _dense(KERNELS[kind](without), x, z))


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_spatial_map_only_same_position(kind):
    """Conv, ReLU, Dropout, GlobalAvgPool: only Σ_{p,p} of a point with itself is divided (measured exact)."""
    shape = (2, 5)
    layers = [L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU()]
    with_drop = L.serial(*layers, L.Dropout(P), L.GlobalAvgPool(), L.Dense(1.0, 0.0))
    without = L.serial(*layers, L.GlobalAvgPool(), L.Dense(1.0, 0.0))
    no_pool = L.serial(*layers, L.Flatten(), L.Dense(1.0, 0.0))  # averages the Σ_{p,p} only
    x = _inputs(4, 10)
    k, k0, kp = (_dense(KERNELS[kind](net, input_shape=shape), x) for net in (with_drop, without, no_pool))
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.equal(k[off], k0[off])
    # GlobalAvgPool averages P^2 position pairs, P of which (the Flatten average) are inflated
    positions = shape[1]
    expected = k0.diagonal() + kp.diagonal() * (1 / (1 - P) - 1) / positions
    assert torch.allclose(k.diagonal(), expected, rtol=1e-13)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_copy_counts_as_same_inputs(kind):
    """``K(x, x.clone())`` is ``K(x, x)`` (Neural Tangents: x1_is_x2 by value), full matrix and diag."""
    kernel = KERNELS[kind](_mlp())
    x = _inputs(5)
    full = _dense(kernel, x)
    assert torch.equal(_dense(kernel, x, x.clone()), full)
    with torch.no_grad():
        assert torch.allclose(kernel(x, diag=True), full.diagonal(), rtol=1e-14)
        assert torch.allclose(kernel(x, x.clone(), diag=True), full.diagonal(), rtol=1e-14)
        # a different set: no factor anywhere, so its paired diagonal is the cross kernel's
        z = _inputs(5, seed=2)
        assert torch.allclose(kernel(x, z, diag=True), _dense(kernel, x, z).diagonal(), rtol=1e-12)


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("residual", [False, True])
def test_identical_rows_of_different_draws_get_no_factor(kind, residual):
    """An identical pair in two different sets, or duplicated rows of one set, is the limit of nearby pairs.

    Without the factor the kernel is continuous there; gpntk's exact per-point values for identical
    rows would give the factor-inflated self value instead (more than 5 % off here).
    """
    if residual:  # the Dropout sits in one branch; the other branch keeps its identical rows
        net = L.serial(
            L.Dense(2.0, 0.1), L.ReLU(), L.Dense(1.0, 0.1), L.FanOut(2),
            L.parallel([L.Dense(1.0, 0.1)], [L.Dropout(P), L.Dense(1.0, 0.1)]),
            L.FanInSum(), L.ReLU(), L.Dense(2.0, 0.1),
        )
    else:
        net = _mlp()
    kernel = KERNELS[kind](net)
    x1 = _inputs(4)
    x2 = torch.cat([_inputs(2, seed=5), x1[2:3]])  # row 2 of x2 is row 2 of x1
    k12 = _dense(kernel, x1, x2)
    nearby = []
    for eps in (1e-6, -1e-6):
        moved = x2.clone()
        moved[2] += eps * torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
        nearby.append(_dense(kernel, x1, moved)[2, 2])
    limit = (nearby[0] + nearby[1]) / 2
    # the ReLU NTK is only Lipschitz at coincident points (kdot = 1/2 - θ/2π): O(eps) off (measured 2.7e-7)
    assert abs(k12[2, 2] - limit) <= 1e-5 * abs(limit)
    self_value = _dense(kernel, x1)[2, 2]
    assert (self_value - k12[2, 2]) > 0.05 * abs(k12[2, 2])  # the self-entry does get the factor
    # duplicated rows of one set: the off-diagonal pair is the cross value, the diagonal the self value
    x = torch.cat([x1, x1[2:3]])
    k = _dense(kernel, x)
    assert torch.allclose(k[2, 4], k12[2, 2], rtol=1e-13)
    assert torch.allclose(k[4, 4], self_value, rtol=1e-13) and torch.allclose(k[2, 2], self_value, rtol=1e-13)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_blockwise_backend(kind):
    """Blocks on the diagonal of a symmetric kernel get the factor on their diagonal, the others none."""
    net, x, z = _mlp(), _inputs(9), _inputs(5, seed=3)
    hyper = Hyperparameters.collect(net, like=x)
    full, cross = _dense(KERNELS[kind](net), x), _dense(KERNELS[kind](net), x, z)
    with torch.no_grad():
        (k,) = kernel_matmul(net, x, x, hyper, torch.eye(9, dtype=torch.float64), kinds=(kind,), block_elements=12)
        (c,) = kernel_matmul(net, x, z, hyper, torch.eye(5, dtype=torch.float64), kinds=(kind,), block_elements=12)
    assert torch.allclose(k, full, rtol=1e-13, atol=0)
    assert torch.allclose(c, cross, rtol=1e-13, atol=0)


def test_posterior_uses_the_train_mode_kernels():
    """TrainedEnsemble at t = ∞: NTK regression with Θ(X, X) (factor on its diagonal) and Θ(X*, X) (none)."""
    net, x, xs = _mlp(), _inputs(6), _inputs(3, seed=4)
    y = torch.sin(x.sum(-1))
    post = gpntk.TrainedEnsemble(net, x, y)
    mean, cov = post.moments(xs, t=math.inf, regime="ntk")
    kernel = gpntk.NTKKernel(net)
    theta, cross = _dense(kernel, x), _dense(kernel, xs, x)
    assert torch.allclose(mean, cross @ torch.linalg.solve(theta, y), rtol=1e-8)
    assert torch.isfinite(cov).all()
    # the training points themselves are "the same inputs" as the training set: the fit is exact
    train_mean, _ = post.moments(x, t=math.inf, regime="ntk")
    assert torch.allclose(train_mean, y, atol=1e-8)


def test_float32_and_gradients():
    kernel = gpntk.NTKKernel(_mlp())
    x = _inputs(5)
    single = _dense(kernel, x.float())
    assert single.dtype == torch.float32 and torch.isfinite(single).all()
    assert torch.allclose(single.double(), _dense(kernel, x), rtol=1e-4)
    x1 = _inputs(3, seed=6).requires_grad_(True)
    x2 = _inputs(2, seed=7)
    assert torch.autograd.gradcheck(lambda a: kernel(a, x2).to_dense(), (x1,))
    # diag=True of the same inputs: differentiable through the per-point recursion
    assert torch.autograd.gradcheck(lambda a: kernel(a, diag=True), (x1,))


def test_refusals():
    with pytest.raises(gpntk.ArchitectureError, match=r"Dropout\(p=0.3\) cannot be a first layer.*network's inputs"):
        gpntk.NTKKernel(L.serial(L.Dropout(0.3), L.Dense(), L.ReLU(), L.Dense()))
    with pytest.raises(gpntk.ArchitectureError, match="cannot be a first layer.*outputs of AvgPool"):
        pooled_inputs = L.serial(L.AvgPool(2), L.Dropout(0.3), L.Conv(2), L.GlobalAvgPool(), L.Dense())
        gpntk.NTKKernel(pooled_inputs, input_shape=(1, 6))
    with pytest.raises(gpntk.ArchitectureError, match="cannot be a first layer"):
        L.serial(L.Dropout(0.3), L.Dense()).finite(8, in_features=3)
    with pytest.raises(gpntk.ArchitectureError, match="ReLU needs Gaussian pre-activations.*not Dropout"):
        gpntk.NTKKernel(L.serial(L.Dense(), L.Dropout(0.3), L.ReLU(), L.Dense()))
    for bad in (1.0, 1.5, -0.1, math.nan, math.inf, "0.5", True, 1j):
        with pytest.raises(gpntk.ArchitectureError, match="Dropout p"):
            L.Dropout(bad)
    assert L.Dropout(0).p == 0.0 and repr(L.Dropout(0.25)) == "Dropout(p=0.25)"


def test_p_zero_is_no_dropout():
    x = _inputs(5)
    assert torch.equal(_dense(gpntk.NTKKernel(_mlp(p=0.0)), x), _dense(gpntk.NTKKernel(_mlp(dropout=False)), x))


def test_finite_module_and_backends_that_decline():
    """``net.finite`` holds torch.nn.Dropout(p) in train mode; KeOps and the structured NTK decline it."""
    net = _mlp()
    model = net.finite(16, in_features=4).double()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(m.p == P and m.training for m in drops)
    assert not structured_applicable(model)
    x = _inputs(3)
    torch.manual_seed(0)
    ntk = gpntk.empirical_ntk(model, x)  # the full-Jacobian algorithm: one mask per row
    assert ntk.shape == (3, 3) and torch.isfinite(ntk).all()
    with pytest.raises(ValueError, match="structured"):
        gpntk.empirical_ntk(model, x, method="structured")
    from gpntk.contrib.keops import keops_supported

    reason = keops_supported(net)
    assert reason is not None and "Dropout" in reason
    reason = keops_supported(L.serial(L.Conv(2), L.ReLU(), L.SumPool(2), L.GlobalSumPool(), L.Dense()), (1, 6))
    assert reason is not None


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_batched_inputs(kind):
    """Batch dimensions (coincident pairs as masks) give each batch member's own kernels."""
    kernel = KERNELS[kind](_mlp())
    x1 = torch.stack([_inputs(4), _inputs(4, seed=8)])
    x2 = torch.cat([_inputs(2, seed=9).expand(2, 2, 4), x1[:, 1:2]], dim=-2)  # row 2 of x2 is row 1 of x1
    k11, k12 = _dense(kernel, x1), _dense(kernel, x1, x2)
    for b in range(2):
        assert torch.allclose(k11[b], _dense(kernel, x1[b]), rtol=1e-13)
        assert torch.allclose(k12[b], _dense(kernel, x1[b], x2[b]), rtol=1e-13)
    assert (k11[:, 1, 1] - k12[:, 1, 2] > 0.05 * k12[:, 1, 2].abs()).all()


def _pooled_dropout_net():
    return L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.SumPool(2, 1, "same"), L.Dropout(P),
        L.Conv(2, weight_variance=1.0, bias_variance=0.1), L.Erf(), L.GlobalSumPool(), L.Dense(0.5, 0.1),
    )


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("spatial", [False, True])
def test_batched_hyperparameters_and_their_gradients(kind, spatial):
    """A batch of weight variances gives each member's kernel; d K / d raw σw² matches central differences."""
    make, shape, d = (_pooled_dropout_net, (2, 5), 10) if spatial else (_mlp, None, 4)
    x, z = _inputs(4, d), _inputs(3, d, seed=11)
    kernel = KERNELS[kind](make(), input_shape=shape, batch_shape=torch.Size([2]))
    kernel.net.layers[0].weight_variance = torch.tensor([[[1.0]], [[2.5]]])
    batched = _dense(kernel, x)
    assert batched.shape == (2, 4, 4)
    for b, value in enumerate((1.0, 2.5)):
        single = make()
        single.layers[0].weight_variance = value
        assert torch.allclose(batched[b], _dense(KERNELS[kind](single, input_shape=shape), x), rtol=1e-13)
    net = make().double()
    first = net.layers[0]
    single_kernel = KERNELS[kind](net, input_shape=shape)

    def loss():
        return (single_kernel(x).to_dense().sum() + single_kernel(x, z).to_dense().sum()
                + single_kernel(x, diag=True).sum())

    value = loss()
    value.backward()
    grad = first.raw_weight_variance.grad.clone()
    h = 1e-6
    with torch.no_grad():
        first.raw_weight_variance += h
        up = loss()
        first.raw_weight_variance -= 2 * h
        down = loss()
        first.raw_weight_variance += h
    assert torch.allclose(grad.sum(), (up - down) / (2 * h), rtol=1e-7)
