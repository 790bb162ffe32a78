r"""Smooth activations with closed-form dual kernels: Erf, GELU, Sin/Cos/Rbf, Exp and Gaussian.

Every expectation is over :math:`(u, v) \sim \mathcal N(0, [[q_{11}, q_{12}], [q_{12}, q_{22}]])`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from .._transforms import is_batched
from .._validation import bool_argument
from ..errors import ArchitectureError
from .base import Activation, real_parameter
from .ops import TORCH, DualOps, gram_determinant
from .quadrature import Elementwise

__all__ = [
    "Erf", "GELU", "Sin", "Cos", "Rbf", "Exp", "Gaussian", "erf_pair", "sin_pair", "exp_pair",
    "Gabor", "SigmoidLike", "gabor_pair", "gelu_tanh", "gelu_tanh_derivative", "GELU_TANH_DEGREE",
]

V = TypeVar("V")

# ==================================================================================================
# The pair formulas, written once for every backend (gpntk.activations.ops)
# ==================================================================================================
# Each takes the pair's variances q11 (..., n1, 1), q22 (..., 1, n2) and covariance q12 (or, in the
# KeOps backend, the same quantities of one pair).


def erf_pair(
    ops: DualOps[V], constants: Sequence[V | float], q11: V, q12: V, q22: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Erf`; constants :math:`(2b^2, 4b^4, 2a^2/\pi, c^2, 4a^2b^2/\pi)`.

    With the squared leg :math:`\ell^2 = 1 + 2b^2(q_{11} + q_{22}) + 4b^4 \max(q_{11}q_{22} - q_{12}^2, 0)`
    (never below 1; floored at the smallest normal number all the same),

    .. math::
        k_{12} = \frac{2a^2}{\pi} \operatorname{atan2}(2b^2 q_{12}, \ell) + c^2, \qquad
        \dot k_{12} = \frac{4a^2b^2}{\pi}\, \frac1\ell.
    """
    two_b2, four_b4, amplitude, offset, slope = constants
    spread = ops.add(1, ops.mul(two_b2, ops.add(q11, q22)))
    leg2 = ops.add(spread, ops.mul(four_b4, gram_determinant(ops, q11, q12, q22)))
    leg = ops.sqrt(ops.clamp_min(leg2, ops.tiny(q12)))
    k12 = ops.add(ops.mul(amplitude, ops.atan2(ops.mul(two_b2, q12), leg)), offset)
    return k12, (ops.div(slope, leg) if need_dot else None)


def sin_pair(
    ops: DualOps[V], constants: Sequence[V | float], q11: V, q12: V, q22: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Sin` (``Cos``, ``Rbf``); constants :math:`(-b^2/2, \cos 2c, a^2/2, a^2b^2/2)`.

    .. math::
        s_\pm = \exp\bigl(-\tfrac{b^2}{2}(q_{11} + q_{22} \mp 2 q_{12})\bigr), \qquad
        k_{12} = \frac{a^2}{2}\bigl(s_+ - \cos(2c)\, s_-\bigr), \qquad
        \dot k_{12} = \frac{a^2 b^2}{2}\bigl(s_+ + \cos(2c)\, s_-\bigr).
    """
    neg_half_b2, cos2c, half_a2, half_a2b2 = constants
    total = ops.add(q11, q22)
    s_plus = ops.exp(ops.mul(neg_half_b2, ops.sub(total, ops.mul(2, q12))))
    s_minus = ops.mul(cos2c, ops.exp(ops.mul(neg_half_b2, ops.add(total, ops.mul(2, q12)))))
    k12 = ops.mul(half_a2, ops.sub(s_plus, s_minus))
    return k12, (ops.mul(half_a2b2, ops.add(s_plus, s_minus)) if need_dot else None)


def exp_pair(
    ops: DualOps[V], constants: Sequence[V | float], q11: V, q12: V, q22: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Exp`; constants :math:`(a^2, b^2)`:
    :math:`k_{12} = a^2 \exp\bigl(b^2(\tfrac12(q_{11} + q_{22}) + q_{12})\bigr)`, :math:`\dot k_{12} = b^2 k_{12}`."""
    a2, b2 = constants
    k12 = ops.mul(a2, ops.exp(ops.mul(b2, ops.add(ops.mul(0.5, ops.add(q11, q22)), q12))))
    return k12, (ops.mul(b2, k12) if need_dot else None)


# ==================================================================================================
# The activations
# ==================================================================================================


class Erf(Activation):
    r""":math:`\phi(x) = a\,\operatorname{erf}(b x) + c` (Williams 1997).

    .. math::
        k_{12} = \frac{2a^2}{\pi} \arcsin\frac{2 b^2 q_{12}}{\sqrt{(1 + 2b^2 q_{11})(1 + 2b^2 q_{22})}} + c^2,
        \qquad
        \dot k_{12} = \frac{4 a^2 b^2}{\pi} \bigl[(1 + 2b^2 q_{11})(1 + 2b^2 q_{22}) - 4 b^4 q_{12}^2\bigr]^{-1/2}.

    The arcsine is evaluated as ``atan2`` of the two legs, which stays accurate and has finite
    derivatives for every correlation, including identical inputs. The squared leg is formed as
    :math:`1 + 2b^2(q_{11} + q_{22}) + 4b^4 \max(q_{11}q_{22} - q_{12}^2, 0)` (the Gram determinant
    is never negative), so large variances do not cancel to a negative number (float32 inputs of
    scale :math:`10^4` did); on the diagonal :math:`k = \tfrac{2a^2}{\pi}\operatorname{atan2}(2b^2 q,
    \sqrt{1 + 4b^2 q}) + c^2`, whose derivative stays finite where :math:`\arcsin` of a ratio
    rounded to one has an infinite one.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__()
        self.a, self.b, self.c = real_parameter("a", a), real_parameter("b", b), real_parameter("c", c)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def formula_constants(self) -> tuple[float, float, float, float, float]:
        """The constants of :func:`erf_pair`."""
        b2 = self.b**2
        return 2 * b2, 4 * b2 * b2, 2 * self.a**2 / math.pi, self.c**2, 4 * self.a**2 * b2 / math.pi

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return erf_pair(TORCH, self.formula_constants(), q11, q12, q22, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        b2 = self.b**2
        k = (2 * self.a**2 / math.pi) * torch.atan2(2 * b2 * q, torch.sqrt(1 + 4 * b2 * q)) + self.c**2
        kdot = (4 * self.a**2 * b2 / math.pi) * torch.rsqrt(1 + 4 * b2 * q) if need_dot else None
        return k, kdot

    def __repr__(self) -> str:
        return f"Erf(a={self.a}, b={self.b}, c={self.c})"


class GELU(Activation):
    r""":math:`\phi(x) = x\,\Phi(x)` with :math:`\Phi` the standard normal CDF (Tsuchida et al. 2021);
    with ``approximate=True`` its tanh approximation (Hendrycks & Gimpel 2016),
    :math:`\phi(x) = \tfrac x2\bigl(1 + \tanh\bigl(\sqrt{2/\pi}\,(x + 0.044715\,x^3)\bigr)\bigr)`
    (``torch.nn.functional.gelu(x, approximate="tanh")``, evaluated as in :func:`gelu_tanh`).

    The exact GELU has the closed form below. The tanh approximation has none: its duals are
    Gauss–Hermite quadratures (:class:`~gpntk.activations.quadrature.Elementwise` with ``degree``
    points per dimension, the analytic :math:`\phi'`), with their accuracy estimate and
    :class:`~gpntk.ApproximationWarning`. Its integrand has complex poles about 1.8 from the real
    axis (where :math:`\sqrt{2/\pi}(x + 0.044715x^3) = \pm i\pi/2`), so the rule converges
    slowly at large variances, like ``Tanh``'s; the default ``degree`` is larger than
    ``Elementwise``'s for that reason (see :data:`GELU_TANH_DEGREE`).

    With :math:`\delta^2 = (1 + q_{11})(1 + q_{22}) - q_{12}^2` and
    :math:`\alpha = \operatorname{atan2}(q_{12}, \delta)`,

    .. math::
        k_{12} = \frac{q_{12}}{4} + \frac{1}{2\pi}\Bigl[q_{12}\,\alpha +
            \frac{q_{12}^2 + q_{11} q_{22}\, \delta^2}{(1 + q_{11})(1 + q_{22})\, \delta}\Bigr],
        \qquad
        \dot k_{12} = \frac14 + \frac{\alpha}{2\pi} + \frac{q_{12}}{2\pi\delta}
            \Bigl[\frac{1}{\delta^2} + \frac{1 - q_{11} q_{22}}{(1 + q_{11})(1 + q_{22})} + 1\Bigr].
    """

    def __init__(self, approximate: bool = False, degree: int | None = None):
        super().__init__()
        self.approximate = bool_argument("GELU approximate", approximate, error=ArchitectureError)
        if degree is not None and not self.approximate:
            raise ArchitectureError(
                "GELU degree is the quadrature order of the tanh approximation; the exact GELU "
                "(approximate=False) has a closed-form kernel and takes no degree"
            )
        self.quadrature = None
        if self.approximate:
            self.quadrature = _GELUTanhQuadrature(GELU_TANH_DEGREE if degree is None else degree)

    def fn(self, x: Tensor) -> Tensor:
        return gelu_tanh(x) if self.approximate else torch.nn.functional.gelu(x)

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        if self.quadrature is not None:
            return self.quadrature.dual(q11, q12, q22, need_dot)
        prod_plus_1 = (1 + q11) * (1 + q22)
        prod = q11 * q22
        delta2 = 1 + q11 + q22 + gram_determinant(TORCH, q11, q12, q22)  # (1 + q11)(1 + q22) - q12², never below 1
        delta = delta2.sqrt()
        alpha = torch.atan2(q12, delta)
        k12 = q12 / 4 + (q12 * alpha + (q12.square() + prod * delta2) / (prod_plus_1 * delta)) / (2 * math.pi)
        kdot12 = None
        if need_dot:
            bracket = 1 / delta2 + (1 - prod) / prod_plus_1 + 1
            kdot12 = 0.25 + alpha / (2 * math.pi) + q12 * bracket / (2 * math.pi * delta)
        return k12, kdot12

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        if self.quadrature is not None:
            return self.quadrature.dual_diag(q, need_dot)
        root = torch.sqrt(1 + 2 * q)
        alpha = torch.atan2(q, root)
        k = q * (0.25 + (q / ((q + 1) * root) + alpha / 2) / math.pi)
        kdot = None
        if need_dot:
            delta2 = 1 + 2 * q
            bracket = 1 / delta2 + (1 - q.square()) / (1 + q).square() + 1
            kdot = 0.25 + alpha / (2 * math.pi) + q * bracket / (2 * math.pi * root)
        return k, kdot

    def __repr__(self) -> str:
        return "GELU()" if self.quadrature is None else repr(self.quadrature)


class Sin(Activation):
    r""":math:`\phi(x) = a \sin(b x + c)`.

    With :math:`s_\pm = \exp\!\bigl(-\tfrac{b^2}{2}(q_{11} + q_{22} \mp 2 q_{12})\bigr)`,

    .. math::
        k_{12} = \frac{a^2}{2}\bigl(s_+ - \cos(2c)\, s_-\bigr), \qquad
        \dot k_{12} = \frac{a^2 b^2}{2}\bigl(s_+ + \cos(2c)\, s_-\bigr),

    from :math:`\sin\alpha\sin\beta = \tfrac12[\cos(\alpha-\beta) - \cos(\alpha+\beta)]` and
    :math:`\mathbb E \cos(w) = e^{-\operatorname{Var}(w)/2}` for centred Gaussian :math:`w`.
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__()
        self.a, self.b, self.c = real_parameter("a", a), real_parameter("b", b), real_parameter("c", c)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self.c)

    def cos_2c(self) -> float:
        """:math:`\\cos 2c` (``Cos`` and ``Rbf`` give their exact values: for ``Rbf``, 0 rather than the rounded
        :math:`\\cos(\\pi/2)`)."""
        return math.cos(2 * self.c)

    def formula_constants(self) -> tuple[float, float, float, float]:
        """The constants of :func:`sin_pair`."""
        b2 = self.b**2
        return -0.5 * b2, self.cos_2c(), self.a**2 / 2, self.a**2 * b2 / 2

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return sin_pair(TORCH, self.formula_constants(), q11, q12, q22, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        b2 = self.b**2
        s_minus = self.cos_2c() * torch.exp(-2 * b2 * q)
        k = (self.a**2 / 2) * (1 - s_minus)
        kdot = (self.a**2 * b2 / 2) * (1 + s_minus) if need_dot else None
        return k, kdot

    def __repr__(self) -> str:
        return f"Sin(a={self.a}, b={self.b}, c={self.c})"


class Cos(Sin):
    r""":math:`\phi(x) = a \cos(b x + c) = a \sin(b x + c + \pi/2)`."""

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__(a, b, real_parameter("c", c) + math.pi / 2)
        self.cos_phase = real_parameter("c", c)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.cos(self.b * x + self.cos_phase)

    def cos_2c(self) -> float:
        return -math.cos(2 * self.cos_phase)

    def __repr__(self) -> str:
        return f"Cos(a={self.a}, b={self.b}, c={self.cos_phase})"


class Rbf(Sin):
    r""":math:`\phi(x) = \sqrt2 \sin(\sqrt{2\gamma}\, x + \pi/4)`, whose NNGP is the RBF kernel of its pre-activations.

    .. math::
        k_{12} = \exp\bigl(-\gamma (q_{11} + q_{22} - 2 q_{12})\bigr), \qquad \dot k_{12} = 2\gamma\, k_{12}.
    """

    def __init__(self, gamma: float = 1.0):
        gamma = real_parameter("gamma", gamma)
        if gamma <= 0:
            from ..errors import ArchitectureError

            raise ArchitectureError(f"Rbf gamma must be positive, got {gamma}")
        super().__init__(math.sqrt(2.0), math.sqrt(2 * gamma), math.pi / 4)
        self.gamma = gamma

    def cos_2c(self) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"Rbf(gamma={self.gamma})"


class Exp(Activation):
    r""":math:`\phi(x) = a\, e^{b x}`:
    :math:`k_{12} = a^2 \exp\bigl(\tfrac{b^2}{2}(q_{11} + q_{22}) + b^2 q_{12}\bigr)`,
    :math:`\dot k_{12} = b^2 k_{12}`."""

    def __init__(self, a: float = 1.0, b: float = 1.0):
        super().__init__()
        self.a, self.b = real_parameter("a", a), real_parameter("b", b)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x)

    def formula_constants(self) -> tuple[float, float]:
        """The constants of :func:`exp_pair`: :math:`(a^2, b^2)`."""
        return self.a**2, self.b**2

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return exp_pair(TORCH, self.formula_constants(), q11, q12, q22, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        b2 = self.b**2
        k = self.a**2 * torch.exp(2 * b2 * q)
        return k, (b2 * k if need_dot else None)

    def __repr__(self) -> str:
        return f"Exp(a={self.a}, b={self.b})"


class Gaussian(Activation):
    r""":math:`\phi(x) = a\, e^{b x^2}`; its moments are finite while :math:`4 b q < 1`.

    With :math:`D^2 = (1 - 2b q_{11})(1 - 2b q_{22}) - 4 b^2 q_{12}^2 = \det(I - 2b\Sigma)` and the
    Gaussian integrals :math:`\mathbb E\, e^{b\, z^\top z} = \det(I - 2b\Sigma)^{-1/2}`,
    :math:`\mathbb E\, u v\, e^{b\, z^\top z} = q_{12} / D^3`,

    .. math::
        k_{12} = \frac{a^2}{D}, \qquad \dot k_{12} = \frac{4 a^2 b^2\, q_{12}}{D^3}.
    """

    def __init__(self, a: float = 1.0, b: float = -1.0):
        super().__init__()
        self.a, self.b = real_parameter("a", a), real_parameter("b", b)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.exp(self.b * x.square())

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        b = self.b
        self._check_finite(torch.maximum(q11.max(), q22.max()))
        det = 1 - 2 * b * (q11 + q22) + 4 * b * b * gram_determinant(TORCH, q11, q12, q22)
        inv_root = torch.rsqrt(det)
        k12 = self.a**2 * inv_root
        kdot12 = 4 * self.a**2 * b * b * q12 * inv_root**3 if need_dot else None
        return k12, kdot12

    def _check_finite(self, q: Tensor) -> None:
        if self.b <= 0 or is_batched(q):  # inside vmap no value can raise: an infinite moment gives NaN
            return
        if bool((4 * self.b * q >= 1).any()):
            raise ValueError(
                f"Gaussian(a={self.a}, b={self.b}) has an infinite second moment for pre-activation "
                f"variances >= 1/(4b) = {1 / (4 * self.b):.4g}; the largest here is {q.max().item():.4g}"
            )

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        b = self.b
        self._check_finite(q)
        k = self.a**2 * torch.rsqrt(1 - 4 * b * q)
        kdot = 4 * self.a**2 * b * b * q * (1 - 4 * b * q) ** -1.5 if need_dot else None
        return k, kdot

    def __repr__(self) -> str:
        return f"Gaussian(a={self.a}, b={self.b})"


# ==================================================================================================
# GELU's tanh approximation, Gabor and SigmoidLike (Neural Tangents' activations)
# ==================================================================================================

#: the default Gauss–Hermite order of ``GELU(approximate=True)`` (points per dimension)
GELU_TANH_DEGREE = 128

_GELU_TANH_SCALE = math.sqrt(2 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    r""":math:`\tfrac x2\bigl(1 + \tanh z\bigr) = x\,\sigma(2z)`, :math:`z = \sqrt{2/\pi}(x + 0.044715 x^3)`:
    GELU's tanh approximation.

    Evaluated as :math:`x\,\sigma(2z)` (:math:`\sigma` the logistic function), which keeps its
    relative accuracy in the negative tail, where :math:`1 + \tanh z` cancels (``torch``'s
    ``gelu(x, approximate="tanh")`` is off there, relatively, by :math:`6 \cdot 10^{-12}` at
    :math:`x = -4.5`, :math:`3 \cdot 10^{-7}` at :math:`x = -6`, and rounds to 0 at :math:`x = -8`).
    """
    return x * torch.sigmoid(2 * _GELU_TANH_SCALE * (x + _GELU_TANH_CUBIC * x**3))


def gelu_tanh_derivative(x: Tensor) -> Tensor:
    r"""Its derivative :math:`\sigma + 2x\,\sigma(1 - \sigma)\sqrt{2/\pi}(1 + 3 \cdot 0.044715 x^2)`,
    :math:`\sigma = \sigma(2z)`."""
    s = torch.sigmoid(2 * _GELU_TANH_SCALE * (x + _GELU_TANH_CUBIC * x**3))
    return s + 2 * x * s * (1 - s) * _GELU_TANH_SCALE * (1 + 3 * _GELU_TANH_CUBIC * x.square())


class _GELUTanhQuadrature(Elementwise):
    """The quadrature of ``GELU(approximate=True)`` (named so in its accuracy warnings)."""

    def __init__(self, degree: int):
        super().__init__(gelu_tanh, gelu_tanh_derivative, degree, "gelu_tanh")

    def __repr__(self) -> str:
        degree = "" if self.degree == GELU_TANH_DEGREE else f", degree={self.degree}"
        return f"GELU(approximate=True{degree})"


def gabor_pair(
    ops: DualOps[V], constants: Sequence[V | float], q11: V, q12: V, q22: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Gabor` (no constants).

    With :math:`s = q_{11} + q_{22}`, :math:`g = \max(q_{11}q_{22} - q_{12}^2, 0)`,
    :math:`D = \det(I + 2\Sigma) = 1 + 2s + 4g` and
    :math:`E_\pm = \exp\bigl(-N_\pm / 2D\bigr)`, :math:`N_\pm = s + 4g \mp 2q_{12}`,

    .. math::
        k_{12} = \frac{E_+ - E_-}{2\sqrt D}, \qquad
        \dot k_{12} = \frac{\partial k_{12}}{\partial q_{12}}
            = \frac{E_+\bigl((8q_{12} + 1)D - 4q_{12}N_+\bigr) - E_-\bigl((8q_{12} - 1)D - 4q_{12}N_-\bigr)}{2D^{5/2}}
    """
    total = ops.add(q11, q22)
    spread = ops.add(total, ops.mul(4, gram_determinant(ops, q11, q12, q22)))  # s + 4g
    det = ops.add(1, ops.add(total, spread))  # 1 + 2s + 4g
    n_plus, n_minus = ops.sub(spread, ops.mul(2, q12)), ops.add(spread, ops.mul(2, q12))
    inv_2det = ops.div(0.5, det)
    e_plus = ops.exp(ops.mul(ops.sub(0, n_plus), inv_2det))
    e_minus = ops.exp(ops.mul(ops.sub(0, n_minus), inv_2det))
    root = ops.sqrt(det)
    k12 = ops.div(ops.sub(e_plus, e_minus), ops.mul(2, root))
    if not need_dot:
        return k12, None
    four_q12 = ops.mul(4, q12)
    plus = ops.mul(e_plus, ops.sub(ops.mul(ops.add(ops.mul(2, four_q12), 1), det), ops.mul(four_q12, n_plus)))
    minus = ops.mul(e_minus, ops.sub(ops.mul(ops.sub(ops.mul(2, four_q12), 1), det), ops.mul(four_q12, n_minus)))
    kdot12 = ops.div(ops.sub(plus, minus), ops.mul(ops.mul(2, root), ops.square(det)))
    return k12, kdot12


class Gabor(Activation):
    r""":math:`\phi(x) = e^{-x^2} \sin x` (Neural Tangents' ``Gabor``), with a closed-form dual.

    From :math:`\sin u \sin v = \tfrac12[\cos(u - v) - \cos(u + v)]` and the Gaussian integral
    :math:`\mathbb E\bigl[e^{-z^\top z} \cos(b^\top z)\bigr] = \det(I + 2\Sigma)^{-1/2}
    \exp\bigl(-\tfrac12 b^\top \Sigma (I + 2\Sigma)^{-1} b\bigr)` for :math:`z \sim \mathcal N(0, \Sigma)`
    (complete the square; e.g. Rasmussen & Williams 2006, A.2), with :math:`b = (1, \mp 1)`:
    see :func:`gabor_pair`. :math:`\dot k_{12} = \mathbb E[\phi'(u)\phi'(v)]` is
    :math:`\partial k_{12}/\partial q_{12}` by Price's theorem (Price 1958). On the diagonal
    :math:`k = \bigl(1 - e^{-2q/(1 + 4q)}\bigr) / (2\sqrt{1 + 4q})`.
    """

    def fn(self, x: Tensor) -> Tensor:
        return torch.exp(-x.square()) * torch.sin(x)

    def formula_constants(self) -> tuple[()]:
        """The constants of :func:`gabor_pair` (none)."""
        return ()

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return gabor_pair(TORCH, (), q11, q12, q22, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        # the pair formula at q11 = q12 = q22: the Gram determinant is exactly 0 there
        return gabor_pair(TORCH, (), q, q, q, need_dot)


#: the scale of :class:`SigmoidLike`: :math:`\tfrac12\operatorname{erf}(x / 2.4020563531719796) + \tfrac12`
SIGMOID_LIKE_SCALE = 2.4020563531719796


class SigmoidLike(Erf):
    r""":math:`\phi(x) = \tfrac12 \operatorname{erf}(x / 2.4020563531719796) + \tfrac12`, an erf shaped
    like the logistic sigmoid (Neural Tangents' ``Sigmoid_like``): :class:`Erf` with :math:`a = \tfrac12`,
    :math:`b = 1/2.4020563531719796`, :math:`c = \tfrac12` and its closed form (Williams 1997)."""

    def __init__(self) -> None:
        super().__init__(0.5, 1 / SIGMOID_LIKE_SCALE, 0.5)

    def __repr__(self) -> str:
        return "SigmoidLike()"
