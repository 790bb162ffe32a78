r"""The operations the closed-form dual activations are written with, and their torch implementation.

Each closed-form pair dual :math:`(k_{12}, \dot k_{12})` of :mod:`gpntk.activations` is stated once,
as a function of an ``ops`` object satisfying :class:`DualOps` (``abrelu_pair``, ``sign_pair`` and
``rectified_monomial_pair`` in :mod:`.arccos`; ``erf_pair``, ``sin_pair`` and ``exp_pair`` in
:mod:`.smooth`), of the layer's constants (:meth:`formula_constants` of each class, floats) and of
the pair's quantities. Two implementations evaluate these formulas:

* :data:`TORCH` (:class:`TorchOps`): tensors of pairs, as :meth:`Activation.dual` computes them
  (each operation is the plain torch operator, so a formula evaluates exactly as the same
  expression written with tensors);
* the KeOps backend's (``gpntk.contrib.keops.forms``): dual numbers over the nodes of a KeOps
  formula, where the constants are entries of a parameter vector.

Operands written as Python numbers in a formula (``1``, ``2``, ``0.5``) are literals every
implementation must represent exactly; any other number is a constant of the layer and is passed
in ``constants`` (floats for torch, parameters for KeOps), so that one compiled KeOps formula
serves every value.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, cast

import torch
from torch import Tensor

from .angular import arccos_j, arccos_j1_j0

__all__ = ["DualOps", "TorchOps", "TORCH", "gram_determinant"]

V = TypeVar("V")


class DualOps(Protocol[V]):
    """The operations a closed-form dual is written with, on values of type ``V``.

    ``a``, ``b`` may be values or Python numbers (literals or the floats of ``constants``).
    """

    def add(self, a: V | float, b: V | float) -> V:
        """:math:`a + b`."""
        ...

    def sub(self, a: V | float, b: V | float) -> V:
        """:math:`a - b`."""
        ...

    def mul(self, a: V | float, b: V | float) -> V:
        """:math:`a b`."""
        ...

    def div(self, a: V | float, b: V | float) -> V:
        """:math:`a / b`."""
        ...

    def square(self, x: V) -> V:
        """:math:`x^2`."""
        ...

    def sqrt(self, x: V) -> V:
        r""":math:`\sqrt x` (for :math:`x > 0`)."""
        ...

    def exp(self, x: V) -> V:
        """:math:`e^x`."""
        ...

    def atan2(self, y: V, x: V) -> V:
        r"""The angle of :math:`(x, y)`: :math:`\arctan(y/x)` for :math:`x > 0`."""
        ...

    def power(self, x: V, p: int) -> V:
        """:math:`x^p` for an integer :math:`p \\ge 0` (:math:`x^0 = 1`, with zero derivative)."""
        ...

    def clamp_min(self, x: V, lower: V | float) -> V:
        r""":math:`\max(x, \mathrm{lower})`; the derivative passes where :math:`x \ge \mathrm{lower}` (as torch's)."""
        ...

    def tiny(self, like: V) -> V | float:
        """The smallest positive normal number of ``like``'s floating point type."""
        ...

    def where_positive(self, condition: V, x: V) -> V:
        """``x`` where ``condition > 0``, else 0 (with zero derivative)."""
        ...

    def arccos_j(self, rho: V, p: int) -> V:
        r"""The arc-cosine function :math:`J_p(\rho)` (:func:`gpntk.activations.angular.arccos_j`)."""
        ...

    def arccos_j1_j0(self, rho: V) -> tuple[V, V]:
        r""":math:`(J_1(\rho), J_0(\rho))`, sharing one :math:`\arccos`."""
        ...

    def zeros_like(self, x: V) -> V | None:
        """Zeros shaped as ``x`` (``None`` where the implementation represents zero that way)."""
        ...

    def is_zero(self, c: V | float) -> bool:
        """Whether ``c`` is known to be zero when the formula is written (a term with factor ``c`` is left out)."""
        ...


class TorchOps:
    """:class:`DualOps` on tensors: each operation is the plain torch operator (``a + b``, ``torch.exp``, ...)."""

    def add(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        return cast(Tensor, a + b)

    def sub(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        return cast(Tensor, a - b)

    def mul(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        return cast(Tensor, a * b)

    def div(self, a: Tensor | float, b: Tensor | float) -> Tensor:
        return cast(Tensor, a / b)

    def square(self, x: Tensor) -> Tensor:
        return x.square()

    def sqrt(self, x: Tensor) -> Tensor:
        return x.sqrt()

    def exp(self, x: Tensor) -> Tensor:
        return torch.exp(x)

    def atan2(self, y: Tensor, x: Tensor) -> Tensor:
        return torch.atan2(y, x)

    def power(self, x: Tensor, p: int) -> Tensor:
        return x**p

    def clamp_min(self, x: Tensor, lower: Tensor | float) -> Tensor:
        return x.clamp_min(lower)

    def tiny(self, like: Tensor) -> float:
        return torch.finfo(like.dtype).tiny

    def where_positive(self, condition: Tensor, x: Tensor) -> Tensor:
        return torch.where(condition > 0, x, torch.zeros_like(x))

    def arccos_j(self, rho: Tensor, p: int) -> Tensor:
        return arccos_j(rho, p)

    def arccos_j1_j0(self, rho: Tensor) -> tuple[Tensor, Tensor]:
        return arccos_j1_j0(rho)

    def zeros_like(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def is_zero(self, c: Tensor | float) -> bool:
        return isinstance(c, (int, float)) and c == 0


#: the torch implementation of :class:`DualOps` (stateless)
TORCH = TorchOps()


def gram_determinant(ops: DualOps[V], q11: V, q12: V, q22: V) -> V:
    r""":math:`\max(q_{11} q_{22} - q_{12}^2, 0)`: the determinant of a pair's covariance, never negative.

    Mathematically non-negative; in floating point it cancels, and for large variances (float32
    inputs of scale :math:`10^4`) rounding made it negative by more than the terms it is added to,
    which turned square roots of positive quantities into NaN. At identical inputs
    (:math:`q_{12} = q_{11} = q_{22}` exactly) it is exactly 0.
    """
    return ops.clamp_min(ops.sub(ops.mul(q11, q22), ops.square(q12)), 0)
