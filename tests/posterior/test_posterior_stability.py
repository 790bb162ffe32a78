"""The time-t posterior on exactly singular (PSD) training kernels, float32 and float64, t up to 1e16.

Two kinds of exactly singular training kernels, each with a reference computed another way in
float64:

* duplicated training inputs: gradient flow only sees the distinct inputs ``U`` with
  multiplicities ``M`` and mean targets ``ȳ`` (the loss is
  :math:`\\sum_u m_u (f(u) - \\bar y_u)^2` + const), so with :math:`S = M^{1/2} G_U M^{1/2}`
  (invertible) the mean is :math:`G(x, U) M^{1/2} S^{-1}(I - e^{-\\tau S}) M^{1/2} \\bar y` and
  the covariance follows from :math:`f_t(x) = f_0(x) - G(x, U) B_t (f_0(U) - \\bar y)`;
* a linear network (a single ``Dense``) on more points than features: the kernel is
  :math:`\\Phi \\Phi^\\top` with explicit features :math:`\\phi(x) = (\\sigma_w x / \\sqrt d, \\sigma_b)`,
  so :math:`\\mu_t = \\phi^\\top C^{-1}(I - e^{-\\tau C}) \\Phi^\\top Y` and
  :math:`\\Sigma_t(x, x) = \\phi^\\top e^{-2\\tau C} \\phi` with :math:`C = \\Phi^\\top \\Phi`.

Both solvers must follow the reference at every time (so the mean approaches its limit without
overshoot and variances stay >= 0) without warnings about negative variances.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.posterior import TrainedEnsemble

pytestmark = pytest.mark.usefixtures("float64_default")  # networks with float64 hyperparameters

TIMES = [0.0, 1.0, 1e2, 1e4, 1e6, 1e8, 1e10, 1e12, 1e14, 1e16, math.inf]
#: allowed error relative to the targets' / the prior's scale: float32 kernels carry ~1e-7 relative round-off,
#: amplified by the condition number (~1e2) of the reduced problem
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9}


def _phi_filter(s: torch.Tensor, tau: float) -> torch.Tensor:
    """(1 - e^{-τ s}) / s for s > 0 (the reference's eigenvalues are well away from zero)."""
    return 1 / s if math.isinf(tau) else -torch.expm1(-tau * s) / s


def _duplicated_problem(dtype, conflicting: bool, seed: int = 0):
    """6 distinct inputs in d = 3, each repeated 3 times (n = 18), targets repeated or conflicting."""
    g = torch.Generator().manual_seed(seed)
    unique = torch.randn(6, 3, generator=g, dtype=torch.float64).to(dtype).double()  # representable in dtype
    x = unique.repeat(3, 1)
    if conflicting:
        y = torch.randn(18, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(6, generator=g, dtype=torch.float64).repeat(3)
    test_x = torch.cat([torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype).double(), unique[:2]])
    return unique, x, y.to(dtype).double(), test_x


def _kernels(net, a, b):
    return (
        gpntk.NNGPKernel(net)(a, b).to_dense().detach(),
        gpntk.NTKKernel(net)(a, b).to_dense().detach(),
    )


def _duplicated_reference(net, unique, y, test_x, regime, times, learning_rate=1.0):
    """(means (T, m), variances (T, m)) of the reduced problem on the distinct inputs, float64."""
    n = y.shape[0]
    multiplicity = torch.full((unique.shape[0],), n // unique.shape[0], dtype=torch.float64)
    mean_y = y.reshape(-1, unique.shape[0]).mean(0)  # x = unique.repeat(r, 1): row i is unique[i % 6]
    nngp_uu, ntk_uu = _kernels(net, unique, unique)
    nngp_tu, ntk_tu = _kernels(net, test_x, unique)
    nngp_tt, ntk_tt = (k.diagonal() for k in _kernels(net, test_x, test_x))
    by_kind = {"nngp": (nngp_uu, nngp_tu, nngp_tt), "ntk": (ntk_uu, ntk_tu, ntk_tt)}
    dynamics, prior = {"ntk": ("ntk", "nngp"), "nngp": ("nngp", "nngp"), "ntkgp": ("ntk", "ntk")}[regime]
    g_uu, g_tu, _ = by_kind[dynamics]
    p_uu, p_tu, p_tt = by_kind[prior]
    root = multiplicity.sqrt()
    s_values, s_vectors = torch.linalg.eigh(root[:, None] * g_uu * root[None, :])
    assert s_values.min() > 1e-3 * s_values.max()  # the reduced problem is well conditioned
    means, variances = [], []
    for t in times:
        tau = learning_rate * t / n
        filtered = s_vectors @ torch.diag(_phi_filter(s_values, tau)) @ s_vectors.mT
        b = root[:, None] * filtered * root[None, :]  # B_t = M^½ S^-1 (I - e^{-τS}) M^½
        weights = g_tu @ b  # (m, u)
        means.append(weights @ mean_y)
        variances.append(p_tt - 2 * (weights * p_tu).sum(-1) + ((weights @ p_uu) * weights).sum(-1))
    return torch.stack(means), torch.stack(variances)


def _moments(post, test_x, dtype, regime):
    """Means and variances at every time, each time on its own (scalar t) and as one batch; no variance warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        means, variances = post.moments(test_x.to(dtype), torch.tensor(TIMES), regime, diag=True)
        full_means, covariances = post.moments(test_x.to(dtype), torch.tensor(TIMES), regime)
    bad = [w for w in caught if "variances were negative" in str(w.message)]
    assert not bad, [str(w.message) for w in bad]
    assert all(issubclass(w.category, gpntk.NumericalWarning) for w in caught), [str(w.message) for w in caught]
    mean_rounding = 64 * torch.finfo(dtype).eps * means.abs().max().item()
    torch.testing.assert_close(full_means, means, rtol=post.tolerance, atol=mean_rounding)
    rounding = 64 * torch.finfo(dtype).eps * variances.abs().max().item()
    torch.testing.assert_close(covariances.diagonal(dim1=-2, dim2=-1), variances, rtol=1e-5, atol=rounding)
    return means.double(), variances.double()


#: activations whose kernel of two identical inputs equals their self-kernel to round-off (ReLU-family NTKs
#: differ there by ~1e-4 (float32) / ~5e-10 (float64) relative: a kernel accuracy question of its own)
EXACT_AT_DUPLICATES = [(a, d) for a in ("erf", "gelu") for d in (torch.float32, torch.float64)]


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize("activation, dtype", EXACT_AT_DUPLICATES)
def test_duplicated_inputs_follow_the_reduced_problem_at_every_time(activation, dtype, conflicting, solver):
    net = L.mlp(2, activation, 2.0, 0.1)
    unique, x, y, test_x = _duplicated_problem(dtype, conflicting)
    post = TrainedEnsemble(net, x.to(dtype), y.to(dtype), solver=solver)
    train_kernel = post._solver.problem.train_kernels.get("ntk")
    # duplicated rows up to round-off (the self-kernel is computed on its own): singular up to round-off
    eps = torch.finfo(dtype).eps
    assert (train_kernel[:6] - train_kernel[6:12]).abs().max() <= 16 * eps * train_kernel.abs().max()
    tolerance = TOLERANCE[dtype]
    for regime in ("ntk", "nngp", "ntkgp"):
        means, variances = _moments(post, test_x, dtype, regime)
        ref_means, ref_variances = _duplicated_reference(net, unique, y, test_x, regime, TIMES)
        mean_scale = y.abs().max()
        variance_scale = ref_variances[0].max()
        for i, t in enumerate(TIMES):
            assert (means[i] - ref_means[i]).abs().max() <= tolerance * mean_scale, (regime, t)
            assert (variances[i] - ref_variances[i]).abs().max() <= tolerance * variance_scale, (regime, t)
        assert variances.min() >= 0
        # no overshoot: the distance to the limit never exceeds the reference's (which decays) by more than round-off
        distance = (means - means[-1]).abs().amax(-1)
        ref_distance = (ref_means - ref_means[-1]).abs().amax(-1)
        assert (distance <= ref_distance + 2 * tolerance * mean_scale).all(), regime


def _linear_reference(x, y, test_x, weight_variance, bias_variance, times, learning_rate=1.0):
    """(means, variances) of the linear model in its explicit features, float64."""
    def features(points):
        scale = math.sqrt(weight_variance / points.shape[-1])
        return torch.cat([scale * points, math.sqrt(bias_variance) * torch.ones(len(points), 1)], dim=-1)

    phi, phi_t = features(x), features(test_x)
    c_values, c_vectors = torch.linalg.eigh(phi.mT @ phi)
    projected_t, projected_y = phi_t @ c_vectors, c_vectors.mT @ (phi.mT @ y)
    means, variances = [], []
    for t in times:
        tau = learning_rate * t / len(x)
        means.append(projected_t @ (_phi_filter(c_values, tau) * projected_y))
        decay = torch.zeros_like(c_values) if math.isinf(t) else torch.exp(-2 * tau * c_values)
        variances.append((projected_t.square() * decay).sum(-1))
    return torch.stack(means), torch.stack(variances), phi


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_linear_kernel_follows_the_feature_space_solution(dtype, solver):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64).to(dtype).double()  # rank 4 kernel, n = 24
    y = torch.randn(24, generator=g, dtype=torch.float64).to(dtype).double()
    test_x = torch.cat([torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype).double(), x[:2]])
    net = L.mlp(0, weight_variance=1.5, bias_variance=0.5)
    ref_means, ref_variances, phi = _linear_reference(x, y, test_x, 1.5, 0.5, TIMES)
    kernel = gpntk.NTKKernel(net)(x).to_dense().detach()
    torch.testing.assert_close(kernel, phi @ phi.mT, rtol=1e-13, atol=1e-13)  # the features are the kernel's
    post = TrainedEnsemble(net, x.to(dtype), y.to(dtype), solver=solver)
    tolerance = TOLERANCE[dtype]
    for regime in ("ntk", "nngp", "ntkgp"):
        means, variances = _moments(post, test_x, dtype, regime)
        for i, t in enumerate(TIMES):
            assert (means[i] - ref_means[i]).abs().max() <= tolerance * y.abs().max(), (regime, t)
            assert (variances[i] - ref_variances[i]).abs().max() <= tolerance * ref_variances[0].max(), (regime, t)
        assert variances.min() >= 0


def test_dropping_round_off_eigenvalues_at_a_finite_time_warns_only_when_it_could_matter():
    """Eigenvalues below the pseudo-inverse cutoff are zero at every time; dropping them is silent while
    1 - exp(-τ·cutoff) is below sqrt(eps) and warns (NumericalWarning) beyond."""
    unique, x, y, test_x = _duplicated_problem(torch.float64, conflicting=True)
    post = TrainedEnsemble(L.mlp(2, "erf"), x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post.moments(test_x, 1e3)
    with pytest.warns(gpntk.NumericalWarning, match="treated as exactly zero"):
        post.moments(test_x, 1e16)
    with pytest.warns(gpntk.NumericalWarning, match="pseudo-inverse"):
        post.moments(test_x, math.inf)


def test_variances_negative_beyond_round_off_are_repaired_with_a_warning(monkeypatch):
    """A repair larger than the documented bound (VARIANCE_ROUNDING n eps of the terms) is reported."""
    from dataclasses import replace

    x = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randn(8, dtype=torch.float64)
    post = TrainedEnsemble(L.mlp(1, "erf"), x, y)
    _, variances = post.moments(x, math.inf, diag=True)
    assert variances.min() >= 0
    # a training kernel whose computed spectrum is off: the subtracted term exceeds the prior variance
    spectrum = post._solver.spectrum("nngp")
    monkeypatch.setitem(post._solver.spectra, "nngp", replace(spectrum, eigenvalues=spectrum.eigenvalues * 0.5))
    with pytest.warns(gpntk.NumericalWarning, match="negative beyond round-off"):
        _, variances = post.moments(x, math.inf, "nngp", diag=True)
    assert variances.min() == 0
