"""SumPool and GlobalSumPool: window sums without normalisation (issue 16).

The reference cases (``a2_sumpool*``) run in ``tests/test_reference.py``; here: the kernels are
those of ``AvgPool`` / ``GlobalAvgPool`` times the squared window size / number of positions, the
finite modules are window sums (against torch's pooling), ``diag=True`` and the blockwise backend
agree with the dense matrix, float32 stays finite, and bad placements and arguments are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.blockwise import kernel_matmul

KERNELS = {"nngp": gpntk.NNGPKernel, "ntk": gpntk.NTKKernel}


def _net(pool, global_pool):
    return L.serial(
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(), pool,
        L.Conv(2, padding="circular", weight_variance=1.5, bias_variance=0.1), L.Erf(), global_pool,
        L.Dense(1.0, 0.1),
    )


def _inputs(n, shape, seed=0, dtype=torch.float64):
    return torch.randn(n, math.prod(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


POOLS = [
    ((2, 7), 3, 1, "same"),
    ((2, 7), 2, None, "circular"),
    ((2, 7), 3, 2, "valid"),
    ((1, 5, 4), (2, 3), (1, 2), "same"),
    ((1, 5, 4), 2, None, "valid"),
]


@pytest.mark.parametrize("shape, size, stride, padding", POOLS)
def test_sum_pool_is_avg_pool_times_window(shape, size, stride, padding):
    """SumPool maps the state as |w|^2 AvgPool; GlobalSumPool as P^2 GlobalAvgPool (exact to rounding)."""
    x1, x2 = _inputs(3, shape), _inputs(2, shape, seed=1)
    window = math.prod(size if isinstance(size, tuple) else (size,) * (len(shape) - 1))
    summed = _pooled_state(L.SumPool(size, stride, padding), shape, x1, x2)
    averaged = _pooled_state(L.AvgPool(size, stride, padding), shape, x1, x2)
    for name in ("cov12", "var1", "var2", "ntk12"):
        assert torch.allclose(getattr(summed, name), window**2 * getattr(averaged, name), rtol=1e-13), name
    positions = math.prod(summed.layout.spatial)
    for kind, kernel_class in KERNELS.items():
        with torch.no_grad():
            k_sum = kernel_class(_net(L.AvgPool(size, stride, padding), L.GlobalSumPool()), input_shape=shape)(x1, x2)
            k_avg = kernel_class(_net(L.AvgPool(size, stride, padding), L.GlobalAvgPool()), input_shape=shape)(x1, x2)
        readout_bias = 0.1  # the readout Dense(1.0, 0.1) adds it to both
        expected = positions**2 * (k_avg.to_dense() - readout_bias) + readout_bias
        assert torch.allclose(k_sum.to_dense(), expected, rtol=1e-12), kind


def _pooled_state(pool, shape, x1, x2):
    from gpntk.core.state import KernelState

    front = L.serial(L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU())
    net = L.serial(front, pool)
    hyper = Hyperparameters(net, Hyperparameters.collect(net, like=x1))
    state = KernelState.from_inputs(
        x1, x2, diag=False, same_inputs=False, track_ntk=True, input_shape=shape, full=True
    )
    return net.kernel_map(state, hyper)


@pytest.mark.parametrize("shape, size, stride, padding", POOLS)
def test_finite_sum_pooling_sums_windows(shape, size, stride, padding):
    """The finite module sums each window (zeros or wrap-around outside), as torch's avg pooling times |w|."""
    layer = L.SumPool(size, stride, padding)
    module, out_shape = layer.build_finite(shape, 4, 1, False)
    x = torch.randn(2, *shape, dtype=torch.float64)
    out = module(x)
    assert tuple(out.shape[1:]) == out_shape
    spatial = shape[1:]
    sizes = size if isinstance(size, tuple) else (size,) * len(spatial)
    strides = sizes if stride is None else (stride if isinstance(stride, tuple) else (stride,) * len(spatial))
    windows = layer.windows(spatial)
    pads = []
    for w in reversed(windows):
        pads += [w.before, w.after]
    padded = F.pad(x, pads, mode="circular" if padding == "circular" else "constant")
    pool = F.avg_pool1d if len(spatial) == 1 else F.avg_pool2d
    expected = pool(padded, sizes, strides) * math.prod(sizes)
    assert torch.allclose(out, expected, rtol=1e-13, atol=1e-13)
    glob, glob_shape = L.GlobalSumPool().build_finite(shape, 4, 1, False)
    assert glob_shape == (shape[0],)
    assert torch.allclose(glob(x), x.flatten(2).sum(-1), rtol=1e-13)


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_diag_blockwise_and_float32(kind):
    shape = (2, 7)
    net = _net(L.SumPool(3, 1, "same"), L.GlobalSumPool())
    x = _inputs(6, shape)
    kernel = KERNELS[kind](net, input_shape=shape)
    with torch.no_grad():
        full = kernel(x).to_dense()
        diag = kernel(x, diag=True)
        assert torch.allclose(diag, full.diagonal(), rtol=1e-12)
        hyper = Hyperparameters.collect(net, like=x)
        eye = torch.eye(6, dtype=torch.float64)
        (blockwise,) = kernel_matmul(net, x, x, hyper, eye, kinds=(kind,), input_shape=shape, block_elements=200)
        assert torch.allclose(blockwise, full, rtol=1e-12)
        single = kernel(x.float()).to_dense()
    assert single.dtype == torch.float32 and torch.isfinite(single).all()
    assert torch.allclose(single.double(), full, rtol=1e-4)


def test_inputs_gradcheck():
    """The kernel is differentiable in the inputs through the window sums (finite differences)."""
    shape = (2, 5)
    net = _net(L.SumPool(2, 1, "circular"), L.GlobalSumPool())
    kernel = gpntk.NTKKernel(net, input_shape=shape)
    x2 = _inputs(2, shape, seed=3)
    x1 = _inputs(2, shape, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: kernel(a, x2).to_dense(), (x1,))


def test_refused_placements_and_arguments():
    with pytest.raises(gpntk.ArchitectureError, match="SumPool needs spatial inputs"):
        gpntk.NTKKernel(L.serial(L.Dense(), L.ReLU(), L.SumPool(2), L.Dense()))
    with pytest.raises(gpntk.ArchitectureError, match="GlobalSumPool needs spatial inputs"):
        L.serial(L.Dense(), L.Flatten(), L.GlobalSumPool())
    with pytest.raises(gpntk.ArchitectureError, match="kernel_size"):
        L.SumPool(0)
    with pytest.raises(gpntk.ArchitectureError, match="stride"):
        L.SumPool(2, stride=-1)
    with pytest.raises(gpntk.ArchitectureError, match="padding"):
        L.SumPool(2, padding="reflect")
    with pytest.raises(gpntk.ArchitectureError, match="kernel_size"):
        gpntk.NTKKernel(L.serial(L.Conv(3), L.ReLU(), L.SumPool((2, 2)), L.Flatten(), L.Dense()), input_shape=(1, 6))
    assert repr(L.SumPool(2)) == "SumPool(kernel_size=2, stride=2, padding='valid')"
    assert repr(L.GlobalSumPool()) == "GlobalSumPool()"
