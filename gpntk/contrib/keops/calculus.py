r"""Forward-mode derivatives on the expression graph: dual numbers whose values and tangents are graph nodes.

The backward pass of ``K @ v`` carries the derivatives of the kernel with respect to
:math:`x \cdot x'`, the per-point features and the hyperparameters through the same graph as the
values (see "Gradients" in :mod:`gpntk.contrib.keops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast, overload

from .graph import _Graph, _Node

# ==================================================================================================
# Dual numbers: values with forward-mode derivatives, as graph nodes
# ==================================================================================================


class _Tangent:
    """Derivatives of a scalar with respect to ``D`` directions: a dense ``D``-vector node plus single entries.

    ``sparse`` maps a direction to a scalar node (the derivative along it), so that the
    contributions of one layer's own features and hyperparameters stay scalars until the end of
    the layer (:meth:`_Calculus.settle`).
    """

    __slots__ = ("dense", "sparse")

    def __init__(self, dense: _Node | None = None, sparse: dict[int, _Node | None] | None = None) -> None:
        self.dense = dense
        self.sparse: dict[int, _Node | None] = sparse or {}


@dataclass
class _Dual:
    value: _Node
    tangent: _Tangent | None = None


class _Calculus:
    """Arithmetic on :class:`_Dual` numbers for one formula (``D`` derivative directions).

    Implements :class:`gpntk.activations.ops.DualOps` on :class:`_Dual` numbers, so that the
    closed-form dual activations of :mod:`gpntk.activations` (written once against that protocol)
    build their KeOps formulas here: Python numbers in a formula become exact KeOps literals
    (:meth:`lift`), the layers' constants arrive as entries of the constants vector, and
    identically zero values are ``None``.
    """

    def __init__(self, graph: _Graph, directions: int, constants: dict[str, int], const_var: _Node):
        self.g = graph
        self.D = directions
        self._constants = constants
        self._const_var = const_var
        self.one = graph.int(1)

    # ---- tangents -------------------------------------------------------------------------
    def t_add(self, a: _Tangent | None, b: _Tangent | None) -> _Tangent | None:
        if a is None:
            return b
        if b is None:
            return a
        sparse = dict(a.sparse)
        for k, v in b.sparse.items():
            sparse[k] = self.g.add(sparse.get(k), v)
        return _Tangent(self.g.add(a.dense, b.dense), sparse)

    def t_scale(self, t: _Tangent | None, s: _Node | None) -> _Tangent | None:
        if t is None or s is None:
            return None
        return _Tangent(self.g.mul(s, t.dense), {k: self.g.mul(s, v) for k, v in t.sparse.items()})

    def t_neg(self, t: _Tangent | None) -> _Tangent | None:
        if t is None:
            return None
        return _Tangent(self.g.neg(t.dense), {k: self.g.neg(v) for k, v in t.sparse.items()})

    def t_vector(self, t: _Tangent | None) -> _Node | None:
        """The tangent as one ``D``-vector node (None if identically zero)."""
        if t is None:
            return None
        out = t.dense
        for k in sorted(t.sparse):
            if t.sparse[k] is not None:
                out = self.g.add(out, self.g.elem_t(cast(_Node, t.sparse[k]), self.D, k))
        return out

    def seed(self, direction: int | None) -> _Tangent | None:
        return None if direction is None else _Tangent(None, {direction: self.one})

    # ---- constants --------------------------------------------------------------------------
    def const(self, name: str) -> _Dual:
        return _Dual(self.g.elem(self._const_var, self._constants[name]))

    def integer(self, value: int) -> _Dual:
        return _Dual(self.g.int(value))

    def lift(self, x: _Dual | float) -> _Dual:
        """``x``, a Python number becoming an exact KeOps literal (``IntCst``, or ``RatCst`` for a dyadic
        fraction such as 0.5 that float32 holds exactly); other numbers must be constants of the layer."""
        if isinstance(x, _Dual):
            return x
        exact = Fraction(x)
        p, q = exact.numerator, exact.denominator
        if q == 1:
            return self.integer(p)
        if q <= 1 << 10 and abs(p) < 1 << 24:
            return _Dual(self.g.node("rat", data=(p, q), dim=1))
        raise ValueError(f"the number {x!r} has no exact KeOps literal: pass it in the layer's constants")

    # ---- arithmetic (gpntk.activations.ops.DualOps) -----------------------------------------------
    def add(self, a: _Dual | float, b: _Dual | float) -> _Dual:
        x, y = self.lift(a), self.lift(b)
        return _Dual(self.g.add(x.value, y.value), self.t_add(x.tangent, y.tangent))

    def sub(self, a: _Dual | float, b: _Dual | float) -> _Dual:
        x, y = self.lift(a), self.lift(b)
        return _Dual(self.g.sub(x.value, y.value), self.t_add(x.tangent, self.t_neg(y.tangent)))

    def mul(self, a: _Dual | float, b: _Dual | float) -> _Dual:
        x, y = self.lift(a), self.lift(b)
        tangent = self.t_add(self.t_scale(x.tangent, y.value), self.t_scale(y.tangent, x.value))
        # values are never the zero constant (None only stands for zero tangents)
        return _Dual(cast(_Node, self.g.mul(x.value, y.value)), tangent)

    def div(self, a: _Dual | float, b: _Dual | float) -> _Dual:
        r""":math:`x/y`, derivative :math:`(\mathrm dx - (x/y)\, \mathrm dy)/y`."""
        x, y = self.lift(a), self.lift(b)
        value = self.g.node("div", x.value, y.value)
        inverse = self.g.node("div", self.one, y.value)
        quotient_tangent = self.t_neg(self.t_scale(y.tangent, self.g.mul(value, inverse)))
        tangent = self.t_add(self.t_scale(x.tangent, inverse), quotient_tangent)
        return _Dual(value, tangent)

    def square(self, x: _Dual) -> _Dual:
        return _Dual(self.g.unary("square", x.value), self.t_scale(x.tangent, self.g.mul(self.g.int(2), x.value)))

    def sqrt(self, x: _Dual) -> _Dual:
        r""":math:`\sqrt x`, derivative :math:`1/(2\sqrt x)`."""
        value = self.g.unary("sqrt", x.value)
        return _Dual(value, self.t_scale(x.tangent, self.g.node("div", self.lift(0.5).value, value)))

    def exp(self, x: _Dual) -> _Dual:
        value = self.g.unary("exp", x.value)
        return _Dual(value, self.t_scale(x.tangent, value))

    def atan2(self, y: _Dual, x: _Dual) -> _Dual:
        r""":math:`\operatorname{atan2}(y, x)`, derivative :math:`(x\, \mathrm dy - y\, \mathrm dx)/(x^2 + y^2)`."""
        value = self.g.node("atan2", y.value, x.value)
        radius2 = self.g.add(self.g.unary("square", x.value), self.g.unary("square", y.value))
        tangent = self.t_add(
            self.t_scale(y.tangent, self.g.node("div", x.value, radius2)),
            self.t_neg(self.t_scale(x.tangent, self.g.node("div", y.value, radius2))),
        )
        return _Dual(value, tangent)

    def power(self, x: _Dual, p: int) -> _Dual:
        out = self.integer(1)
        for _ in range(p):
            out = self.mul(out, x)
        return out

    def clamp_min(self, x: _Dual, lower: _Dual | float) -> _Dual:
        r""":math:`\max(x, \mathrm{lower})`; the derivative passes where ``x >= lower`` (as torch's)."""
        bound = self.lift(lower)
        condition = x.value if bound.value is self.g.int(0) else self.g.sub(x.value, bound.value)
        return self.if_nonnegative(condition, x, bound)

    def tiny(self, like: _Dual) -> _Dual:
        return self.const("tiny")

    def where_positive(self, condition: _Dual, x: _Dual) -> _Dual:
        return self.if_nonnegative(self.g.neg(condition.value), self.integer(0), x)

    def arccos_j(self, rho: _Dual, p: int) -> _Dual:
        if p == 0:
            return self.arccos_j0(rho)
        if p == 1:
            return self.arccos_j1(rho, self.arccos_j0(rho))
        raise NotImplementedError(f"the KeOps backend has the arc-cosine functions J_0 and J_1 only, not J_{p}")

    def arccos_j1_j0(self, rho: _Dual) -> tuple[_Dual, _Dual]:
        j0 = self.arccos_j0(rho)
        return self.arccos_j1(rho, j0), j0

    def zeros_like(self, x: _Dual) -> None:
        return None

    def is_zero(self, c: _Dual | float) -> bool:
        return not isinstance(c, _Dual) and c == 0

    def one_minus_square(self, x: _Dual) -> _Node:
        """:math:`1 - x^2` (value only)."""
        return self.g.sub(self.one, self.g.unary("square", x.value))

    def clamp_unit(self, x: _Dual) -> _Dual:
        """``x`` clamped to [-1, 1]; the derivative passes where -1 <= x <= 1 (as torch.clamp's)."""
        minus_one = self.g.int(-1)
        value = self.g.node("clamp", x.value, minus_one, self.one)
        inside = self.g.mul(
            self.g.unary("step", self.g.add(x.value, self.one)), self.g.unary("step", self.g.sub(self.one, x.value))
        )
        return _Dual(value, self.t_scale(x.tangent, inside))

    def if_nonnegative(self, condition: _Node, x: _Dual, y: _Dual) -> _Dual:
        """``x`` where ``condition >= 0`` else ``y`` (``condition`` has no derivative)."""
        value = self.g.node("ifelse", condition, x.value, y.value)
        chosen = self.g.unary("step", condition)
        tangent = self.t_add(self.t_scale(x.tangent, chosen), self.t_scale(y.tangent, self.g.sub(self.one, chosen)))
        return _Dual(value, tangent)

    def arccos_j0(self, rho: _Dual) -> _Dual:
        r""":math:`J_0(\rho) = \pi - \arccos\rho`, derivative :math:`1/\sqrt{\max(1-\rho^2, \epsilon)}`."""
        value = self.g.sub(self.const("pi").value, self.g.unary("acos", rho.value))
        floor = self.g.node("clamp", self.one_minus_square(rho), self.const("eps").value, self.one)
        return _Dual(value, self.t_scale(rho.tangent, self.g.unary("rsqrt", floor)))

    def arccos_j1(self, rho: _Dual, j0: _Dual) -> _Dual:
        r""":math:`J_1(\rho) = \sqrt{1-\rho^2} + \rho J_0(\rho)`, derivative :math:`J_0(\rho)` (finite at 1)."""
        product = cast(_Node, self.g.mul(j0.value, rho.value))
        value = self.g.add(self.g.unary("sqrt", self.one_minus_square(rho)), product)
        return _Dual(value, self.t_scale(rho.tangent, j0.value))

    @overload
    def settle(self, dual: _Dual) -> _Dual: ...
    @overload
    def settle(self, dual: _Dual | None) -> _Dual | None: ...
    def settle(self, dual: _Dual | None) -> _Dual | None:
        """``dual`` with its tangent as one ``D``-vector (at the end of a layer, so that the next one scales
        two vectors rather than one scalar per direction)."""
        if dual is None:
            return None
        self.g.pin(dual.value)
        if dual.tangent is None:
            return dual
        return _Dual(dual.value, _Tangent(self.g.pin(self.t_vector(dual.tangent))))
