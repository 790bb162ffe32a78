"""Identifiability of ``ScaleKernel(NTKKernel(mlp(...)))``: the flat directions, and default priors fixing them.

For a ReLU network of L ``Dense`` layers without bias, NNGP and NTK are exactly (σw²)^L times
their value at σw² = 1 (positive homogeneity of ReLU's dual maps), so only outputscale·(σw²)^L is
identified; with a bias the likelihood is nearly flat along σw² → ∞ with σb²/σw² fixed. A
BoTorch fit drifts along it; :func:`gpntk.layers.default_priors` holds the variances near their
initial values and leaves the overall scale to the outputscale.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import gpntk
from gpntk import layers as L

DTYPE = torch.float64


def _points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.rand(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel_class", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_bias_free_relu_kernels_scale_as_a_power_of_the_weight_variance(kernel_class):
    # the flat direction behind the drift, checked on the dense matrices: K(a σw²) = a^L K(σw²)
    depth, scale = 2, 3.7
    x = _points(6, 3, seed=0) - 0.5
    kernel = kernel_class(L.mlp(depth, "relu", weight_variance=1.3, bias_variance=0.0)).to(DTYPE)
    with torch.no_grad():
        before = kernel(x).to_dense()
        kernel.weight_variance = 1.3 * scale
        after = kernel(x).to_dense()
    torch.testing.assert_close(after, scale ** (depth + 1) * before, rtol=1e-10, atol=0.0)
    # with a bias the scaling is broken (the biases are identified, if weakly)
    biased = kernel_class(L.mlp(depth, "relu", weight_variance=1.3, bias_variance=0.1)).to(DTYPE)
    with torch.no_grad():
        k1 = biased(x).to_dense()
        biased.weight_variance, biased.bias_variance = 1.3 * scale, 0.1 * scale
        k2 = biased(x).to_dense()
    assert (k2 / k1).std() > 1e-2


def _smooth_problem(seed: int, n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    x = _points(n, 2, seed)
    return x, (torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]))[:, None]


def _fit(net: L.Layer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    pytest.importorskip("botorch")  # an optional extra: gpntk[botorch]
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    covar = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net))
    model = SingleTaskGP(x, y, covar_module=covar)
    fit_gpytorch_mll(gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model))
    kernel = covar.base_kernel
    return kernel.weight_variance.item(), kernel.bias_variance.item(), covar.outputscale.item()


def test_default_priors_make_fitted_hyperparameters_interpretable():
    depth = 3  # four Dense layers, one shared pair
    free, regularised = [], []
    for seed in range(3):
        x, y = _smooth_problem(seed)
        free.append(_fit(L.mlp(depth, "relu"), x, y))
        regularised.append(_fit(L.default_priors(L.mlp(depth, "relu")), x, y))
    # without priors the fits drift along the flat direction: large σw², collapsing outputscale
    assert max(w for w, _, _ in free) > 20.0
    assert min(s for _, _, s in free) < 1e-4
    # with them: σw² near its critical value 2, a small positive σb², an O(1) outputscale
    # (the targets are standardised by SingleTaskGP's outcome transform)
    for weight, bias, outputscale in regularised:
        assert 0.5 < weight < 4.0
        assert 1e-3 < bias < 1.0
        assert 0.3 < outputscale < 30.0
    # both land on the same identified product outputscale·(σw²)^L (within a factor 3)
    for (w0, _, s0), (w1, _, s1) in zip(free, regularised):
        assert 1 / 3 < (s0 * w0 ** (depth + 1)) / (s1 * w1 ** (depth + 1)) < 3
