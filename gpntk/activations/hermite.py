r"""``Hermite(degree)``: the normalised probabilists' Hermite polynomial :math:`\phi = He_d/\sqrt{d!}`.

At unit pre-activation variance the Hermite polynomials are orthogonal and the dual is
:math:`\mathbb E[\phi(u)\phi(v)] = q_{12}^d` (Mehler's formula; O'Donnell 2014, ch. 11), which is
the kernel Neural Tangents' ``Hermite`` layer computes whatever the variance. gpntk computes the
exact expectation at every variance instead, so the kernel stays the one of the finite network
(:math:`\phi` is a polynomial, so the expectation is a polynomial in :math:`q_{11}, q_{12}, q_{22}`,
as for :class:`~gpntk.activations.polynomial.Polynomial`). With the scaling identity

.. math::
    He_d(\gamma x) = \sum_k \binom{d}{2k} (2k-1)!!\, \gamma^{d-2k} (\gamma^2 - 1)^k\, He_{d-2k}(x)

and :math:`\mathbb E[He_a(z_1) He_b(z_2)] = \delta_{ab}\, a!\, \rho^a` for standard normal
:math:`z_1, z_2` of correlation :math:`\rho`,

.. math::
    k_{12} = \sum_{k=0}^{\lfloor d/2 \rfloor} a_k\, q_{12}^{d-2k}\, \bigl[(q_{11} - 1)(q_{22} - 1)\bigr]^k,
    \qquad a_k = \frac{d!}{(d-2k)!\, 4^k\, (k!)^2},

which is :math:`q_{12}^d` at unit variances (exactly: the terms :math:`k > 0` vanish, nothing
cancels). Since :math:`He_d' = d\, He_{d-1}`, :math:`\phi' = \sqrt d\, He_{d-1}/\sqrt{(d-1)!}` and
:math:`\dot k_{12} = d\, k_{12}^{(d-1)} = \partial k_{12}/\partial q_{12}` (Price's theorem):
:math:`\dot k_{12} = \sum_k a_k (d - 2k)\, q_{12}^{d-2k-1} [(q_{11}-1)(q_{22}-1)]^k`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from .._validation import integer_argument
from ..errors import ArchitectureError
from .base import Activation
from .ops import TORCH, DualOps

__all__ = ["Hermite", "hermite_pair"]

V = TypeVar("V")


def hermite_pair(
    ops: DualOps[V], constants: Sequence[V | float], degree: int, q11: V, q12: V, q22: V, need_dot: bool
) -> tuple[V, V | None]:
    r"""The dual of :class:`Hermite` of ``degree`` :math:`d`; constants :math:`(a_0, a_1, \ldots)`,
    one per :math:`k \le d/2`.

    :math:`k_{12} = \sum_k a_k q_{12}^{d-2k} P^k` and :math:`\dot k_{12} = \sum_k a_k (d - 2k)
    q_{12}^{d-2k-1} P^k` with :math:`P = (q_{11} - 1)(q_{22} - 1)`.
    """
    spread = ops.mul(ops.sub(q11, 1), ops.sub(q22, 1))
    k12: V | None = None
    kdot12: V | None = None
    for k, a_k in enumerate(constants):
        power = degree - 2 * k
        weight = ops.mul(a_k, ops.power(spread, k))
        term = ops.mul(weight, ops.power(q12, power))
        k12 = term if k12 is None else ops.add(k12, term)
        if need_dot and power > 0:
            dot_term = ops.mul(ops.mul(weight, power), ops.power(q12, power - 1))
            kdot12 = dot_term if kdot12 is None else ops.add(kdot12, dot_term)
    assert k12 is not None  # constants has floor(d/2) + 1 >= 1 entries
    if need_dot and kdot12 is None:  # degree 0: a constant activation
        kdot12 = ops.mul(0, k12)
    return k12, kdot12


class Hermite(Activation):
    r""":math:`\phi(x) = He_d(x) / \sqrt{d!}`, the probabilists' Hermite polynomial of degree :math:`d`
    (:math:`He_0 = 1`, :math:`He_1 = x`, :math:`He_{n+1} = x He_n - n He_{n-1}`), normalised to unit
    second moment under :math:`\mathcal N(0, 1)`; Neural Tangents' ``Hermite``.

    Its kernel is the exact expectation for any pre-activation variance (module notes): at unit
    variance :math:`k_{12} = q_{12}^d`, :math:`\dot k_{12} = d\, q_{12}^{d-1}` (the values of Neural
    Tangents, which uses this unit-variance form everywhere); elsewhere the two differ, and gpntk's is
    the kernel the finite network ``net.finite(width)`` converges to.
    """

    def __init__(self, degree: int):
        super().__init__()
        self.degree = integer_argument("Hermite degree", degree, minimum=0, error=ArchitectureError)
        self._norm = 1 / math.sqrt(math.factorial(self.degree))

    def fn(self, x: Tensor) -> Tensor:
        previous, current = torch.ones_like(x), x
        if self.degree == 0:
            return previous
        for n in range(1, self.degree):
            previous, current = current, x * current - n * previous
        return current * self._norm

    def formula_constants(self) -> tuple[float, ...]:
        r"""The constants of :func:`hermite_pair`: :math:`a_k = d! / ((d-2k)!\, 4^k (k!)^2)`."""
        d = self.degree
        return tuple(
            math.factorial(d) / (math.factorial(d - 2 * k) * 4**k * math.factorial(k) ** 2) for k in range(d // 2 + 1)
        )

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return hermite_pair(TORCH, self.formula_constants(), self.degree, q11, q12, q22, need_dot)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return hermite_pair(TORCH, self.formula_constants(), self.degree, q, q, q, need_dot)

    def __repr__(self) -> str:
        return f"Hermite(degree={self.degree})"
