r"""Activations with arc-cosine dual kernels: the ReLU family, Sign and rectified monomials.

Cho & Saul (2009) show that for the rectified monomial :math:`\phi(x) = x^p\,\mathbb 1[x > 0]`

.. math::
    \mathbb E[\phi(u)\phi(v)] = \frac{(q_{11} q_{22})^{p/2}}{2\pi} J_p(\theta), \qquad
    \theta = \arccos \rho,\ \rho = \frac{q_{12}}{\sqrt{q_{11} q_{22}}},

with the arc-cosine functions :math:`J_p` of :mod:`gpntk.activations.angular` (exact and finite
derivatives at :math:`\rho = \pm 1`). Each pair dual is written once (``abrelu_pair``,
``sign_pair``, ``rectified_monomial_pair``) against :class:`gpntk.activations.ops.DualOps`, as a
function of :math:`(\rho, \sqrt{q_{11} q_{22}})`: ``dual`` evaluates it on tensors with the
correlation of :func:`~gpntk.activations.base.correlation`, and the KeOps backend on formula
nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from .._validation import integer_argument
from ..errors import ArchitectureError
from .angular import arccos_j, arccos_j1_j0
from .base import Activation, correlation, double_factorial
from .base import real_parameter as _real
from .ops import TORCH, DualOps

__all__ = [
    "ReLU", "LeakyReLU", "ABReLU", "Abs", "Sign", "RectifiedMonomial", "abrelu_pair", "sign_pair",
    "rectified_monomial_pair", "arccos_j", "arccos_j1_j0",
]

V = TypeVar("V")

# ==================================================================================================
# The pair formulas, written once for every backend (gpntk.activations.ops)
# ==================================================================================================
# Each takes the pair's correlation rho = q12 / sqrt(q11 q22) (clamped to [-1, 1]) and
# sqrt_prod = sqrt(q11) sqrt(q22), which every backend computes its own way (correlation() below
# scales by powers of two; the KeOps backend multiplies per-point reciprocal square roots and sets
# rho = 1 for identical points).


def abrelu_pair(
    ops: DualOps[V], constants: Sequence[V | float], q12: V, rho: V, sqrt_prod: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`ABReLU`: constants :math:`(ab, (b-a)^2/2\pi)` (:meth:`ABReLU.formula_constants`).

    .. math::
        k_{12} = ab\, q_{12} + \frac{(b-a)^2}{2\pi}\sqrt{q_{11}q_{22}}\, J_1(\rho), \qquad
        \dot k_{12} = ab + \frac{(b-a)^2}{2\pi} J_0(\rho);

    the terms in :math:`ab` are left out where it is known to be zero (ReLU).
    """
    ab, scale = constants
    if need_dot:
        j1, j0 = ops.arccos_j1_j0(rho)
    else:
        j1, j0 = ops.arccos_j(rho, 1), None
    k12 = ops.mul(ops.mul(scale, sqrt_prod), j1)
    kdot12 = None if j0 is None else ops.mul(scale, j0)
    if not ops.is_zero(ab):
        k12 = ops.add(ops.mul(ab, q12), k12)
        kdot12 = None if kdot12 is None else ops.add(ab, kdot12)
    return k12, kdot12


def sign_pair(
    ops: DualOps[V], constants: Sequence[V | float], rho: V, sqrt_prod: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Sign`: constants :math:`(2/\pi,)`; :math:`k_{12} = \tfrac2\pi J_0(\rho) - 1`
    where both variances are positive, else 0, and :math:`\dot k_{12} = 0`."""
    (two_over_pi,) = constants
    k12 = ops.where_positive(sqrt_prod, ops.sub(ops.mul(two_over_pi, ops.arccos_j(rho, 0)), 1))
    return k12, (ops.zeros_like(k12) if need_dot else None)


def rectified_monomial_pair(
    ops: DualOps[V], constants: Sequence[V | float], degree: int, rho: V, sqrt_prod: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`RectifiedMonomial` of degree :math:`p`: constants :math:`(2\pi,)`;

    .. math::
        k_{12} = \frac{(q_{11}q_{22})^{p/2} J_p(\rho)}{2\pi}, \qquad
        \dot k_{12} = \frac{p^2 (q_{11}q_{22})^{(p-1)/2} J_{p-1}(\rho)}{2\pi}\ (0 \text{ for } p = 0).
    """
    (two_pi,) = constants
    p = degree
    k12 = ops.div(ops.mul(ops.power(sqrt_prod, p), ops.arccos_j(rho, p)), two_pi)
    kdot12 = None
    if need_dot:
        if p == 0:
            kdot12 = ops.zeros_like(k12)
        else:
            kdot12 = ops.div(ops.mul(ops.mul(p * p, ops.power(sqrt_prod, p - 1)), ops.arccos_j(rho, p - 1)), two_pi)
    return k12, kdot12


# ==================================================================================================
# The activations
# ==================================================================================================



class ABReLU(Activation):
    r""":math:`\phi(x) = a \min(x, 0) + b \max(x, 0)`.

    Writing :math:`\phi(x) = a x + (b - a)\,\mathrm{ReLU}(x)` and using
    :math:`\mathbb E[u\,\mathrm{ReLU}(v)] = q_{12}/2`,

    .. math::
        k_{12} = a b\, q_{12} + \frac{(b-a)^2}{2\pi} \sqrt{q_{11}q_{22}}\, J_1(\rho), \qquad
        \dot k_{12} = a b + \frac{(b - a)^2}{2\pi} J_0(\rho),

    and on the diagonal :math:`k = \tfrac{a^2+b^2}{2} q`, :math:`\dot k = \tfrac{a^2+b^2}{2}`
    (Cho & Saul 2009; Novak et al. 2020).
    """

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = _real("a", a), _real("b", b)

    def fn(self, x: Tensor) -> Tensor:
        return self.a * torch.clamp(x, max=0) + self.b * torch.clamp(x, min=0)

    def formula_constants(self) -> tuple[float, float]:
        """The constants of :func:`abrelu_pair`: :math:`(ab, (b-a)^2/2\\pi)`."""
        a, b = self.a, self.b
        return a * b, (b - a) ** 2 / (2 * math.pi)

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        rho, sqrt_prod = correlation(q11, q12, q22)
        return abrelu_pair(TORCH, self.formula_constants(), q12, rho, sqrt_prod, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        scale = (self.a**2 + self.b**2) / 2
        return scale * q, (torch.full_like(q, scale) if need_dot else None)

    def __repr__(self) -> str:
        return f"ABReLU(a={self.a}, b={self.b})"


class ReLU(ABReLU):
    r""":math:`\phi(x) = \max(x, 0)`: the arc-cosine kernel of order one (Cho & Saul 2009)."""

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def __repr__(self) -> str:
        return "ReLU()"


class LeakyReLU(ABReLU):
    r""":math:`\phi(x) = \max(x, 0) + \alpha \min(x, 0)` with ``negative_slope`` :math:`\alpha`."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__(negative_slope, 1.0)
        self.negative_slope = self.a

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Abs(ABReLU):
    r""":math:`\phi(x) = |x|`."""

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def __repr__(self) -> str:
        return "Abs()"


class Sign(Activation):
    r""":math:`\phi(x) = \operatorname{sign}(x)`:
    :math:`k_{12} = \tfrac{2}{\pi}\arcsin\rho = \tfrac{2}{\pi} J_0(\rho) - 1`.

    Its derivative vanishes almost everywhere, so :math:`\dot k = 0`: the layers below a Sign
    do not contribute to the NTK (as in Novak et al. 2020). A point of zero variance maps to zero.
    """

    def fn(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def formula_constants(self) -> tuple[float]:
        """The constants of :func:`sign_pair`: :math:`(2/\\pi,)`."""
        return (2 / math.pi,)

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        rho, sqrt_prod = correlation(q11, q12, q22)
        return sign_pair(TORCH, self.formula_constants(), rho, sqrt_prod, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        k = (q > 0).to(q.dtype)
        return k, (torch.zeros_like(q) if need_dot else None)


class RectifiedMonomial(Activation):
    r""":math:`\phi(x) = x^p\, \mathbb 1[x \ge 0]`, the arc-cosine kernel of order :math:`p` (Cho & Saul 2009).

    .. math::
        k_{12} = \frac{(q_{11}q_{22})^{p/2}}{2\pi} J_p(\rho), \qquad
        \dot k_{12} = p^2 \frac{(q_{11}q_{22})^{(p-1)/2}}{2\pi} J_{p-1}(\rho),

    and on the diagonal :math:`k = (2p-1)!!\, q^p / 2`, :math:`\dot k = p^2 (2p-3)!!\, q^{p-1}/2`.
    For :math:`p = 0` (the step function) :math:`\dot k = 0`.
    """

    def __init__(self, degree: int):
        super().__init__()
        degree = integer_argument("RectifiedMonomial degree", degree, minimum=0, error=ArchitectureError)
        self.degree = degree

    def fn(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, x**self.degree, torch.zeros_like(x))

    def formula_constants(self) -> tuple[float]:
        """The constants of :func:`rectified_monomial_pair`: :math:`(2\\pi,)`."""
        return (2 * math.pi,)

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        rho, sqrt_prod = correlation(q11, q12, q22)
        return rectified_monomial_pair(TORCH, self.formula_constants(), self.degree, rho, sqrt_prod, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        p = self.degree
        k = double_factorial(2 * p - 1) * q**p / 2
        kdot = None
        if need_dot:
            kdot = torch.zeros_like(q) if p == 0 else p * p * double_factorial(2 * p - 3) * q ** (p - 1) / 2
        return k, kdot

    def __repr__(self) -> str:
        return f"RectifiedMonomial(degree={self.degree})"
