r"""KeOps backend: the kernel of a fully-connected network as a pykeops formula, for very large n.

A KeOps reduction evaluates a formula :math:`F(x_i, y_j)` for every pair on the fly and sums
it against a vector, :math:`\sum_j F(x_i, y_j)\, v_j`, without ever storing a matrix (memory
:math:`O(n)`; fast on GPUs, slow but usable on CPUs). :func:`keops_covariance` returns the NTK
or NNGP kernel matrix of a network as such a symbolic ``LazyTensor``, whose ``K @ v`` is one
reduction and is differentiable in the inputs and every hyperparameter.

Supported architectures (:func:`keops_supported`): serial chains of ``Dense`` layers and
activations whose dual kernels have closed forms,

* the arc-cosine family (Cho & Saul 2009): ``ReLU``, ``LeakyReLU``, ``ABReLU``, ``Abs``,
  ``RectifiedMonomial`` of degree 1 (= ReLU) and 0 (the step function), and ``Sign``;
* ``Erf`` (Williams 1997), ``Exp``, ``Sin``, ``Cos`` and ``Rbf``;
* ``Identity``.

**The recursion.** With :math:`\Sigma_0(x, x') = x \cdot x'/d` and :math:`\Theta_0 = 0`, a
``Dense`` layer maps :math:`\Sigma \leftarrow \sigma_w^2 \Sigma + \sigma_b^2`,
:math:`\Theta \leftarrow \sigma_w^2 \Theta + \Sigma` (the last term only for a trainable layer),
and an activation maps :math:`\Sigma \leftarrow k(\Sigma)`,
:math:`\Theta \leftarrow \dot k(\Sigma)\, \Theta` with the dual kernels :math:`k, \dot k` of
:mod:`gpntk.activations`. The per-point variances :math:`q_l(x) = \Sigma_l(x, x)` of every layer
do not depend on the other point: they are computed in torch by the exact per-point recursion
(``Activation.dual_diag``, never through a correlation of one) and enter the formula as KeOps
``Vi``/``Vj`` variables ("features" such as :math:`\sqrt{q}` and :math:`1/\sqrt{q}`); only the
pair quantities :math:`\Sigma_l(x, x')`, :math:`\Theta_l(x, x')` are symbolic. The
hyperparameters :math:`\sigma_w^2, \sigma_b^2` are one ``Pm`` (parameter) vector and the
constants of the activations another, so that new values reuse the compiled formula.

**Linear size.** Each layer uses the previous :math:`\Sigma_{12}` several times (in the
correlation, in :math:`\sqrt{1-\rho^2}`, in :math:`\arccos\rho`, ...), so the formula written as a
plain expression tree (as pykeops' ``LazyTensor`` arithmetic writes it) grows exponentially with
depth. Here the recursion is built as an expression graph (:class:`_Graph`, identical
sub-expressions merged) and written to KeOps with every repeated value computed once, by
keopscore's ``Factorize(f, g)`` (evaluate ``g`` once into a temporary, substitute it for every
occurrence in ``f``). The values are grouped by level into a chain of state vectors, each bound
once at the top level of the formula string by a Python assignment expression that keopscore's
parser (``eval``) evaluates in order,

``[(_s1 := Concat(a, b)), (_s2 := Factorize(Concat(Extract(_s1, 0, 1), f(Elem(_s1, 0), Elem(_s1, 1))), _s1)),``
``..., result][-1]``,

where each state holds the new values of its level and copies the earlier ones still needed
(the C++ compiler removes the copies: measured no slower than nested ``Factorize`` blocks). Each
state reads only the previous one, so the formula string, keopscore's expression tree, its
parsing and the generated code all grow linearly with depth (measured in
``tests/test_keops.py``). keopscore's ``AutoFactorize`` finds the same sharing automatically,
but only by searching the already exponential tree.

**Gradients.** KeOps' own autodiff differentiates a ``Factorize`` by substituting the bound
expression back, which is exponential in depth again, so ``K @ v`` has its own backward pass:
forward-mode derivatives (dual numbers) with respect to :math:`x \cdot x'`, the per-point
features and the hyperparameters are carried through the same graph, as vectors, and two
reductions (one over :math:`j`, one over :math:`i`; for ``K(X, X)`` the kernel is a symmetric
function and the first serves for both) contract them with :math:`(g_i \cdot v_j)`; torch's
autograd then takes the features back to the inputs and the hyperparameters. The formulas of
the derivatives also grow linearly with depth. The backward pass is not itself differentiable
(no second derivatives).

**Identical points.** Where :math:`x_i = x_j` (bitwise, tested as ``SqDist(x_i, x_j) == 0``) the
arc-cosine correlations are set to exactly one, so that :math:`\arccos` is not evaluated at
:math:`1 - \epsilon` (whose error :math:`\sqrt{2\epsilon}` would reach the NTK through
:math:`J_0`): the values then equal the exact per-point recursion, and their derivatives are
those of the dense backend (half the derivative of :math:`k(x, x)` to each argument).
Correlations are clamped to :math:`[-1, 1]` and :math:`1/\sqrt{1 - \rho^2}` to at most
:math:`1/\sqrt{\epsilon}`, as in :mod:`gpntk.activations.arccos`, so gradients stay finite.

**Compilation.** Every distinct formula is compiled once (10-35 s on a 2-core CPU) and cached
on disk in pykeops' build folder (``pykeops.set_build_folder``); a new process only regenerates
its code (under a second to a few seconds), and keeps it in memory. A
formula depends on the architecture's structure (not on hyperparameter or activation-constant
values), the input dimension ``d``, the number of right-hand sides (rounded up to a power of
two, padding with zero columns) and the dtype. Inputs always carry at least one batch dimension,
so batched and unbatched calls share one compiled module.

References: Y. Cho and L. K. Saul, *Kernel methods for deep learning*, NeurIPS 2009 (arc-cosine
kernels); C. K. I. Williams, *Computing with infinite networks*, NeurIPS 1997 (the erf kernel);
B. Charlier, J. Feydy, J. A. Glaunès, F.-D. Collin and G. Durif, *Kernel operations on the GPU,
with autodiff, without memory overflows*, JMLR 2021 (KeOps).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from torch import Tensor

from ..activations.arccos import ABReLU, Abs, LeakyReLU, RectifiedMonomial, ReLU, Sign
from ..activations.base import safe_sqrt
from ..activations.smooth import Cos, Erf, Exp, Rbf, Sin
from ..layers.base import Identity, Layer, Serial, hyperparameter_key, parameterized_layers
from ..layers.dense import Dense

if TYPE_CHECKING:  # pragma: no cover
    from pykeops.torch import LazyTensor

__all__ = ["keops_supported", "keops_covariance", "keops_formula"]

Output = Literal["ntk", "nngp"]


# ==================================================================================================
# Which architectures have a formula
# ==================================================================================================


def _flatten(net: Layer) -> list[Layer]:
    """The layers of nested ``Serial`` blocks, in order."""
    if type(net) is Serial:
        return [layer for sub in net.layers for layer in _flatten(sub)]
    return [net]


def keops_supported(net: Layer, input_shape: Sequence[int] | None = None) -> str | None:
    """``None`` if the KeOps backend can evaluate ``net``, else a sentence saying why not (naming the layer).

    Supported: vector inputs (``input_shape`` ``None`` or ``(d,)``) and serial chains of ``Dense``
    layers, ``Identity`` and the activations listed in :mod:`gpntk.kernels.keops`. Everything
    else (convolutions, pooling, branches, ``LayerNorm``, activations evaluated by quadrature or
    without a closed form here) has no KeOps formula; the dense and blockwise backends evaluate
    those.
    """
    if input_shape is not None and len(input_shape) >= 2:
        return (
            f"the KeOps backend evaluates fully-connected networks on vector inputs only, got input_shape "
            f"{tuple(input_shape)} (spatial inputs)"
        )
    for layer in _flatten(net):
        if isinstance(layer, Dense) or type(layer) is Identity:
            continue
        form = _FORMS.get(type(layer))
        if form is None:
            return (
                f"the KeOps backend has no formula for {layer.name} ({layer!r}); it supports serial chains of "
                f"Dense layers and the activations {', '.join(sorted({c.__name__ for c in _FORMS}))}"
            )
        reason = form.unsupported(layer)
        if reason is not None:
            return f"the KeOps backend has no formula for {layer!r}: {reason}"
    return None


# ==================================================================================================
# A small expression graph, written to KeOps with let-bindings
# ==================================================================================================


class _Node:
    """One operation of the per-pair formula: ``op`` applied to ``args`` (``data``: its integer/str options)."""

    __slots__ = ("op", "args", "data", "dim")

    def __init__(self, op: str, args: tuple["_Node", ...], data, dim: int):
        self.op, self.args, self.data, self.dim = op, args, data, dim

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"_Node({self.op}, dim={self.dim})"


#: keopscore names of the operations
_KEOPS_NAMES = {
    "add": "Add", "sub": "Subtract", "mul": "Mult", "neg": "Minus", "sqrt": "Sqrt", "rsqrt": "Rsqrt",
    "acos": "Acos", "asin": "Asin", "exp": "Exp", "square": "Square", "clamp": "Clamp", "ifelse": "IfElse",
    "step": "Step", "scalprod": "Scalprod", "sqdist": "SqDist", "concat": "Concat",
}


class _Graph:
    """Builds :class:`_Node` s, merging identical sub-expressions (hash-consing) and folding trivial ones.

    ``None`` stands for an identically zero term throughout (``add(None, x) = x``,
    ``mul(None, x) = None``).
    """

    def __init__(self):
        self._memo: dict[tuple, _Node] = {}
        #: nodes the emitter computes in a state vector even when used once (the ends of layers), so
        #: that the formula's nesting, and the recursion of keopscore's parser, stay bounded by one layer
        self.pinned: set[int] = set()

    def pin(self, node: _Node | None) -> _Node | None:
        if node is not None and not _leaf_like(node):
            self.pinned.add(id(node))
        return node

    def node(self, op: str, *args: _Node, data=None, dim: int | None = None) -> _Node:
        key = (op, tuple(id(a) for a in args), data)
        found = self._memo.get(key)
        if found is None:
            if dim is None:
                dim = max((a.dim for a in args), default=1)
            found = self._memo[key] = _Node(op, args, data, dim)
        return found

    # leaves
    def var(self, name: str, dim: int) -> _Node:
        return self.node("var", data=name, dim=dim)

    def int(self, value: int) -> _Node:
        return self.node("int", data=value, dim=1)

    def elem(self, a: _Node, k: int) -> _Node:
        return self.node("elem", a, data=k, dim=1)

    def extract(self, a: _Node, start: int, length: int) -> _Node:
        if start == 0 and length == a.dim:
            return a
        return self.node("extract", a, data=(start, length), dim=length)

    def elem_t(self, a: _Node, dim: int, k: int) -> _Node:
        return self.node("elemT", a, data=(dim, k), dim=dim)

    # arithmetic with zero (None) and one folded away
    def _is_int(self, a: _Node | None, value: int) -> bool:
        return a is not None and a.op == "int" and a.data == value

    def add(self, a: _Node | None, b: _Node | None) -> _Node | None:
        if a is None or self._is_int(a, 0):
            return b
        if b is None or self._is_int(b, 0):
            return a
        return self.node("add", a, b)

    def sub(self, a: _Node | None, b: _Node | None) -> _Node | None:
        if b is None:
            return a
        if a is None:
            return self.neg(b)
        return self.node("sub", a, b)

    def neg(self, a: _Node | None) -> _Node | None:
        return None if a is None else self.node("neg", a)

    def mul(self, a: _Node | None, b: _Node | None) -> _Node | None:
        if a is None or b is None or self._is_int(a, 0) or self._is_int(b, 0):
            return None
        if self._is_int(a, 1):
            return b
        if self._is_int(b, 1):
            return a
        if b.op == "elemT" and a.dim == 1:  # s * e_k t = e_k (s t): stays a single entry
            return self.elem_t(self.mul(a, b.args[0]), *b.data)
        if a.op == "elemT" and b.dim == 1:
            return self.elem_t(self.mul(a.args[0], b), *a.data)
        return self.node("mul", a, b)

    def unary(self, op: str, a: _Node) -> _Node:
        return self.node(op, a)

    def concat(self, pieces: Sequence[_Node]) -> _Node:
        out = pieces[-1]
        for piece in reversed(pieces[:-1]):
            out = self.node("concat", piece, out, dim=piece.dim + out.dim)
        return out



def _leaf_like(node: _Node) -> bool:
    """Nodes cheaper to repeat than to bind: variables, constants and entries of variables."""
    if node.op in ("var", "int"):
        return True
    return node.op in ("elem", "extract") and node.args[0].op == "var"


def _postorder(root: _Node, stop: Callable[[_Node], bool]) -> tuple[list[_Node], dict[int, int]]:
    """Nodes reachable from ``root`` without entering ``stop`` nodes (children first) and reference counts.

    The counts are per edge (a node used twice by one parent counts twice) and include the
    ``stop`` nodes met at the frontier. Iterative, so deep formulas do not hit Python's recursion limit.
    """
    order: list[_Node] = []
    counts: dict[int, int] = {}
    seen: set[int] = {id(root)}
    stack: list[tuple[_Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        if i < len(node.args):
            stack.append((node, i + 1))
            child = node.args[i]
            counts[id(child)] = counts.get(id(child), 0) + 1
            if id(child) not in seen and not stop(child):
                seen.add(id(child))
                stack.append((child, 0))
        else:
            order.append(node)
    return order, counts


def _emit(root: _Node, names: dict[str, str], pinned: set[int] = frozenset()) -> str:
    """The keopscore formula string of ``root`` as a chain of state vectors (see the module docstring).

    Every node used more than once, or ``pinned`` (``shared``), is computed once, in the state vector of its
    *level* (one more than the highest level among the shared nodes its expression reads). Level
    ``l``'s state holds the new values of that level and the earlier ones still needed later:
    ``(_sl := Factorize(Concat(..., Elem(_s{l-1}, k), f(Elem(_s{l-1}, k'), ...), ...), _s{l-1}))``,
    bound in order at the top level of ``[(_s1 := ...), (_s2 := ...), ..., root][-1]``. Each
    state reads only the one before it, so keopscore's ``Factorize`` (which rewrites its whole
    argument, up to the previous state) and its code generation do work linear in the number of
    states, and ``names`` (the variables' text) is all the emitter needs.
    """
    nodes, counts = _postorder(root, _leaf_like)
    shared = {
        id(n) for n in nodes
        if n is not root and not _leaf_like(n) and (counts.get(id(n), 0) > 1 or id(n) in pinned)
    }
    order = {id(n): i for i, n in enumerate(nodes)}  # children first: a deterministic order
    # level of each shared node and the shared nodes each expression reads directly
    height: dict[int, int] = {}
    reads: dict[int, set[int]] = {}
    level: dict[int, int] = {}
    by_id = {id(n): n for n in nodes}
    for node in nodes:  # children first
        h, r = 0, set()
        for child in node.args:
            if id(child) in shared:
                h = max(h, level[id(child)])
                r.add(id(child))
            elif id(child) in height:
                h = max(h, height[id(child)])
                r |= reads[id(child)]
        height[id(node)], reads[id(node)] = h, r
        if id(node) in shared:
            level[id(node)] = h + 1
    top = height[id(root)] + 1
    last_use: dict[int, int] = {}
    for consumer in [*(by_id[i] for i in shared), root]:
        at = top if consumer is root else level[id(consumer)]
        for i in reads[id(consumer)]:
            last_use[i] = max(last_use.get(i, 0), at)

    def inline(node: _Node, where: dict[int, int], state: str) -> str:
        if id(node) in where:  # a value of the previous state
            at = where[id(node)]
            return f"Elem({state},{at})" if node.dim == 1 else f"Extract({state},{at},{node.dim})"
        op = node.op
        if op == "var":
            return names[node.data]
        if op == "int":
            return f"IntCst({node.data})"
        args = [inline(a, where, state) for a in node.args]
        if op == "elem":
            return f"Elem({args[0]},{node.data})"
        if op == "extract":
            return f"Extract({args[0]},{node.data[0]},{node.data[1]})"
        if op == "elemT":
            return f"ElemT({args[0]},{node.data[0]},{node.data[1]})"
        return f"{_KEOPS_NAMES[op]}({','.join(args)})"

    def concat(pieces: list[str]) -> str:  # balanced, so that no value is copied more than log(k) times
        if len(pieces) == 1:
            return pieces[0]
        half = len(pieces) // 2
        return f"Concat({concat(pieces[:half])},{concat(pieces[half:])})"

    definitions: list[str] = []
    where: dict[int, int] = {}  # position of each live value in the current state
    live: list[int] = []
    state = ""
    for step in range(1, top):
        new = sorted((i for i, l in level.items() if l == step), key=order.__getitem__)
        keep = [i for i in live if last_use[i] > step]
        pieces, layout, offset, run = [], {}, 0, None
        for i in keep:  # runs of consecutive kept values are copied as one Extract
            at, dim = where[i], by_id[i].dim
            if run is not None and run[0] + run[1] == at:
                run[1] += dim
            else:
                if run is not None:
                    pieces.append(f"Extract({state},{run[0]},{run[1]})")
                run = [at, dim]
            layout[i] = offset
            offset += dim
        if run is not None:
            pieces.append(f"Extract({state},{run[0]},{run[1]})")
        for i in new:
            pieces.append(inline(by_id[i], where, state))
            layout[i] = offset
            offset += by_id[i].dim
        body = concat(pieces)
        name = f"_s{step}"
        definitions.append(f"({name}:={body if not state else f'Factorize({body},{state})'})")
        where, live, state = layout, keep + new, name
    final = inline(root, where, state)
    if state:
        final = f"Factorize({final},{state})"
    if not definitions:
        return final
    return "[" + ",".join(definitions + [final]) + "][-1]"


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

    def __init__(self, dense: _Node | None = None, sparse: dict[int, _Node] | None = None):
        self.dense = dense
        self.sparse = sparse or {}


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
                out = self.g.add(out, self.g.elem_t(t.sparse[k], self.D, k))
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
        return _Dual(self.g.mul(x.value, y.value), tangent)

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
        value = self.g.add(self.g.unary("sqrt", self.one_minus_square(rho)), self.g.mul(j0.value, rho.value))
        return _Dual(value, self.t_scale(rho.tangent, j0.value))

    def arcsin(self, x: _Dual) -> tuple[_Dual, _Node]:
        r""":math:`\arcsin x` and :math:`1/\sqrt{1-x^2}` (its derivative)."""
        inv_leg = self.g.unary("rsqrt", self.one_minus_square(x))
        return _Dual(self.g.unary("asin", x.value), self.t_scale(x.tangent, inv_leg)), inv_leg

    def settle(self, dual: _Dual | None) -> _Dual | None:
        """``dual`` with its tangent as one ``D``-vector (at the end of a layer, so that the next one scales
        two vectors rather than one scalar per direction)."""
        if dual is None:
            return None
        self.g.pin(dual.value)
        if dual.tangent is None:
            return dual
        return _Dual(dual.value, _Tangent(self.g.pin(self.t_vector(dual.tangent))))


# ==================================================================================================
# Closed-form dual activations as formulas
# ==================================================================================================


class _Form:
    """How one activation type enters the formula.

    ``features(layer, q)``: per-point tensors computed in torch from the pre-activation variance
    ``q`` (..., n, 1); ``constants(layer)``: floats passed as KeOps parameters; ``pair(...)``: the
    dual kernel :math:`k` and its derivative :math:`\\dot k` (``None`` when identically zero) for a
    pair, from :math:`\\Sigma_{12}` and both points' features.
    """

    kind = ""
    feature_names: tuple[str, ...] = ()
    constant_names: tuple[str, ...] = ()
    needs_same = False  # whether identical points need the exact correlation of one

    def unsupported(self, layer) -> str | None:
        return None

    def features(self, layer, q: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def constants(self, layer) -> list[float]:
        return []

    def pair(self, c: _Calculus, consts: list[_Dual], sigma: _Dual, fi: list[_Dual], fj: list[_Dual], same):
        raise NotImplementedError


def _safe_rsqrt(q: Tensor) -> Tensor:
    """:math:`1/\\sqrt{q}`, 0 where ``q <= 0`` (with zero derivative there)."""
    positive = q > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, q, torch.ones_like(q))), torch.zeros_like(q))


def _arccos_correlation(c: _Calculus, sigma: _Dual, r_i: _Dual, r_j: _Dual, same) -> _Dual:
    r""":math:`\rho = \Sigma_{12} / \sqrt{q_1 q_2}` clamped to [-1, 1], exactly 1 for identical points."""
    rho = c.clamp_unit(c.mul(sigma, c.mul(r_i, r_j)))
    if same is not None:
        rho = c.if_nonnegative(same, c.integer(1), rho)
    return rho


class _ABReLUForm(_Form):
    r""":math:`\phi(x) = a\min(x, 0) + b\max(x, 0)` (ReLU, LeakyReLU, Abs; Cho & Saul 2009).

    .. math::
        k = ab\,\Sigma_{12} + \frac{(b-a)^2}{2\pi}\sqrt{q_1 q_2}\, J_1(\rho), \qquad
        \dot k = ab + \frac{(b-a)^2}{2\pi} J_0(\rho),

    features :math:`(\sqrt q, 1/\sqrt q)`.
    """

    kind = "abrelu"
    feature_names = ("sqrt_q", "rsqrt_q")
    constant_names = ("ab", "c")
    needs_same = True

    def _ab(self, layer) -> tuple[float, float]:
        if isinstance(layer, RectifiedMonomial):
            return 0.0, 1.0
        return layer.a, layer.b

    def features(self, layer, q):
        return [safe_sqrt(q), _safe_rsqrt(q)]

    def constants(self, layer):
        a, b = self._ab(layer)
        return [a * b, (b - a) ** 2 / (2 * math.pi)]

    def pair(self, c, consts, sigma, fi, fj, same):
        ab, scale = consts
        (sq_i, r_i), (sq_j, r_j) = fi, fj
        rho = _arccos_correlation(c, sigma, r_i, r_j, same)
        j0 = c.arccos_j0(rho)
        j1 = c.arccos_j1(rho, j0)
        k = c.add(c.mul(ab, sigma), c.mul(c.mul(scale, c.mul(sq_i, sq_j)), j1))
        kdot = c.add(ab, c.mul(scale, j0))
        return k, kdot


class _StepForm(_Form):
    r"""The step function ``RectifiedMonomial(0)``: :math:`k = J_0(\rho)/2\pi`, :math:`\dot k = 0`."""

    kind = "step"
    feature_names = ("rsqrt_q",)
    needs_same = True

    def features(self, layer, q):
        return [_safe_rsqrt(q)]

    def pair(self, c, consts, sigma, fi, fj, same):
        rho = _arccos_correlation(c, sigma, fi[0], fj[0], same)
        return c.mul(c.const("inv_2pi"), c.arccos_j0(rho)), None


class _SignForm(_Form):
    r""":math:`\mathrm{sign}`: :math:`k = \tfrac{2}{\pi}\arcsin\rho = \tfrac2\pi J_0(\rho) - 1`, :math:`\dot k = 0`.

    Features :math:`(\mathbb 1[q > 0], 1/\sqrt q)`: a point of zero variance maps to zero.
    """

    kind = "sign"
    feature_names = ("positive", "rsqrt_q")
    needs_same = True

    def features(self, layer, q):
        return [(q > 0).to(q.dtype), _safe_rsqrt(q)]

    def pair(self, c, consts, sigma, fi, fj, same):
        (pos_i, r_i), (pos_j, r_j) = fi, fj
        rho = _arccos_correlation(c, sigma, r_i, r_j, same)
        k = c.sub(c.mul(c.const("two_over_pi"), c.arccos_j0(rho)), c.integer(1))
        return c.mul(k, c.mul(pos_i, pos_j)), None


class _RectifiedForm(_Form):
    """``RectifiedMonomial``: degree 1 as the ReLU, degree 0 as the step function."""

    kind = "rectified"
    needs_same = True

    def unsupported(self, layer) -> str | None:
        if layer.degree > 1:
            return "only degrees 0 (the step function) and 1 (ReLU) have KeOps formulas"
        return None


class _ErfForm(_Form):
    r""":math:`\phi(x) = a\,\mathrm{erf}(bx) + c` (Williams 1997). With :math:`u = (1 + 2b^2 q)^{-1/2}` per point,

    .. math::
        \rho = 2b^2 \Sigma_{12}\, u_1 u_2, \qquad k = \frac{2a^2}{\pi}\arcsin\rho + c^2, \qquad
        \dot k = \frac{4a^2b^2}{\pi}\, \frac{u_1 u_2}{\sqrt{1 - \rho^2}};

    :math:`|\rho| < 1` strictly, also for identical points, so no clamping is needed.
    """

    kind = "erf"
    feature_names = ("u",)
    constant_names = ("amplitude", "two_b2", "offset", "slope")

    def features(self, layer, q):
        return [torch.rsqrt(1 + 2 * layer.b**2 * q)]

    def constants(self, layer):
        a2, b2 = layer.a**2, layer.b**2
        return [2 * a2 / math.pi, 2 * b2, layer.c**2, 4 * a2 * b2 / math.pi]

    def pair(self, c, consts, sigma, fi, fj, same):
        amplitude, two_b2, offset, slope = consts
        uu = c.mul(fi[0], fj[0])
        rho = c.mul(c.mul(two_b2, sigma), uu)
        arcsin, inv_leg = c.arcsin(rho)
        k = c.add(c.mul(amplitude, arcsin), offset)
        # kdot = slope * u1 u2 / sqrt(1 - rho^2); d(1/sqrt(1-rho^2))/drho = rho / (1-rho^2)^{3/2}
        d_inv_leg = c.g.mul(rho.value, c.g.mul(inv_leg, c.g.unary("square", inv_leg)))
        inv_leg_dual = _Dual(inv_leg, c.t_scale(rho.tangent, d_inv_leg))
        kdot = c.mul(c.mul(slope, uu), inv_leg_dual)
        return k, kdot


class _ExpForm(_Form):
    r""":math:`\phi(x) = a e^{bx}`: :math:`k = a^2 \exp(h_1 + h_2 + b^2\Sigma_{12})` with :math:`h = b^2 q/2`
    per point, :math:`\dot k = b^2 k`."""

    kind = "exp"
    feature_names = ("h",)
    constant_names = ("a2", "b2")

    def features(self, layer, q):
        return [0.5 * layer.b**2 * q]

    def constants(self, layer):
        return [layer.a**2, layer.b**2]

    def pair(self, c, consts, sigma, fi, fj, same):
        a2, b2 = consts
        k = c.mul(a2, c.exp(c.add(c.add(fi[0], fj[0]), c.mul(b2, sigma))))
        return k, c.mul(b2, k)


class _SinForm(_Form):
    r""":math:`\phi(x) = a\sin(bx + c)` (also ``Cos`` and ``Rbf``). With :math:`h = -b^2 q/2` per point and
    :math:`s_\pm = \exp(h_1 + h_2 \pm b^2 \Sigma_{12})`,

    .. math::
        k = \frac{a^2}{2}(s_+ - \cos(2c)\, s_-), \qquad \dot k = \frac{a^2 b^2}{2}(s_+ + \cos(2c)\, s_-).
    """

    kind = "sin"
    feature_names = ("h",)
    constant_names = ("half_a2", "cos2c", "b2", "half_a2b2")

    def features(self, layer, q):
        return [-0.5 * layer.b**2 * q]

    def constants(self, layer):
        a2, b2 = layer.a**2, layer.b**2
        return [a2 / 2, layer._cos_2c(), b2, a2 * b2 / 2]

    def pair(self, c, consts, sigma, fi, fj, same):
        half_a2, cos2c, b2, half_a2b2 = consts
        h = c.add(fi[0], fj[0])
        exponent = c.mul(b2, sigma)
        s_plus = c.exp(c.add(h, exponent))
        s_minus = c.mul(cos2c, c.exp(c.sub(h, exponent)))
        k = c.mul(half_a2, c.sub(s_plus, s_minus))
        kdot = c.mul(half_a2b2, c.add(s_plus, s_minus))
        return k, kdot


_ABRELU = _ABReLUForm()
_FORMS: dict[type, _Form] = {
    ReLU: _ABRELU, LeakyReLU: _ABRELU, ABReLU: _ABRELU, Abs: _ABRELU,
    Sign: _SignForm(), Erf: _ErfForm(), Exp: _ExpForm(), Sin: _SinForm(), Cos: _SinForm(), Rbf: _SinForm(),
    RectifiedMonomial: _RectifiedForm(),
}
_STEP = _StepForm()


def _form_of(layer) -> _Form:
    form = _FORMS[type(layer)]
    if form.kind == "rectified":
        return _ABRELU if layer.degree == 1 else _STEP
    return form


# ==================================================================================================
# The network as a formula
# ==================================================================================================

#: constants every formula may use, first in the constants vector
_GLOBAL_CONSTANTS = ("inv_d", "pi", "eps", "two_over_pi", "inv_2pi")


@dataclass(frozen=True)
class _Structure:
    """What a formula depends on: the layer sequence (no values), the output, the sizes."""

    #: ("dense", w_index, b_index | None, trainable) | ("act", kind, first_feature, first_constant)
    layers: tuple[tuple, ...]
    output: str
    features: int  # m: per-point features
    params: int  # p: hyperparameters
    constants: tuple[str, ...]  # names of the constants vector's entries
    needs_same: bool


@dataclass
class _Plan:
    """A network's structure plus the layer objects needed to compute features and constants."""

    structure: _Structure
    steps: list  # ("dense", layer, w_key, b_key) | ("act", layer, form)


def _plan(net: Layer, hyper_keys: Sequence[str], output: str) -> _Plan:
    reason = keops_supported(net)
    if reason is not None:
        raise ValueError(reason)
    index = {id(layer): i for i, layer in enumerate(parameterized_layers(net))}
    position = {key: i for i, key in enumerate(hyper_keys)}
    layers, steps = [], []
    constants = list(_GLOBAL_CONSTANTS)
    features = 0
    needs_same = False
    for layer in _flatten(net):
        if type(layer) is Identity:
            continue
        if isinstance(layer, Dense):
            i = index[id(layer)]
            w_key = hyperparameter_key(i, "weight_variance")
            b_key = hyperparameter_key(i, "bias_variance") if layer.has_bias else None
            if w_key not in position or (b_key is not None and b_key not in position):
                raise ValueError(f"the hyperparameters given do not include those of {layer!r} ({w_key}, {b_key})")
            layers.append(("dense", position[w_key], None if b_key is None else position[b_key], layer.trainable))
            steps.append(("dense", layer, w_key, b_key))
            continue
        form = _form_of(layer)
        first_constant = len(constants)
        constants += [f"{len(steps)}_{name}" for name in form.constant_names]
        layers.append(("act", form.kind, features, first_constant))
        steps.append(("act", layer, form))
        features += len(form.feature_names)
        needs_same = needs_same or form.needs_same
    structure = _Structure(tuple(layers), output, features, len(hyper_keys), tuple(constants), needs_same)
    return _Plan(structure, steps)


_KINDS: dict[str, _Form] = {"abrelu": _ABRELU, "step": _STEP, "sign": _FORMS[Sign], "erf": _FORMS[Erf],
                            "exp": _FORMS[Exp], "sin": _FORMS[Sin]}

Mode = Literal["matrix", "matmul", "grad_i", "grad_j"]


@dataclass(frozen=True)
class _Formula:
    """One KeOps formula: its text, aliases (name, category, dim) in argument order and output layout."""

    text: str
    aliases: tuple[tuple[str, int, int], ...]
    axis: int
    dim_out: int

    def alias_strings(self) -> list[str]:
        return [f"{name}={('Vi', 'Vj', 'Pm')[cat]}({pos},{dim})" for pos, (name, cat, dim) in enumerate(self.aliases)]


def _build(
    structure: _Structure, mode: Mode, d: int, c: int = 1, names: dict[str, str] | None = None
) -> tuple[_Node, _Formula]:
    r"""The formula of one reduction, as a graph root and as text.

    ``mode``:

    * ``"matrix"``: the kernel entry :math:`K(x_i, y_j)` alone (the ``LazyTensor``'s formula);
    * ``"matmul"``: :math:`\sum_j K_{ij} v_j` (``V``: ``Vj(c)``), reduced over :math:`j`;
    * ``"grad_i"``: with ``G`` = ``Vi(c)`` the gradient of the output and
      :math:`w_{ij} = g_i \cdot v_j`, reduced over :math:`j`:
      :math:`\sum_j w_{ij} [\partial_s K\, y_j,\ \partial_{f_i} K,\ \partial_\theta K]`
      (``d + m + p`` numbers per :math:`i`; :math:`s = x\cdot y` unscaled, :math:`f_i` the
      features of :math:`x_i`, :math:`\theta` the hyperparameters);
    * ``"grad_j"``: reduced over :math:`i`:
      :math:`\sum_i [K_{ij} g_i,\ w_{ij}\,\partial_s K\, x_i,\ w_{ij}\,\partial_{f_j} K]`
      (``c + d + m`` numbers per :math:`j`).
    """
    m, p = structure.features, structure.params
    aliases: list[tuple[str, int, int]] = [("X", 0, d), ("Y", 1, d)]
    if m:
        aliases += [("PI", 0, m), ("PJ", 1, m)]
    if p:
        aliases.append(("TH", 2, p))
    aliases.append(("C", 2, len(structure.constants)))
    if mode in ("matmul", "grad_i", "grad_j"):
        aliases.append(("V", 1, c))
    if mode in ("grad_i", "grad_j"):
        aliases.append(("G", 0, c))
    g = _Graph()
    var = {name: g.var(name, dim) for name, _, dim in aliases}
    # derivative directions: [s, features of one side, hyperparameters]
    if mode == "grad_i":
        directions, feature_side, with_params = 1 + m + p, "PI", True
    elif mode == "grad_j":
        directions, feature_side, with_params = 1 + m, "PJ", False
    else:
        directions, feature_side, with_params = 0, None, False
    differentiate = directions > 0
    constants = {name: i for i, name in enumerate(structure.constants)}
    c_ = _Calculus(g, directions, constants, var["C"])

    dot = _Dual(g.node("scalprod", var["X"], var["Y"], dim=1), c_.seed(0 if differentiate else None))
    s = c_.mul(dot, c_.const("inv_d"))
    same = g.neg(g.node("sqdist", var["X"], var["Y"], dim=1)) if structure.needs_same else None

    def feature(side: str, k: int) -> _Dual:
        seed = 1 + k if (differentiate and side == feature_side) else None
        return _Dual(g.elem(var[side], k), c_.seed(seed))

    def param(k: int) -> _Dual:
        return _Dual(g.elem(var["TH"], k), c_.seed(1 + m + k if with_params else None))

    track_ntk = structure.output == "ntk"
    sigma: _Dual = s
    tau: _Dual | None = None
    for layer in structure.layers:
        if layer[0] == "dense":
            _, w_at, b_at, trainable = layer
            w = param(w_at)
            sigma = c_.mul(w, sigma)
            if b_at is not None:
                sigma = c_.add(sigma, param(b_at))
            if track_ntk:
                if tau is not None:
                    tau = c_.mul(w, tau)
                if trainable:
                    tau = sigma if tau is None else c_.add(tau, sigma)
            continue
        _, kind, first_feature, first_constant = layer
        form = _KINDS[kind]
        nf = len(form.feature_names)
        fi = [feature("PI", first_feature + k) for k in range(nf)]
        fj = [feature("PJ", first_feature + k) for k in range(nf)]
        consts = [_Dual(g.elem(var["C"], first_constant + k)) for k in range(len(form.constant_names))]
        k, kdot = form.pair(c_, consts, sigma, fi, fj, same)
        tau = None if (tau is None or kdot is None or not track_ntk) else c_.mul(kdot, tau)
        sigma, tau = c_.settle(k), c_.settle(tau)
    kernel = tau if track_ntk else sigma
    if kernel is None:  # an NTK without any trainable layer: identically zero
        kernel = _Dual(g.int(0))

    if mode == "matrix":
        root, axis, dim_out = kernel.value, 1, 1
    elif mode == "matmul":
        root, axis, dim_out = g.mul(kernel.value, var["V"]), 1, c
    else:
        tangent = c_.t_vector(kernel.tangent)
        if tangent is None:
            tangent = g.elem_t(g.int(0), directions, 0)
        weight = g.mul(var["G"], var["V"]) if c == 1 else g.node("scalprod", var["G"], var["V"], dim=1)
        other = var["Y"] if mode == "grad_i" else var["X"]
        pieces = [g.mul(g.elem(tangent, 0), other)]
        if directions > 1:
            pieces.append(g.extract(tangent, 1, directions - 1))
        weighted = g.mul(weight, g.concat(pieces))
        if mode == "grad_i":
            root, axis = weighted, 1
        else:
            root, axis = g.concat([g.mul(kernel.value, var["G"]), weighted]), 0
        dim_out = root.dim
    text = _emit(root, names if names is not None else {name: name for name in var}, g.pinned)
    return root, _Formula(text, tuple(aliases), axis, dim_out)


def keops_formula(
    net: Layer, hyper_keys: Sequence[str], *, output: Output, d: int, mode: Mode = "matmul", c: int = 1
) -> str:
    """The KeOps formula string of ``net``'s kernel (for inspection and tests of its size).

    ``hyper_keys``: the keys of ``Hyperparameters.collect(net)``; ``mode``: ``"matrix"`` (the kernel
    entry), ``"matmul"`` (``K @ v``), ``"grad_i"`` / ``"grad_j"`` (the reductions of the backward
    pass, see :func:`_build`).
    """
    return _build(_plan(net, hyper_keys, output).structure, mode, d, c)[1].text


# ==================================================================================================
# Evaluation
# ==================================================================================================

_lock = threading.Lock()
_FORMULAS: dict[tuple, _Formula] = {}
_ROUTINES: dict[tuple, object] = {}


def _formula(structure: _Structure, mode: Mode, d: int, c: int) -> _Formula:
    key = (structure, mode, d, c)
    with _lock:
        found = _FORMULAS.get(key)
    if found is None:
        found = _build(structure, mode, d, c)[1]
        with _lock:
            _FORMULAS[key] = found
    return found


def _routine(formula: _Formula, dtype: torch.dtype):
    """The compiled pykeops ``Genred`` of ``formula`` (compiled once per process, cached on disk by pykeops)."""
    from pykeops.torch import Genred

    key = (formula, dtype)
    with _lock:
        found = _ROUTINES.get(key)
    if found is None:
        found = Genred(
            formula.text,
            formula.alias_strings(),
            reduction_op="Sum",
            axis=formula.axis,
            enable_chunks=False,
        )
        with _lock:
            _ROUTINES[key] = found
    return found


def _identically_zero(structure: _Structure) -> bool:
    """Whether the kernel is zero: an NTK with no trainable layer after the last Sign/step activation."""
    if structure.output == "nngp":
        return False
    zero = True
    for layer in structure.layers:
        if layer[0] == "dense":
            zero = zero and not layer[3]
        elif layer[1] in ("sign", "step"):  # their derivative vanishes: the NTK restarts from zero
            zero = True
    return zero


def _bucket(c: int) -> int:
    """Right-hand sides are padded to a power of two, so that few formulas are compiled."""
    return 1 << max(c - 1, 0).bit_length()


def _batched(t: Tensor, batch_dims: int, trailing: int) -> Tensor:
    """``t`` with leading singleton dims so that it has ``batch_dims`` batch dims before ``trailing`` dims."""
    missing = batch_dims - (t.dim() - trailing)
    return t.reshape((1,) * missing + tuple(t.shape)) if missing > 0 else t


def _sum_to(grad: Tensor | None, shape: torch.Size) -> Tensor | None:
    """Sum ``grad`` over the dims along which its input was broadcast, to ``shape``."""
    if grad is None:
        return None
    lead = grad.dim() - len(shape)
    if lead > 0:
        grad = grad.sum(tuple(range(lead)))
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.reshape(shape)


class _KernelMatmul(torch.autograd.Function):
    """``K @ V`` as a KeOps reduction, with the backward pass of :func:`_build` (``grad_i``/``grad_j``).

    Tensors (batch dims padded to the same number, at least one): ``X`` (B, n1, d), ``Y`` (B, n2, d),
    ``PI`` (B, n1, m), ``PJ`` (B, n2, m), ``TH`` (B, p), ``C`` (B, nc), ``V`` (B, n2, c). ``symmetric``:
    ``X``/``Y`` and ``PI``/``PJ`` are the same points, so the kernel is a symmetric function and
    the reduction over :math:`i` is the one over :math:`j` with ``G`` and ``V`` exchanged.
    """

    @staticmethod
    def forward(ctx, structure, symmetric, d, X, Y, PI, PJ, TH, C, V):
        c = V.shape[-1]
        formula = _formula(structure, "matmul", d, c)
        args = _arguments(formula, X=X, Y=Y, PI=PI, PJ=PJ, TH=TH, C=C, V=V)
        out = _routine(formula, X.dtype)(*args, backend="auto")
        ctx.structure, ctx.symmetric, ctx.d = structure, symmetric, d
        ctx.save_for_backward(X, Y, PI, PJ, TH, C, V)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        X, Y, PI, PJ, TH, C, V = ctx.saved_tensors
        structure, symmetric, d = ctx.structure, ctx.symmetric, ctx.d
        _, _, _, need_x, need_y, need_pi, need_pj, need_th, _, need_v = ctx.needs_input_grad
        G = G.contiguous()
        m, p, c = structure.features, structure.params, V.shape[-1]
        tensors = dict(X=X, Y=Y, PI=PI, PJ=PJ, TH=TH, C=C)
        gx = gy = gpi = gpj = gth = gv = None

        def reduce_i(g_, v_):  # (B, n, d + m + p)
            formula = _formula(structure, "grad_i", d, c)
            return _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=v_, G=g_), backend="auto")

        if need_x or need_pi or need_th:
            out = reduce_i(G, V)
            gx = out[..., :d] if need_x else None
            gpi = out[..., d : d + m] if (need_pi and m) else None
            gth = out[..., d + m : d + m + p].sum(-2) if (need_th and p) else None
        if need_y or need_pj or need_v:
            if symmetric:
                if need_y or need_pj:
                    out = reduce_i(V, G)
                    gy = out[..., :d] if need_y else None
                    gpj = out[..., d : d + m] if (need_pj and m) else None
                if need_v:
                    formula = _formula(structure, "matmul", d, c)
                    gv = _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=G), backend="auto")
            else:
                formula = _formula(structure, "grad_j", d, c)
                out = _routine(formula, X.dtype)(*_arguments(formula, **tensors, V=V, G=G), backend="auto")
                gv = out[..., :c] if need_v else None
                gy = out[..., c : c + d] if need_y else None
                gpj = out[..., c + d : c + d + m] if (need_pj and m) else None
        grads = (gx, gy, gpi, gpj, gth, None, gv)
        inputs = (X, Y, PI, PJ, TH, C, V)
        return (None, None, None, *(_sum_to(g_, t.shape) for g_, t in zip(grads, inputs)))


def _arguments(formula: _Formula, **tensors: Tensor) -> list[Tensor]:
    return [tensors[name].contiguous() for name, _, _ in formula.aliases]


@dataclass
class _Inputs:
    """Everything a reduction needs, computed once per ``keops_covariance`` call."""

    structure: _Structure
    d: int
    symmetric: bool
    batch: torch.Size  # the kernel's batch shape
    X: Tensor
    Y: Tensor
    PI: Tensor
    PJ: Tensor
    TH: Tensor
    C: Tensor


def _point_features(plan: _Plan, x: Tensor, hyper: dict[str, Tensor]) -> Tensor:
    """The per-point features of every activation, ``(..., n, m)``: the exact per-point recursion in torch.

    :math:`q_0 = |x|^2/d`; a Dense layer maps :math:`q \\leftarrow \\sigma_w^2 q + \\sigma_b^2`; an
    activation records its features of :math:`q` and maps :math:`q \\leftarrow k(q)` by its exact
    per-point dual (``dual_diag``). Differentiable in ``x`` and the hyperparameters.
    """
    q = x.square().sum(-1, keepdim=True) / x.shape[-1]
    features: list[Tensor] = []
    for step in plan.steps:
        if step[0] == "dense":
            _, layer, w_key, b_key = step
            q = hyper[w_key] * q
            if b_key is not None:
                q = q + hyper[b_key]
            continue
        _, layer, form = step
        features += form.features(layer, q)
        q = layer.dual_diag(q, False)[0]
    if not features:
        return x.new_zeros(*q.shape[:-1], 0)
    batch = torch.broadcast_shapes(*(f.shape[:-2] for f in features))
    return torch.cat([f.expand(*batch, *f.shape[-2:]) for f in features], dim=-1)


def _constants(plan: _Plan, d: int, like: Tensor) -> Tensor:
    values = {
        "inv_d": 1.0 / d, "pi": math.pi, "eps": torch.finfo(like.dtype).eps, "two_over_pi": 2 / math.pi,
        "inv_2pi": 1 / (2 * math.pi),
    }
    out = [values[name] for name in _GLOBAL_CONSTANTS]
    for step in plan.steps:
        if step[0] == "act":
            out += step[2].constants(step[1])
    return torch.tensor(out, dtype=like.dtype, device=like.device)


def _same_points(x1: Tensor, x2: Tensor) -> bool:
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def _prepare(x1: Tensor, x2: Tensor, net: Layer, output: str, hyper: dict[str, Tensor]) -> _Inputs:
    if output not in ("ntk", "nngp"):
        raise ValueError(f"output must be 'ntk' or 'nngp', got {output!r}")
    if x1.dim() < 2 or x2.dim() < 2 or x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"x1 and x2 must be (..., n, d) with the same d, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if not x1.is_floating_point() or x1.dtype != x2.dtype:
        raise ValueError(f"x1 and x2 must be floating point tensors of one dtype, got {x1.dtype} and {x2.dtype}")
    plan = _plan(net, list(hyper), output)
    d = x1.shape[-1]
    hyper = {name: value.to(x1) for name, value in hyper.items()}
    symmetric = _same_points(x1, x2)
    PI = _point_features(plan, x1, hyper)
    PJ = PI if symmetric and x1.shape == x2.shape else _point_features(plan, x2, hyper)
    if hyper:
        hyper_batch = torch.broadcast_shapes(*(h.shape[:-2] for h in hyper.values()))
        TH = torch.cat([h.reshape(*h.shape[:-2], 1).expand(*hyper_batch, 1) for h in hyper.values()], dim=-1)
    else:
        hyper_batch = torch.Size()
        TH = x1.new_zeros(1, 0)
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], hyper_batch)
    C = _constants(plan, d, x1)
    return _Inputs(plan.structure, d, symmetric, batch, x1, x2, PI, PJ, TH, C)


def _matmul(inputs: _Inputs, v: Tensor) -> Tensor:
    """``K @ v`` for ``v`` (..., n2, c) or (n2,)."""
    vector = v.dim() == 1
    if vector:
        v = v.unsqueeze(-1)
    if v.shape[-2] != inputs.Y.shape[-2]:
        raise ValueError(f"K @ v: K has {inputs.Y.shape[-2]} columns but v has {v.shape[-2]} rows")
    v = v.to(inputs.X.dtype)
    c = v.shape[-1]
    batch = torch.broadcast_shapes(inputs.batch, v.shape[:-2])
    n1 = inputs.X.shape[-2]
    if _identically_zero(inputs.structure):
        out = inputs.X.new_zeros(*batch, n1, c) + 0 * (v.sum() + inputs.TH.sum())  # zero gradients, not none
        return out[..., 0] if vector else out
    width = _bucket(c)
    if width != c:
        v = torch.nn.functional.pad(v, (0, width - c))
    nb = max(len(batch), 1)
    X = _batched(inputs.X, nb, 2)
    Y = _batched(inputs.Y, nb, 2)
    PI = _batched(inputs.PI, nb, 2)
    PJ = _batched(inputs.PJ, nb, 2)
    TH = _batched(inputs.TH, nb, 1)
    C = _batched(inputs.C, nb, 1)
    V = _batched(v, nb, 2)
    out = _KernelMatmul.apply(inputs.structure, inputs.symmetric, inputs.d, X, Y, PI, PJ, TH, C, V)
    out = out.reshape(*batch, n1, width) if len(batch) else out.reshape(n1, width)
    out = out[..., :c]
    return out[..., 0] if vector else out


# ==================================================================================================
# The symbolic kernel matrix
# ==================================================================================================


def _lazy_tensor_class():
    from pykeops.torch import LazyTensor

    class KeOpsKernelMatrix(LazyTensor):
        r"""The kernel matrix :math:`K(x_i, y_j)` (..., n1, n2) of a network as a pykeops ``LazyTensor``.

        ``K @ v`` (``v`` (..., n2, c) or (n2,)) is one KeOps reduction with the linear-size
        backward pass of this module; autograd reaches ``x1``, ``x2`` and every hyperparameter
        tensor. Other ``LazyTensor`` operations (``K.sum(1)``, ``K * 2``, ...) see the plain
        formula (``K.formula``) and use pykeops' own machinery, whose gradients grow
        exponentially with depth: use ``@`` for training.
        """

        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, inputs: _Inputs):
            super().__init__()
            self._gpntk_inputs = inputs
            # the variables as pykeops LazyTensors: "i" (..., n1, 1, dim), "j" (..., 1, n2, dim), parameters
            parts = {"X": LazyTensor(inputs.X.unsqueeze(-2)), "Y": LazyTensor(inputs.Y.unsqueeze(-3))}
            if inputs.structure.features:
                parts["PI"] = LazyTensor(inputs.PI.unsqueeze(-2))
                parts["PJ"] = LazyTensor(inputs.PJ.unsqueeze(-3))
            if inputs.structure.params:
                parts["TH"] = LazyTensor(inputs.TH.unsqueeze(-2).unsqueeze(-2))
            parts["C"] = LazyTensor(inputs.C)
            joined = None
            for part in parts.values():
                joined = part if joined is None else joined.join(part)
            for attribute in ("tools", "_dtype", "Genred", "KernelSolve", "ni", "nj", "ranges", "backend",
                              "batchdims", "variables", "symbolic_variables"):
                setattr(self, attribute, getattr(joined, attribute))
            names = {name: part.formula for name, part in parts.items()}
            self.formula = _build(inputs.structure, "matrix", inputs.d, 1, names=names)[1].text
            self.ndim = 1
            self.axis = None
            if len(inputs.batch) and self.batchdims != tuple(inputs.batch):
                self.batchdims = tuple(inputs.batch)

        def __matmul__(self, v, **kwargs):
            return _matmul(self._gpntk_inputs, v)

        def t(self):
            i = self._gpntk_inputs
            swapped = _Inputs(i.structure, i.d, i.symmetric, i.batch, i.Y, i.X, i.PJ, i.PI, i.TH, i.C)
            return KeOpsKernelMatrix(swapped)

        @property
        def T(self):
            return self.t()

        def __repr__(self) -> str:
            shape = tuple(self._gpntk_inputs.batch) + (self._gpntk_inputs.X.shape[-2], self._gpntk_inputs.Y.shape[-2])
            return f"KeOpsKernelMatrix(shape={shape}, output={self._gpntk_inputs.structure.output!r})"

    return KeOpsKernelMatrix


_CLASS = None


def __getattr__(name: str):
    if name == "KeOpsKernelMatrix":
        return _kernel_matrix_class()
    raise AttributeError(name)


def _kernel_matrix_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = _lazy_tensor_class()
    return _CLASS


def keops_covariance(
    x1: Tensor, x2: Tensor, *, net: Layer, output: Output, hyper: dict[str, Tensor]
) -> "LazyTensor":
    r"""The kernel matrix ``(..., n1, n2)`` of ``net`` as a KeOps ``LazyTensor`` (symbolic).

    ``x1`` is ``(..., n1, d)``, ``x2`` ``(..., n2, d)``; ``output`` picks the NTK :math:`\Theta` or
    the NNGP :math:`\Sigma` of the readout; ``hyper`` is ``Hyperparameters.collect(net, like=x1)``
    (tensors ``(*batch, 1, 1)`` keyed by layer). Batch dims of the inputs and the
    hyperparameters broadcast as in the dense backend. ``K @ v`` (``v`` (..., n2, c)) is a KeOps
    reduction and autograd flows from it to ``x1``, ``x2`` and every tensor in ``hyper``.

    Raises ``ValueError`` (with the reason of :func:`keops_supported`) for architectures without
    a KeOps formula. The per-point features are computed here, so build the matrix where the
    inputs and hyperparameters are final (as GPyTorch's ``KernelLinearOperator`` does).
    """
    reason = keops_supported(net)
    if reason is not None:
        raise ValueError(reason)
    return _kernel_matrix_class()(_prepare(x1, x2, net, output, hyper))
