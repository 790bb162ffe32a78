"""A kernel whose exact values exceed the dtype's range raises; it never returns NaN or inf.

Inputs are checked for NaN and infinities up front, so a non-finite kernel value from finite
inputs is an overflow inside the recursion (an ``Exp`` activation on large variances, inputs of
scale 1e160 in float64 or 1e20 in float32). Before, these came back as NaN matrices without a word.
"""

from __future__ import annotations

import pytest
import torch

import gpntk
from gpntk import layers as L


def _exp_net():
    """Depth 2 with Exp: the second layer's variance is exp(~5000), beyond float64."""
    return L.mlp(2, "exp")


def _relu_net():
    return L.mlp(2, "relu")


def _points(n, scale=1.0, dtype=torch.float64, seed=0):
    return torch.randn(n, 4, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(dtype) * scale


CASES = {
    "exp-float64": (_exp_net, 1.0, torch.float64),
    "relu-float64-1e160": (_relu_net, 1e160, torch.float64),
    "relu-float32-1e20": (_relu_net, 1e20, torch.float32),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel_type", [gpntk.NTKKernel, gpntk.NNGPKernel], ids=["ntk", "nngp"])
@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_overflow_raises(case, kernel_type, backend):
    build, scale, dtype = CASES[case]
    x = _points(6, scale, dtype)
    assert torch.isfinite(x).all()
    kernel = kernel_type(build(), backend=backend, block_elements=16)  # several blocks
    with pytest.raises(FloatingPointError, match="overflowed"):
        kernel(x).to_dense()
    with pytest.raises(FloatingPointError, match="overflowed"):
        kernel(x, diag=True)
    with pytest.raises(FloatingPointError, match="overflowed"):
        kernel(x, _points(3, scale, dtype, seed=1), diag=False).to_dense()
    if backend == "blockwise":
        with pytest.raises(FloatingPointError, match="overflowed"):
            kernel(x) @ torch.ones(6, 2, dtype=dtype)


def test_remedy_names_float64_only_for_lower_precision():
    kernel = gpntk.NTKKernel(_relu_net())
    with pytest.raises(FloatingPointError, match="Use float64"):
        kernel(_points(4, 1e20, torch.float32)).to_dense()
    with pytest.raises(FloatingPointError) as info:
        kernel(_points(4, 1e160)).to_dense()
    assert "float64," not in str(info.value)


def test_neural_kernel_sum_and_trained_ensemble_raise():
    x = _points(5)
    with pytest.raises(FloatingPointError, match="overflowed"):
        gpntk.NeuralKernelSum(_exp_net())(x).to_dense()
    ensemble = gpntk.TrainedEnsemble(_exp_net(), x, torch.zeros(5))
    with pytest.raises(FloatingPointError, match="overflowed"):
        ensemble(_points(3, seed=2), t=1.0)


def test_large_but_finite_kernels_are_returned():
    """Just below the overflow the values are large, finite and returned unchanged."""
    x = _points(5, 1e150)
    K = gpntk.NTKKernel(_relu_net())(x).to_dense()
    assert torch.isfinite(K).all() and K.abs().max() > 1e290


def test_finiteness_check_of_values_whose_sum_overflows():
    """The check sums a kernel first (one pass): a sum past the dtype's range is no error by itself,
    a NaN or an infinity anywhere is."""
    from gpntk.kernels.engine import check_finite_kernel

    huge = torch.full((3, 4), 1e308, dtype=torch.float64)
    assert not torch.isfinite(huge.sum())
    check_finite_kernel(huge, -huge)  # finite values: returned without an error
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = torch.ones(3, 4, dtype=torch.float64)
        broken[1, 2] = bad
        with pytest.raises(FloatingPointError, match="1 of 12 values"):
            check_finite_kernel(broken)
        with pytest.raises(FloatingPointError, match="1 of 16 values"):  # and a sum past the range
            check_finite_kernel(torch.cat([huge[:1], broken]))
