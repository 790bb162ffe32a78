"""Convolution and pooling windows larger than the input, under ``padding="same"`` / ``"circular"``.

The windows are those of any size: ``"same"`` pads :math:`\\max((\\lceil L/s\\rceil - 1)s + k - L, 0)`
zeros, the smaller half before; ``"circular"`` pads the same amounts by wrapping around, padded
position ``j`` holding input position ``(j - before) mod L`` (``numpy.pad(mode="wrap")``, Neural
Tangents' circular padding), so a window longer than the input sees some positions several times,
each through its own filter tap. ``"valid"`` keeps refusing them (no full window fits; see
``tests/core/test_errors.py``).

Checked: the finite module against an explicit convolution of the ``numpy.pad``-ed input (and
against ``torch.nn.functional.conv1d`` with zero padding for ``"same"``); the kernel against the
exact covariance of the finite convolution over its random weights (the Jacobian of one output
channel with respect to its standard normal weights and bias, which the channel is linear in),
through ``GlobalAvgPool`` (every pair of positions) and ``Flatten`` (the diagonal), 1-D and 2-D,
strides 1 and 2, windows wrapping more than once; ``diag=True``; and a Monte Carlo average of
finite networks with a ReLU after the large window.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpntk
from gpntk import layers as L
from gpntk.core.finite import NTKConv
from gpntk.core.spatial import circular_index, window_geometry

WV, BV = 1.7, 0.2


def _conv_module(model: torch.nn.Module) -> NTKConv:
    return next(m for m in model.modules() if isinstance(m, NTKConv))


def _numpy_conv(x: np.ndarray, weight: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...],
                padding: str) -> np.ndarray:
    """``(C, *spatial)`` convolved with ``weight`` ``(O, C, *kernel)`` after ``numpy.pad``, no bias."""
    pads = []
    for length, k, s in zip(x.shape[1:], kernel, stride):
        w = window_geometry(length, k, s, padding)
        pads.append((w.before, w.after))
    padded = np.pad(x, [(0, 0), *pads], mode="wrap" if padding == "circular" else "constant")
    out_shape = [(p - k) // s + 1 for p, k, s in zip(padded.shape[1:], kernel, stride)]
    out = np.zeros((weight.shape[0], *out_shape))
    for index in np.ndindex(*out_shape):
        window = tuple(slice(i * s, i * s + k) for i, k, s in zip(index, kernel, stride))
        patch = padded[(slice(None), *window)]
        out[(slice(None), *index)] = np.tensordot(weight, patch, axes=patch.ndim)
    return out


@pytest.mark.parametrize("padding", ["same", "circular"])
@pytest.mark.parametrize("shape, kernel, stride", [
    ((2, 3), (5,), (1,)), ((2, 3), (9,), (1,)), ((1, 4), (11,), (2,)), ((2, 2, 3), (5, 4), (1, 2)),
])
def test_finite_module_is_the_padded_convolution(padding, shape, kernel, stride, float64_default):
    net = L.serial(L.Conv(kernel, stride, padding, WV, 0.0), L.Flatten(), L.Dense())
    model = net.finite(3, input_shape=shape, generator=torch.Generator().manual_seed(0))
    conv = _conv_module(model)
    x = torch.randn(2, *shape)
    ours = conv(x)
    weight = conv.linear.weight.detach().reshape(3, *shape[:1], *kernel).numpy()
    scale = math.sqrt(WV / (shape[0] * math.prod(kernel)))
    for i in range(2):
        expected = scale * _numpy_conv(x[i].numpy(), weight, kernel, stride, padding)
        np.testing.assert_allclose(ours[i].detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    if padding == "same" and len(shape) == 2:
        w = window_geometry(shape[1], kernel[0], stride[0], "same")
        torch_conv = F.conv1d(F.pad(x, (w.before, w.after)), torch.from_numpy(weight), stride=stride[0])
        torch.testing.assert_close(ours, scale * torch_conv, rtol=1e-12, atol=1e-12)


def test_circular_index_wraps_like_numpy_pad():
    for length, k, s in [(3, 9, 1), (2, 8, 3), (4, 4, 1), (1, 6, 1)]:
        w = window_geometry(length, k, s, "circular")
        expected = np.pad(np.arange(length), (w.before, w.after), mode="wrap")
        assert circular_index(length, w).tolist() == expected.tolist()
    assert window_geometry(3, 9, 1, "circular").before == 4  # more than the input: wraps more than once


def _exact_feature_covariance(conv: NTKConv, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """E over the weights of ``h_p(x1) h_p'(x2)`` for output channel 0: ``J(x1) J(x2)ᵀ``
    ``(n1, *out, n2, *out)``, the channel being linear in its standard normal weights and bias."""

    def jacobian(x: torch.Tensor) -> torch.Tensor:
        patches = _patches_of(conv, x)  # (n, *out, C·|w|)
        params = {name: p.detach() for name, p in conv.linear.named_parameters()}

        def channel(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(conv.linear, p, (patches,))[..., 0]

        grads = torch.func.jacrev(channel)(params)
        rows = patches.shape[:-1]
        return torch.cat([g.reshape(*rows, -1) for g in grads.values()], dim=-1)

    return torch.tensordot(jacobian(x1), jacobian(x2), dims=([-1], [-1]))


def _patches_of(conv: NTKConv, x: torch.Tensor) -> torch.Tensor:
    """The input of ``conv.linear``: ``(n, *out, C·|w|)``, recorded by a forward hook."""
    seen: list[torch.Tensor] = []
    handle = conv.linear.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        conv(x)
    finally:
        handle.remove()
    return seen[0].detach()


@pytest.mark.parametrize("padding", ["same", "circular"])
@pytest.mark.parametrize("shape, kernel, stride", [
    ((2, 3), 5, 1), ((2, 3), 9, 1), ((1, 4), 11, 2), ((2, 2, 3), (5, 4), (1, 2)),
])
def test_kernel_is_the_finite_convolutions_covariance(padding, shape, kernel, stride, float64_default):
    x1 = torch.randn(3, math.prod(shape))
    x2 = torch.randn(2, math.prod(shape))
    conv_layer = L.Conv(kernel, stride, padding, WV, BV)
    model = L.serial(conv_layer, L.Flatten(), L.Dense()).finite(2, input_shape=shape)
    conv = _conv_module(model)
    t1, t2 = x1.reshape(-1, *shape), x2.reshape(-1, *shape)
    cov = _exact_feature_covariance(conv, t1, t2)  # (n1, *out, n2, *out)
    m = len(shape) - 1
    n1, n2 = len(x1), len(x2)
    out = cov.shape[1:1 + m]
    positions = math.prod(out)
    cov = cov.reshape(n1, positions, n2, positions)
    pooled = cov.mean(dim=(1, 3))  # GlobalAvgPool then Dense(1, 0): every pair of positions
    flat = cov.diagonal(dim1=1, dim2=3).mean(-1)  # Flatten then Dense(1, 0): the diagonal
    with torch.no_grad():
        for head, expected in ((L.GlobalAvgPool(), pooled), (L.Flatten(), flat)):
            net = L.serial(L.Conv(kernel, stride, padding, WV, BV), head, L.Dense(1.0, 0.0))
            kernel_fn = gpntk.NNGPKernel(net, input_shape=shape)
            torch.testing.assert_close(kernel_fn(x1, x2).to_dense(), expected, rtol=1e-12, atol=1e-12)
            ntk = gpntk.NTKKernel(net, input_shape=shape)
            torch.testing.assert_close(ntk(x1, diag=True), ntk(x1).to_dense().diagonal(), rtol=1e-12, atol=1e-13)


def test_pooling_windows_larger_than_the_input(float64_default):
    """AvgPool with a window longer than the input: kernel against the finite network's features."""
    shape = (1, 3)
    for padding in ("same", "circular"):
        net = L.serial(L.Conv(1, 1, "same", 1.0, 0.0), L.AvgPool(5, 1, padding), L.Flatten(), L.Dense(1.0, 0.0))
        x = torch.randn(4, 3)
        with torch.no_grad():
            k = gpntk.NNGPKernel(net, input_shape=shape)(x).to_dense()
        # by hand: Conv(1) keeps x·x'/C per position; the pooling averages the padded windows
        w = window_geometry(3, 5, 1, padding)
        idx = np.arange(-w.before, 3 + w.after)
        padded = x.numpy()[:, idx % 3] * ((idx >= 0) & (idx < 3) | (padding == "circular"))
        pooled = np.stack([padded[:, p:p + 5].mean(1) for p in range(3)], axis=1)
        np.testing.assert_allclose(k.numpy(), pooled @ pooled.T / 3, rtol=1e-12)


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_monte_carlo_through_a_relu(kind, float64_default):
    """Circular window 7 on length 3 (wrapping twice), ReLU, GlobalAvgPool: width 256, 32 networks.

    Measured relative Frobenius errors 0.7 % (NTK) / 0.9 % (NNGP); the twin with zero padding
    (``"same"``, the wrapped positions left out) is 85-90 % away. (A circular window covering the
    input several times is close to the plain circular ``Conv(3)``, 1 % apart here: only the
    multiplicities of the positions differ; the exact covariance test above pins them down.)
    """
    shape = (2, 3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    x[1] = -0.5 * x[0] + 0.3 * x[1]

    def net(padding: str) -> L.Serial:
        return L.serial(L.Conv(7, 1, padding, 2.0, 0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1))

    mean, _ = gpntk.monte_carlo_kernel(net("circular"), x, width=256, n_samples=32, kind=kind, seed=3,
                                       input_shape=shape, out_features=1 if kind == "ntk" else 256)
    cls = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    with torch.no_grad():
        right = cls(net("circular"), input_shape=shape)(x).to_dense()
        twin = cls(net("same"), input_shape=shape)(x).to_dense()
    error = ((mean - right).norm() / right.norm()).item()
    wrong = ((mean - twin).norm() / twin.norm()).item()
    assert error < 0.04, f"{kind}: {error:.3f}"
    assert wrong > 10 * error, f"{kind}: twin {wrong:.3f} vs {error:.3f}"


def _large_window_net() -> L.Serial:
    return L.serial(
        L.Conv(7, 1, "circular", 2.0, 0.1), L.ReLU(), L.Conv((5,), 2, "same", 1.5, 0.1), L.ReLU(),
        L.GlobalAvgPool(), L.Dense(1.0, 0.1),
    )


def test_structured_empirical_ntk_blockwise_backend_and_float32(float64_default):
    """The structured empirical NTK (a conv is an NTKLinear on patches) equals the full Jacobian one;
    the blockwise backend equals the dense one; float32 stays finite."""
    shape = (2, 3)
    x = torch.randn(4, 6)
    model = _large_window_net().finite(6, input_shape=shape, out_features=2, generator=torch.Generator().manual_seed(1))
    structured = gpntk.empirical_ntk(model, x, x[:2], method="structured")
    full = gpntk.empirical_ntk(model, x, x[:2], method="jacobian")
    torch.testing.assert_close(structured, full, rtol=1e-10, atol=1e-12)
    kernel = gpntk.NTKKernel(_large_window_net(), input_shape=shape)
    with torch.no_grad():
        dense = kernel(x).to_dense()
        with gpntk.settings.kernel_backend("blockwise"):
            blockwise = kernel(x) @ torch.eye(4)
        torch.testing.assert_close(blockwise, dense, rtol=1e-12, atol=1e-12)
        k32 = gpntk.NTKKernel(_large_window_net().float(), input_shape=shape)(x.float()).to_dense()
    assert k32.dtype == torch.float32 and torch.isfinite(k32).all()
    torch.testing.assert_close(k32.double(), dense, rtol=1e-4, atol=1e-5)
