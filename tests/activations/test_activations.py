r"""Independent checks of every activation's dual maps.

For :math:`(u, v) \sim \mathcal N(0, [[q_{11}, q_{12}], [q_{12}, q_{22}]])` each activation's
``dual`` must give :math:`k_{12} = \mathbb E[\phi(u)\phi(v)]` and
:math:`\dot k_{12} = \mathbb E[\phi'(u)\phi'(v)]`, and ``dual_diag`` the same at :math:`u = v`.
The expectations are computed here, in numpy, from the activations' textbook definitions (not
from ``fn``), with the Cholesky factor :math:`u = l_{11} z_1`, :math:`v = l_{21} z_1 + l_{22} z_2`:

* smooth :math:`\phi`: the tensor trapezoidal rule in :math:`(z_1, z_2)` (step 0.1 on
  :math:`[-9, 9]^2`), exponentially accurate for integrands analytic in a strip, unlike
  Gauss–Hermite, which converges slowly for :math:`\tanh`-like functions at large variance;
* positively homogeneous :math:`\phi` of degree :math:`p` (ReLU family, Abs, Sign, rectified
  monomials): in polar coordinates :math:`z = r(\cos t, \sin t)` the radial integral is
  :math:`2^{d/2}\Gamma(d/2 + 1)` (:math:`d` the total degree) and the angular integrand is smooth
  between the angles where :math:`u` or :math:`v` changes sign, so piecewise Gauss–Legendre is
  exact to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import erf as np_erf
from scipy.special import expit, roots_hermitenorm, roots_legendre

from gpntk import layers as L
from gpntk.activations import Activation
from gpntk.activations.angular import arccos_j
from gpntk.activations.quadrature import Elementwise

# --- independent expectations --------------------------------------------------------------------

# trapezoidal rule for a standard normal variable: step h = 0.1 on [-9, 9]. For an integrand
# analytic in the strip |Im z| < d its error is about exp(-2 pi d / h) (d >= 0.64 for every smooth
# activation at the variances used here, so < 1e-17) plus the truncated tail exp(-40.5).
_TRAP_STEP = 0.1
_TRAP_NODES = np.linspace(-9.0, 9.0, 181)
_TRAP_WEIGHTS = _TRAP_STEP * np.exp(-_TRAP_NODES**2 / 2) / math.sqrt(2 * math.pi)
_GL_NODES, _GL_WEIGHTS = roots_legendre(40)


def _cholesky(q11: float, rho: float, q22: float) -> tuple[float, float, float]:
    s1, s2 = math.sqrt(q11), math.sqrt(q22)
    return s1, rho * s2, s2 * math.sqrt(max((1 - rho) * (1 + rho), 0.0))


def trapezoid_expectation(f, g, q11, rho, q22) -> float:
    r""":math:`\mathbb E[f(u) g(v)]` for smooth f, g by the tensor trapezoidal rule."""
    l11, l21, l22 = _cholesky(q11, rho, q22)
    z, w = _TRAP_NODES, _TRAP_WEIGHTS
    if l22 == 0.0:  # v = l21 z1: a one-dimensional integral
        return float(np.sum(w * f(l11 * z) * g(l21 * z)))
    inner = (w[None, :] * g(l21 * z[:, None] + l22 * z[None, :])).sum(axis=1)
    return float(np.sum(w * f(l11 * z) * inner))


def polar_expectation(f, g, degree, q11, rho, q22) -> float:
    """:math:`\\mathbb E[f(u) g(v)]` for f, g positively homogeneous of total degree ``degree``."""
    l11, l21, l22 = _cholesky(q11, rho, q22)
    # u = l11 cos t vanishes at pi/2, 3pi/2; v = l21 cos t + l22 sin t at atan2(-l21, l22) (+ pi)
    v_zero = math.atan2(-l21, l22) % math.pi
    breaks = np.unique(np.array([0.0, math.pi / 2, 1.5 * math.pi, v_zero, v_zero + math.pi, 2 * math.pi]))
    total = 0.0
    for a, b in zip(breaks[:-1], breaks[1:]):
        t = (a + b) / 2 + (b - a) / 2 * _GL_NODES
        total += (b - a) / 2 * float(np.sum(_GL_WEIGHTS * f(l11 * np.cos(t)) * g(l21 * np.cos(t) + l22 * np.sin(t))))
    radial = 2 ** (degree / 2) * math.gamma(degree / 2 + 1)
    return radial * total / (2 * math.pi)


# --- the activations, from their definitions -----------------------------------------------------


def _sigmoid(x):
    return expit(x)


def _gelu(x):
    return x * 0.5 * (1 + np_erf(x / math.sqrt(2)))


def _gelu_derivative(x):
    return 0.5 * (1 + np_erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _abrelu(a, b):
    return (lambda x: a * np.minimum(x, 0) + b * np.maximum(x, 0)), (lambda x: np.where(x > 0, b, a))


def _rectified(p):
    phi = lambda x: np.where(x >= 0, np.abs(x) ** p, 0.0)  # noqa: E731  (0^0 = 1 at x = 0)
    dphi = None if p == 0 else (lambda x: np.where(x > 0, p * np.abs(x) ** (p - 1), 0.0))
    return phi, dphi


def _gabor(x):
    return np.exp(-x * x) * np.sin(x)


def _gabor_derivative(x):
    return np.exp(-x * x) * (np.cos(x) - 2 * x * np.sin(x))


_SIGMOID_LIKE_SCALE = 2.4020563531719796


def _sigmoid_like(x):
    return 0.5 * np_erf(x / _SIGMOID_LIKE_SCALE) + 0.5


def _sigmoid_like_derivative(x):
    return np.exp(-((x / _SIGMOID_LIKE_SCALE) ** 2)) / (_SQRT_PI * _SIGMOID_LIKE_SCALE)


def _hermite(d):
    """He_d / sqrt(d!) and its derivative d He_{d-1} / sqrt(d!), from numpy's HermiteE series."""
    norm = 1 / math.sqrt(math.factorial(d))
    phi = lambda x: norm * np.polynomial.hermite_e.hermeval(x, [0] * d + [1])  # noqa: E731
    dphi = lambda x: norm * d * np.polynomial.hermite_e.hermeval(x, [0] * (d - 1) + [1]) if d else 0 * x  # noqa: E731
    return phi, dphi


def _gelu_tanh(x):
    # x/2 (1 + tanh z) = x sigmoid(2z), the form without cancellation in the negative tail
    return x * expit(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))


def _gelu_tanh_derivative(x):
    t = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)


def _erf_nngp(cov12, var1, var2):
    """Williams' (1997) erf kernel, as a user would write it for ``Elementwise(nngp_fn=...)``."""
    return 2 / math.pi * torch.asin(2 * cov12 / torch.sqrt((1 + 2 * var1) * (1 + 2 * var2)))


def _erf_d_nngp(cov12, var1, var2):
    return 4 / math.pi / torch.sqrt((1 + 2 * var1) * (1 + 2 * var2) - 4 * cov12**2)


@dataclass(frozen=True)
class Spec:
    """An activation and its definition: ``phi``, ``dphi`` (``None``: kdot is 0 by convention)."""

    id: str
    make: Callable[[], Activation]
    phi: Callable
    dphi: Callable | None
    homogeneous: int | None = None  # degree p of positive homogeneity: use the polar rule
    #: tolerance of dual/dual_diag against the expectations, relative to the Cauchy–Schwarz scale
    tol: float = 1e-10
    #: for the Gauss–Hermite activations: the same activation with a given number of points
    with_degree: Callable[[int], Activation] | None = None

    @property
    def quadrature(self) -> bool:
        return self.with_degree is not None


def _sech2(x):
    return 1 / np.cosh(x) ** 2


_relu, _drelu = _abrelu(0.0, 1.0)
_leaky, _dleaky = _abrelu(0.1, 1.0)
_ab, _dab = _abrelu(-0.4, 1.2)
_rm = {p: _rectified(p) for p in range(4)}
_SQRT_PI = math.sqrt(math.pi)

# Accuracy of gpntk's default Gauss–Hermite rule (64 points per dimension, the scheme of Neural
# Tangents) at the triples and variances below (q <= 3), measured against the trapezoid rule,
# relative to the Cauchy–Schwarz scale: worst errors Tanh 2.9e-4 (kdot = E sech^4 on the diagonal
# at q = 2.5; sech^2 has poles at +-i pi/2 and Gauss–Hermite converges only root-exponentially;
# 3.2e-5 off the diagonal), Sigmoid 1.0e-9, SiLU 2.3e-11, Softplus 8e-12 (diagonal kdot at q = 2.5
# each). The tolerances are 3-6x those; test_quadrature_converges_with_degree checks that the error
# is the rule's order alone (it vanishes as the degree grows).
# issue 16: Neural Tangents' activations (ExpNormalized has no phi: see test_activations_ii.py)
NEW_SPECS = [
    Spec("Gabor", L.Gabor, _gabor, _gabor_derivative),
    Spec("SigmoidLike", L.SigmoidLike, _sigmoid_like, _sigmoid_like_derivative),
    *(Spec(f"Hermite({d})", lambda d=d: L.Hermite(d), *_hermite(d)) for d in (0, 1, 2, 3, 5)),
    # the 128-point rule: measured worst 1.5e-11 at these variances (q <= 3)
    Spec("GELU(approximate=True)", lambda: L.GELU(approximate=True), _gelu_tanh, _gelu_tanh_derivative, tol=1e-9),
    Spec(
        "Elementwise(erf,nngp_fn)", lambda: L.Elementwise(torch.erf, nngp_fn=_erf_nngp), np_erf,
        lambda x: 2 / _SQRT_PI * np.exp(-x * x),
    ),
    Spec(
        "Elementwise(erf,nngp_fn,d_nngp_fn)",
        lambda: L.Elementwise(torch.erf, nngp_fn=_erf_nngp, d_nngp_fn=_erf_d_nngp), np_erf,
        lambda x: 2 / _SQRT_PI * np.exp(-x * x),
    ),
]

SPECS = [
    Spec("ReLU", L.ReLU, _relu, _drelu, homogeneous=1),
    Spec("LeakyReLU(0.1)", lambda: L.LeakyReLU(0.1), _leaky, _dleaky, homogeneous=1),
    Spec("ABReLU(-0.4,1.2)", lambda: L.ABReLU(-0.4, 1.2), _ab, _dab, homogeneous=1),
    Spec("Abs", L.Abs, np.abs, np.sign, homogeneous=1),
    Spec("Sign", L.Sign, np.sign, None, homogeneous=0),
    Spec("Erf", L.Erf, np_erf, lambda x: 2 / _SQRT_PI * np.exp(-x * x)),
    Spec(
        "Erf(1.3,0.7,0.2)", lambda: L.Erf(a=1.3, b=0.7, c=0.2), lambda x: 1.3 * np_erf(0.7 * x) + 0.2,
        lambda x: 1.3 * 0.7 * 2 / _SQRT_PI * np.exp(-0.49 * x * x),
    ),
    Spec("GELU", L.GELU, _gelu, _gelu_derivative),
    Spec(
        "Sin(1,1.5,0.3)", lambda: L.Sin(1.0, 1.5, 0.3), lambda x: np.sin(1.5 * x + 0.3),
        lambda x: 1.5 * np.cos(1.5 * x + 0.3),
    ),
    Spec("Cos", L.Cos, np.cos, lambda x: -np.sin(x)),
    Spec(
        "Rbf(0.5)", lambda: L.Rbf(0.5), lambda x: math.sqrt(2) * np.sin(x + math.pi / 4),
        lambda x: math.sqrt(2) * np.cos(x + math.pi / 4),
    ),
    Spec("Exp(0.5,0.3)", lambda: L.Exp(0.5, 0.3), lambda x: 0.5 * np.exp(0.3 * x), lambda x: 0.15 * np.exp(0.3 * x)),
    Spec(
        "Gaussian(1,-0.5)", lambda: L.Gaussian(1.0, -0.5), lambda x: np.exp(-0.5 * x * x),
        lambda x: -x * np.exp(-0.5 * x * x),
    ),
    Spec("Monomial(2)", lambda: L.Monomial(2), lambda x: x**2, lambda x: 2 * x),
    Spec("Monomial(3)", lambda: L.Monomial(3), lambda x: x**3, lambda x: 3 * x**2),
    *(Spec(f"RectifiedMonomial({p})", lambda p=p: L.RectifiedMonomial(p), *_rm[p], homogeneous=p) for p in range(4)),
    Spec(
        "Polynomial([0.1,1,0.5])", lambda: L.Polynomial([0.1, 1.0, 0.5]), lambda x: 0.1 + x + 0.5 * x**2,
        lambda x: 1 + x,
    ),
    Spec("Tanh", L.Tanh, np.tanh, _sech2, tol=1e-3, with_degree=lambda d: L.Tanh(degree=d)),
    Spec(
        "Sigmoid", L.Sigmoid, _sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x)), tol=5e-9,
        with_degree=lambda d: L.Sigmoid(degree=d),
    ),
    Spec(
        "Softplus", L.Softplus, lambda x: np.logaddexp(0, x), _sigmoid, tol=5e-11,
        with_degree=lambda d: L.Softplus(degree=d),
    ),
    Spec(
        "SiLU", L.SiLU, lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x))), tol=5e-9,
        with_degree=lambda d: L.SiLU(degree=d),
    ),
    # derivative by forward-mode autograd
    Spec(
        "Elementwise(tanh)", lambda: L.Elementwise(torch.tanh), np.tanh, _sech2, tol=1e-3,
        with_degree=lambda d: L.Elementwise(torch.tanh, degree=d),
    ),
    *NEW_SPECS,
]
SPEC_PARAMS = [pytest.param(spec, id=spec.id) for spec in SPECS]
QUADRATURE_PARAMS = [p for p in SPEC_PARAMS if p.values[0].quadrature]

# (q11, rho, q22); q12 = rho sqrt(q11 q22)
TRIPLES = [
    (1.0, 0.3, 1.0),
    (0.5, -0.4, 2.0),  # unequal variances
    (0.3, 0.0, 3.0),  # independent, very unequal
    (1.5, 0.999, 0.8),  # |rho| near 1
    (2.0, -0.9999, 0.7),
    (0.8, 1 - 1e-9, 1.3),
]
TRIPLE_IDS = [f"q11={a},rho={r},q22={b}" for a, r, b in TRIPLES]
VARIANCES = [0.3, 1.0, 2.5]

# A correlation of exactly one is known only to ~1e-16 once q12 = sqrt(q11 q22) is rounded, and
# arccos(1 - 1e-16) ~ 1.5e-8: the arc-cosine kernels can only match there to about 1e-8.
RHO_ONE_TOL = 1e-7


@lru_cache(maxsize=None)
def expectations(spec: Spec, q11: float, rho: float, q22: float) -> tuple[float, float | None]:
    """``(E phi(u) phi(v), E phi'(u) phi'(v))`` by the independent rules (``None``: kdot = 0)."""
    if spec.homogeneous is not None:
        p = spec.homogeneous
        k = polar_expectation(spec.phi, spec.phi, 2 * p, q11, rho, q22)
        kdot = None if spec.dphi is None else polar_expectation(spec.dphi, spec.dphi, 2 * (p - 1), q11, rho, q22)
    else:
        k = trapezoid_expectation(spec.phi, spec.phi, q11, rho, q22)
        kdot = trapezoid_expectation(spec.dphi, spec.dphi, q11, rho, q22)
    return k, kdot


def scales(spec: Spec, q11: float, q22: float) -> tuple[float, float]:
    """Cauchy–Schwarz bounds sqrt(k(q11) k(q22)) on |k12| and |kdot12| (1 where kdot = 0)."""
    k1, d1 = expectations(spec, q11, 1.0, q11)
    k2, d2 = expectations(spec, q22, 1.0, q22)
    return math.sqrt(k1 * k2), (1.0 if d1 is None else math.sqrt(d1 * d2))


def _tensor(value, dtype=torch.float64, requires_grad=False) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype).reshape(1, 1).requires_grad_(requires_grad)


def gpntk_dual(act, q11, rho, q22, need_dot=True):
    q12 = rho * math.sqrt(q11 * q22)
    return act.dual(_tensor(q11), _tensor(q12), _tensor(q22), need_dot)


def assert_dual_matches(spec, act, triple, tol):
    q11, rho, q22 = triple
    k, kdot = gpntk_dual(act, *triple)
    expected_k, expected_kdot = expectations(spec, *triple)
    scale_k, scale_kdot = scales(spec, q11, q22)
    assert k.shape == kdot.shape == (1, 1)
    assert abs(k.item() - expected_k) <= tol * scale_k, (k.item(), expected_k)
    if expected_kdot is None:
        assert kdot.item() == 0
    else:
        assert abs(kdot.item() - expected_kdot) <= tol * scale_kdot, (kdot.item(), expected_kdot)


# --- sanity of the reference rules themselves ------------------------------------------------------


def test_reference_rules_agree_on_known_integrals():
    q11, rho, q22 = 0.7, -0.35, 1.9
    q12 = rho * math.sqrt(q11 * q22)
    # E[relu(u) relu(v)] (Cho & Saul) and E[u^2 v^2] = q11 q22 + 2 q12^2 (Isserlis)
    theta = math.acos(rho)
    relu_k = math.sqrt(q11 * q22) / (2 * math.pi) * (math.sin(theta) + (math.pi - theta) * rho)
    assert polar_expectation(_relu, _relu, 2, q11, rho, q22) == pytest.approx(relu_k, rel=1e-14)
    square = lambda x: x**2  # noqa: E731
    isserlis = q11 * q22 + 2 * q12**2
    assert trapezoid_expectation(square, square, q11, rho, q22) == pytest.approx(isserlis, rel=1e-13)
    assert polar_expectation(square, square, 4, q11, rho, q22) == pytest.approx(isserlis, rel=1e-13)
    # the trapezoid against an adaptive integrator (1-D, u = v) and against a 300-point
    # Gauss–Hermite rule, converged for tanh at these moderate variances (2-D)
    for q in (0.5, 3.0, 6.0):
        density = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        integrand = lambda z: _sech2(math.sqrt(q) * z) ** 2 * density(z)  # noqa: E731
        adaptive, _ = quad(integrand, -12, 12, points=[0], epsabs=0, epsrel=1e-13, limit=200)
        assert trapezoid_expectation(_sech2, _sech2, q, 1.0, q) == pytest.approx(adaptive, rel=1e-13)
    z, w = roots_hermitenorm(300)
    w = w / math.sqrt(2 * math.pi)
    for q11, rho, q22 in [(1.0, 0.6, 0.5), (1.5, -0.9, 1.2)]:
        l11, l21, l22 = _cholesky(q11, rho, q22)
        for f in (np.tanh, _sech2):
            gh = np.sum(w[:, None] * w[None, :] * f(l11 * z[:, None]) * f(l21 * z[:, None] + l22 * z[None, :]))
            assert trapezoid_expectation(f, f, q11, rho, q22) == pytest.approx(gh, rel=1e-13)


# --- dual maps against the expectations ---------------------------------------------------------


@pytest.mark.parametrize("triple", TRIPLES, ids=TRIPLE_IDS)
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_dual_matches_expectations(spec, triple):
    act = spec.make()
    assert_dual_matches(spec, act, triple, spec.tol)
    # need_dot=False: the same kernel, no derivative kernel
    k, _ = gpntk_dual(act, *triple)
    k_only, none = gpntk_dual(act, *triple, need_dot=False)
    assert none is None
    assert torch.equal(k_only, k)


@pytest.mark.parametrize("q", VARIANCES)
@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_dual_diag_matches_expectations(spec, q):
    act = spec.make()
    k, kdot = act.dual_diag(torch.tensor([q], dtype=torch.float64), True)
    expected_k, expected_kdot = expectations(spec, q, 1.0, q)
    assert abs(k.item() - expected_k) <= spec.tol * abs(expected_k)
    if expected_kdot is None:
        assert kdot.item() == 0
    else:
        assert abs(kdot.item() - expected_kdot) <= spec.tol * abs(expected_kdot)
    k_only, none = act.dual_diag(torch.tensor([q], dtype=torch.float64), False)
    assert none is None and torch.equal(k_only, k)


@pytest.mark.parametrize("spec", QUADRATURE_PARAMS)
def test_quadrature_converges_with_degree(spec):
    """More Gauss–Hermite points remove the default rule's error: it is the rule's order, not a bias."""
    # 256 points: measured worst 3.5e-9 (Tanh, diagonal kdot at q = 3), against 5e-4 with 64
    tol = 1e-8
    act = spec.with_degree(256)
    for triple in [(0.3, 0.0, 3.0), (2.0, -0.9999, 0.7)]:
        assert_dual_matches(spec, act, triple, tol)
    q = 3.0
    k, kdot = act.dual_diag(torch.tensor([q], dtype=torch.float64), True)
    expected_k, expected_kdot = expectations(spec, q, 1.0, q)
    assert k.item() == pytest.approx(expected_k, rel=tol)
    assert kdot.item() == pytest.approx(expected_kdot, rel=tol)


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_dual_diag_is_dual_at_rho_one(spec):
    act = spec.make()
    q = torch.tensor(VARIANCES, dtype=torch.float64)
    k_diag, kdot_diag = act.dual_diag(q, True)
    qq = q[:, None, None]  # a batch of 1 x 1 kernels
    k, kdot = act.dual(qq, qq, qq, True)
    torch.testing.assert_close(k[:, 0, 0], k_diag, rtol=RHO_ONE_TOL, atol=0)
    torch.testing.assert_close(kdot[:, 0, 0], kdot_diag, rtol=RHO_ONE_TOL, atol=0)
    # a correlation of one between points of unequal variance (x2 = 2 x1 without bias)
    assert_dual_matches(spec, act, (0.6, 1.0, 2.4), max(RHO_ONE_TOL, spec.tol))


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_dual_broadcasts_over_pairs_and_batches(spec):
    """``q11`` (..., n1, 1), ``q12`` (..., n1, n2), ``q22`` (..., 1, n2): entry (i, j) is pair (i, j)."""
    act = spec.make()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    gram = x @ x.transpose(-1, -2) / 3 + 0.1  # covariances of 5 points, in 2 batches
    var = torch.diagonal(gram, dim1=-2, dim2=-1)
    q11, q22, q12 = var[:, :3, None], var[:, None, 3:], gram[:, :3, 3:]
    k, kdot = act.dual(q11, q12, q22, True)
    assert k.shape == kdot.shape == (2, 3, 2)
    # the same 12 pairs as a batch of 1 x 1 kernels
    b, i, j = torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(2), indexing="ij")
    flat = (q11[b, i, 0], q12[b, i, j], q22[b, 0, j])
    k_one, kdot_one = act.dual(*(t.reshape(-1, 1, 1) for t in flat), True)
    torch.testing.assert_close(k, k_one.reshape(2, 3, 2), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(kdot, kdot_one.reshape(2, 3, 2), rtol=1e-13, atol=1e-15)
    k_diag, kdot_diag = act.dual_diag(var[..., None], True)
    assert k_diag.shape == kdot_diag.shape == (2, 5, 1)


# --- Price's theorem: d k12 / d q12 = E[phi'(u) phi'(v)] ------------------------------------------

PRICE_PARAMS = [p for p in SPEC_PARAMS if p.values[0].dphi is not None]  # not Sign, RectifiedMonomial(0)


@pytest.mark.parametrize("triple", TRIPLES[:5], ids=TRIPLE_IDS[:5])
@pytest.mark.parametrize("spec", PRICE_PARAMS)
def test_price_theorem(spec, triple):
    """The autograd derivative of k12 in q12 equals the returned kdot12.

    For the quadrature duals the autograd derivative of the rule is a different quadrature of
    the same integral, so the two agree to the rule's accuracy (``spec.tol``).
    """
    q11, rho, q22 = triple
    act = spec.make()
    q12 = _tensor(rho * math.sqrt(q11 * q22), requires_grad=True)
    k, kdot = act.dual(_tensor(q11), q12, _tensor(q22), True)
    (grad,) = torch.autograd.grad(k.sum(), q12)
    _, scale_kdot = scales(spec, q11, q22)
    assert abs(grad.item() - kdot.item()) <= max(spec.tol, 1e-9) * scale_kdot, (grad.item(), kdot.item())


# --- the activation itself ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_fn_is_the_documented_function(spec):
    x = np.concatenate([np.linspace(-30, 30, 121), np.linspace(-2, 2, 81), [0.0, 1e-12, -1e-12]])
    actual = spec.make().fn(torch.from_numpy(x))
    assert actual.dtype == torch.float64
    np.testing.assert_allclose(actual.numpy(), spec.phi(x), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("spec", QUADRATURE_PARAMS)
def test_quadrature_derivative(spec):
    x = np.linspace(-8, 8, 161)
    actual = spec.make().derivative(torch.from_numpy(x)).numpy()
    # 1 - tanh^2 loses relative (not absolute) accuracy in the tails
    np.testing.assert_allclose(actual, spec.dphi(x), rtol=1e-12, atol=1e-15)


# --- gradients and float32 --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_gradients_finite_at_rho_one(spec):
    act = spec.make()
    q11 = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    q22 = torch.tensor([[1.5, 1.0]], dtype=torch.float64, requires_grad=True)
    # q12 = sqrt(q11 q22) as computed, and one ulp above it (a correlation rounding past 1)
    exact = (q11 * q22).sqrt()
    q12 = torch.cat([exact, torch.nextafter(exact, torch.full_like(exact, math.inf))], dim=-1)
    k, kdot = act.dual(q11, q12, torch.cat([q22, q22], dim=-1), True)
    assert torch.isfinite(k).all() and torch.isfinite(kdot).all()
    grads = torch.autograd.grad(k.sum() + kdot.sum(), (q11, q22), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None for g in grads)
    # and with q12 as an independent input (the partial derivative in q12 itself)
    leaf = q12.detach().requires_grad_(True)
    k_leaf, kdot_leaf = act.dual(q11, leaf, torch.cat([q22, q22], dim=-1), True)
    grads = torch.autograd.grad(k_leaf.sum() + kdot_leaf.sum(), (q11, leaf, q22), allow_unused=True)
    assert grads[1] is not None
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # one ulp past rho = 1 gives the rho = 1 value, not NaN
    torch.testing.assert_close(k[:, 2:], k[:, :2], rtol=RHO_ONE_TOL, atol=0)
    torch.testing.assert_close(kdot[:, 2:], kdot[:, :2], rtol=RHO_ONE_TOL, atol=0)
    q = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    k, kdot = act.dual_diag(q, True)
    total = k.sum() + kdot.sum()
    if total.requires_grad:  # Sign: the diagonal is the constant 1
        (grad,) = torch.autograd.grad(total, q)
        assert torch.isfinite(grad).all()


FLOAT32_TOL = 1e-4


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_float32_finite_and_close(spec):
    act = spec.make()
    triples = [*TRIPLES, (0.6, 1.0, 2.4), (1.7, -1.0, 0.4)]
    q11, rho, q22 = (torch.tensor(column, dtype=torch.float64)[:, None, None] for column in zip(*triples))
    q12 = rho * (q11 * q22).sqrt()
    k64, kdot64 = act.dual(q11, q12, q22, True)
    k32, kdot32 = act.dual(q11.float(), q12.float(), q22.float(), True)
    assert k32.dtype == kdot32.dtype == torch.float32
    assert torch.isfinite(k32).all() and torch.isfinite(kdot32).all()
    scale = torch.tensor([scales(spec, t[0], t[2]) for t in triples], dtype=torch.float64)[:, :, None, None]
    assert ((k32.double() - k64).abs() <= FLOAT32_TOL * scale[:, 0]).all()
    assert ((kdot32.double() - kdot64).abs() <= FLOAT32_TOL * scale[:, 1]).all()
    q = torch.tensor(VARIANCES, dtype=torch.float32)
    k, kdot = act.dual_diag(q, True)
    assert k.dtype == torch.float32 and torch.isfinite(k).all() and torch.isfinite(kdot).all()
    # float32 q12 = sqrt(q11 q22) rounding past rho = 1
    q11, q22 = torch.tensor([[0.7]]), torch.tensor([[1.3]])
    q12 = torch.nextafter((q11 * q22).sqrt(), torch.tensor(math.inf))
    k, kdot = act.dual(q11, q12, q22, True)
    assert torch.isfinite(k).all() and torch.isfinite(kdot).all()


# --- the arc-cosine functions J_p ---------------------------------------------------------------


def test_arccos_j_closed_forms():
    """Cho & Saul (2009), eq. (6): J_0, J_1, J_2 as functions of theta = arccos(rho)."""
    rho = torch.cat([torch.linspace(-1, 1, 201, dtype=torch.float64), torch.tensor([-0.9999999, 0.9999999])])
    theta = torch.arccos(rho)
    s, c = torch.sin(theta), torch.cos(theta)
    expected = {
        0: math.pi - theta,
        1: s + (math.pi - theta) * c,
        2: 3 * s * c + (math.pi - theta) * (1 + 2 * c**2),
    }
    for p, value in expected.items():
        torch.testing.assert_close(arccos_j(rho, p), value, rtol=1e-13, atol=1e-13)
    # J_p(1) = (2p - 1)!! pi and J_p(-1) = 0
    for p in range(6):
        ends = arccos_j(torch.tensor([1.0, -1.0], dtype=torch.float64), p)
        assert ends[0].item() == pytest.approx(math.prod(range(2 * p - 1, 0, -2)) * math.pi, rel=1e-14)
        assert abs(ends[1].item()) <= 1e-14


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_arccos_j_gradcheck(p):
    rho = torch.linspace(-0.95, 0.95, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: arccos_j(r, p), (rho,))
    if p >= 1:
        assert torch.autograd.gradgradcheck(lambda r: arccos_j(r, p), (rho,))


# --- Gauss–Hermite rule -------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [64, 400])
def test_elementwise_rule_any_degree(degree):
    """Elementwise reproduces closed forms, also past numpy's hermgauss overflow (NaN beyond ~360 points)."""
    q = torch.tensor([0.4, 1.7], dtype=torch.float64)
    # the 1-D rule integrates polynomials exactly: E[(sqrt(q) z)^10] = 945 q^5
    k, kdot = Elementwise(lambda x: x**5, degree=degree).dual_diag(q, True)
    torch.testing.assert_close(k, 945 * q**5, rtol=1e-12, atol=0)
    torch.testing.assert_close(kdot, 25 * 105 * q**4, rtol=1e-12, atol=0)
    # the 2-D rule against the closed-form Erf kernel
    quad, exact = Elementwise(torch.erf, degree=degree), L.Erf()
    q11, q12, q22 = (torch.tensor([[value]], dtype=torch.float64) for value in (1.7, -0.9, 0.9))
    for got, want in zip(quad.dual(q11, q12, q22, True), exact.dual(q11, q12, q22, True)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
