r"""Forward-mode derivatives on the expression graph: dual numbers whose values and tangents are graph nodes.

The backward pass of ``K @ v`` carries the derivatives of the kernel with respect to
:math:`x \cdot x'`, the per-point features and the hyperparameters through the same graph as the
values (see "Gradients" in :mod:`gpntk.kernels.keops`).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """Arithmetic on :class:`_Dual` numbers for one formula (``D`` derivative directions)."""

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

    # ---- arithmetic ---------------------------------------------------------------------------
    def add(self, x: _Dual, y: _Dual) -> _Dual:
        return _Dual(self.g.add(x.value, y.value), self.t_add(x.tangent, y.tangent))

    def sub(self, x: _Dual, y: _Dual) -> _Dual:
        return _Dual(self.g.sub(x.value, y.value), self.t_add(x.tangent, self.t_neg(y.tangent)))

    def mul(self, x: _Dual, y: _Dual) -> _Dual:
        tangent = self.t_add(self.t_scale(x.tangent, y.value), self.t_scale(y.tangent, x.value))
        # values are never the zero constant (None only stands for zero tangents)
        return _Dual(cast(_Node, self.g.mul(x.value, y.value)), tangent)

    def exp(self, x: _Dual) -> _Dual:
        value = self.g.unary("exp", x.value)
        return _Dual(value, self.t_scale(x.tangent, value))

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

    def arcsin(self, x: _Dual) -> tuple[_Dual, _Node]:
        r""":math:`\arcsin x` and :math:`1/\sqrt{1-x^2}` (its derivative)."""
        inv_leg = self.g.unary("rsqrt", self.one_minus_square(x))
        return _Dual(self.g.unary("asin", x.value), self.t_scale(x.tangent, inv_leg)), inv_leg

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
