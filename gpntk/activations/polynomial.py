r"""Polynomial activations: ``Monomial(degree)`` and ``Polynomial(coef)``.

For jointly Gaussian :math:`(u, v)`, Isserlis' theorem counts the pairings of :math:`i` copies of
:math:`u` and :math:`j` copies of :math:`v`: choosing the :math:`m` cross pairs,

.. math::
    \mathbb E[u^i v^j] = \sum_{m} \binom{i}{m}\binom{j}{m} m!\; q_{12}^m\;
        (i-m-1)!!\, q_{11}^{(i-m)/2}\; (j-m-1)!!\, q_{22}^{(j-m)/2},

over :math:`m \le \min(i, j)` with :math:`i - m` and :math:`j - m` even. For
:math:`\phi(x) = \sum_i c_i x^i` this gives :math:`k_{12} = \sum_{i,j} c_i c_j\, \mathbb E[u^i v^j]`,
and :math:`\dot k_{12}` from the coefficients of :math:`\phi'`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .._validation import integer_argument
from ..errors import ArchitectureError
from .base import Activation, double_factorial, real_parameter

__all__ = ["Polynomial", "Monomial", "gaussian_moment"]


def gaussian_moment(i: int, j: int, q11: Tensor, q12: Tensor, q22: Tensor) -> Tensor:
    r""":math:`\mathbb E[u^i v^j]` for :math:`(u, v) \sim \mathcal N(0, [[q_{11}, q_{12}], [q_{12}, q_{22}]])`."""
    total = torch.zeros_like(q12 + q11 + q22)
    for m in range(min(i, j) + 1):
        if (i - m) % 2 or (j - m) % 2:
            continue
        count = math.comb(i, m) * math.comb(j, m) * math.factorial(m)
        count *= double_factorial(i - m - 1) * double_factorial(j - m - 1)
        total = total + count * q12**m * q11 ** ((i - m) // 2) * q22 ** ((j - m) // 2)
    return total


def _pair_expectation(coef_u: list[float], coef_v: list[float], q11: Tensor, q12: Tensor, q22: Tensor) -> Tensor:
    total = torch.zeros_like(q12 + q11 + q22)
    for i, ci in enumerate(coef_u):
        for j, cj in enumerate(coef_v):
            if ci and cj:
                total = total + (ci * cj) * gaussian_moment(i, j, q11, q12, q22)
    return total


class Polynomial(Activation):
    r""":math:`\phi(x) = \sum_i c_i x^i` with ``coef`` :math:`= (c_0, c_1, \ldots)`;
    exact kernels by Isserlis' theorem."""

    def __init__(self, coef: Iterable[float]) -> None:
        super().__init__()
        if isinstance(coef, (str, bytes, set, frozenset, dict)) or not isinstance(coef, Iterable):
            # a string is iterable but no sequence of numbers: Polynomial("12") is not [1, 2]; a set
            # or dict has no order of coefficients
            raise ArchitectureError(f"Polynomial coef must be a sequence of numbers (c0, c1, ...), got {coef!r}")
        if isinstance(coef, (torch.Tensor, np.ndarray)) and coef.ndim != 1:
            raise ArchitectureError(f"Polynomial coef must be one-dimensional, got shape {tuple(coef.shape)}")
        coef = [real_parameter(f"coef[{i}]", c) for i, c in enumerate(coef)]
        if not coef:
            raise ArchitectureError("Polynomial coef must not be empty")
        self.coef = coef
        self.derivative_coef = [i * c for i, c in enumerate(coef)][1:]

    def fn(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for c in reversed(self.coef):  # Horner's scheme
            out = out * x + c
        return out

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        k12 = _pair_expectation(self.coef, self.coef, q11, q12, q22)
        kdot12 = _pair_expectation(self.derivative_coef, self.derivative_coef, q11, q12, q22) if need_dot else None
        return k12, kdot12

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        return self.dual(q, q, q, need_dot)

    def __repr__(self) -> str:
        return f"Polynomial(coef={self.coef})"


class Monomial(Polynomial):
    r""":math:`\phi(x) = x^p`: :math:`k_{12} = \mathbb E[u^p v^p]`,
    :math:`\dot k_{12} = p^2\,\mathbb E[u^{p-1} v^{p-1}]`."""

    def __init__(self, degree: int):
        degree = integer_argument("Monomial degree", degree, minimum=0, error=ArchitectureError)
        super().__init__([0.0] * degree + [1.0])
        self.degree = degree

    def fn(self, x: Tensor) -> Tensor:
        return x**self.degree

    def __repr__(self) -> str:
        return f"Monomial(degree={self.degree})"
