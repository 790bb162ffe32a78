"""Kernel values and gradients at extreme variance scales (the BoTorch NaN of docs/bayesopt.md).

A hyperparameter fit can drive the raw σw², σb² and output scale to large negative values (the
L-BFGS-B line search of ``examples/bayesopt_botorch.py``, Hartmann-6 seed 6 at 21 points, tried
σw² = 1.2e-262, σb² = 0). The pre-activation variances of the second layer then were positive but
so small that :math:`q_{11} q_{22}` underflowed to 0, the correlation came out as 0/0 = NaN, the
marginal log likelihood was NaN, the line search broke down and the fit ended at a degenerate
point whose posterior gave NaN acquisition gradients. Huge variances overflowed the product to
infinity instead (a correlation of 0, silently wrong). These tests fail without the power-of-two
scaling in :func:`gpntk.activations.base.correlation`.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.activations.base import correlation

CLOSED_FORM = ["relu", "abs", "leaky_relu", "sign", "erf", "gelu"]


@pytest.mark.parametrize("dtype, scale", [
    (torch.float64, 1e-200), (torch.float64, 1e-310), (torch.float64, 1e200),
    (torch.float32, 1e-25), (torch.float32, 1e-42), (torch.float32, 1e25),
])
def test_correlation_at_tiny_and_huge_variances(dtype, scale):
    q11 = torch.tensor([[1.0], [2.0], [0.5]], dtype=torch.float64)
    q22 = torch.tensor([[1.0, 3.0, 0.5, 2.0]], dtype=torch.float64)
    q12 = torch.tensor([[0.0, 0.5, -0.3, 1.0], [1.0, -2.0, 0.0, 2.0], [0.5, 0.1, 0.5, -0.2]], dtype=torch.float64)
    expected = (q12 / (q11 * q22).sqrt()).clamp(-1, 1)
    a, b, c = (t.mul(scale).to(dtype).requires_grad_(True) for t in (q11, q12, q22))
    rho, sqrt_prod = correlation(a, b, c)
    assert torch.isfinite(rho).all() and torch.isfinite(sqrt_prod).all()
    # subnormal variances carry few significant bits
    tol = 1e-3 if scale * 0.5 < torch.finfo(dtype).tiny else (1e-12 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(rho.double(), expected, rtol=tol, atol=tol)
    if scale * 0.5 >= torch.finfo(dtype).tiny:  # else dρ/dq ~ 1/q itself overflows
        rho.sum().backward()
        for t in (a, b, c):
            assert torch.isfinite(t.grad).all()


def test_correlation_bitwise_unchanged_in_the_normal_range():
    """Power-of-two scaling is exact: the same bits as q12 / sqrt(q11 q22), ρ = 1 for duplicates."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64) * torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None]
    q = x @ x.T
    d = q.diagonal()
    rho, _ = correlation(d[:, None], q, d[None, :])
    assert torch.equal(rho, (q / (d[:, None] * d[None, :]).sqrt()).clamp(-1, 1))
    assert torch.equal(rho, rho.T)
    assert torch.equal(rho.diagonal(), torch.ones(7, dtype=torch.float64))


def _kernel(kind, activation, weight_variance, bias_variance, dtype, depth=2):
    net = L.mlp(depth, activation, weight_variance=weight_variance, bias_variance=bias_variance)
    cls = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel
    return cls(net).to(dtype)


@pytest.mark.parametrize("activation", CLOSED_FORM)
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize(
    "dtype, weight_variance", [(torch.float64, 1e-85), (torch.float64, 1.2e-262), (torch.float32, 1e-12)]
)
def test_vanishing_weight_variance_is_finite(kind, activation, dtype, weight_variance):
    """σw² so small that the second layer's q11 q22 underflows: finite values and gradients."""
    torch.manual_seed(1)
    kernel = _kernel(kind, activation, weight_variance, 0.0, dtype)
    x = torch.randn(5, 3, dtype=dtype).requires_grad_(True)
    x2 = torch.cat(
        [x.detach()[:2], torch.zeros(1, 3, dtype=dtype), 2 * x.detach()[2:3], torch.randn(2, 3, dtype=dtype)]
    )
    with gpytorch.settings.lazily_evaluate_kernels(False):
        for K in (kernel(x).to_dense(), kernel(x, x2).to_dense(), kernel(x, diag=True)):
            assert torch.isfinite(K).all(), K
            kernel.zero_grad()
            x.grad = None
            K.sum().backward()
            assert x.grad is None or torch.isfinite(x.grad).all()
            for name, p in kernel.named_parameters():
                assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("activation", ["relu", "abs", "leaky_relu", "sign"])
def test_float32_large_weight_variance_matches_float64(activation):
    """σw² = 1e10: second-layer variances ~1e20, q11 q22 ~1e40 overflows float32 (was ρ = 0)."""
    torch.manual_seed(2)
    x = torch.randn(6, 3, dtype=torch.float64)
    ref = _kernel("ntk", activation, 1e10, 0.1, torch.float64)(x).to_dense()
    out = _kernel("ntk", activation, 1e10, 0.1, torch.float32)(x.float()).to_dense()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=0)


def test_bayesopt_degenerate_line_search_point_has_finite_mll():
    """The trial point of the failing BoTorch fit: ScaleKernel(NTK) with raw hyperparameters
    (noise 12.0, outputscale -683.25, σw² -603.09, σb² -1083.04). The MLL was NaN."""
    torch.manual_seed(6)
    train_x = torch.rand(21, 6, dtype=torch.float64) * 2 - 1
    train_y = torch.randn(21, dtype=torch.float64)
    # per-input scales so that some second-layer variances are subnormal instead of zero
    train_x = train_x * torch.logspace(0, 120, 21, dtype=torch.float64)[:, None]
    covar = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(L.mlp(2, "relu"))).to(torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(torch.float64)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(train_x, train_y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = covar

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = GP().to(torch.float64)
    dense = next(m for m in covar.modules() if isinstance(m, L.Dense))
    with torch.no_grad():
        likelihood.noise_covar.raw_noise.fill_(12.0034)
        covar.raw_outputscale.fill_(-683.2495)
        dense.raw_weight_variance.fill_(-603.0885)
        dense.raw_bias_variance.fill_(-1083.0438)
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = covar.base_kernel(train_x).to_dense()
        assert torch.isfinite(K).all()
        loss = -mll(model(train_x), train_y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
