"""The expression graph of a KeOps formula, with identical sub-expressions merged, and its emission.

:class:`_Graph` builds :class:`_Node` s by hash-consing (and folds zeros and ones); :func:`_emit` writes
a root as a keopscore formula string in which every repeated value is computed once, as a chain of
state vectors bound by ``Factorize`` (see "Linear size" in :mod:`gpntk.contrib.keops`).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import AbstractSet, Any, Callable, Sequence, cast, overload

# ==================================================================================================
# A small expression graph, written to KeOps with let-bindings
# ==================================================================================================


class _Node:
    """One operation of the per-pair formula: ``op`` applied to ``args`` (``data``: its integer/str options)."""

    __slots__ = ("op", "args", "data", "dim")

    def __init__(self, op: str, args: tuple["_Node", ...], data: Any, dim: int) -> None:
        self.op, self.args, self.data, self.dim = op, args, data, dim

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"_Node({self.op}, dim={self.dim})"


#: keopscore names of the operations (read-only)
_KEOPS_NAMES: Mapping[str, str] = MappingProxyType({
    "add": "Add", "sub": "Subtract", "mul": "Mult", "neg": "Minus", "sqrt": "Sqrt", "rsqrt": "Rsqrt",
    "acos": "Acos", "asin": "Asin", "exp": "Exp", "square": "Square", "clamp": "Clamp", "ifelse": "IfElse",
    "step": "Step", "scalprod": "Scalprod", "sqdist": "SqDist", "concat": "Concat", "div": "Divide",
    "atan2": "Atan2",
})


class _Graph:
    """Builds :class:`_Node` s, merging identical sub-expressions (hash-consing) and folding trivial ones.

    ``None`` stands for an identically zero term throughout (``add(None, x) = x``,
    ``mul(None, x) = None``).
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[str, tuple[int, ...], Any], _Node] = {}
        #: nodes the emitter computes in a state vector even when used once (the ends of layers), so
        #: that the formula's nesting, and the recursion of keopscore's parser, stay bounded by one layer
        self.pinned: set[int] = set()

    def pin(self, node: _Node | None) -> _Node | None:
        if node is not None and not _leaf_like(node):
            self.pinned.add(id(node))
        return node

    def node(self, op: str, *args: _Node, data: Any = None, dim: int | None = None) -> _Node:
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

    # (``int`` is the method above in this class body: the built-in is ``builtins.int``)
    def elem(self, a: _Node, k: builtins.int) -> _Node:
        return self.node("elem", a, data=k, dim=1)

    def extract(self, a: _Node, start: builtins.int, length: builtins.int) -> _Node:
        if start == 0 and length == a.dim:
            return a
        return self.node("extract", a, data=(start, length), dim=length)

    def elem_t(self, a: _Node, dim: builtins.int, k: builtins.int) -> _Node:
        return self.node("elemT", a, data=(dim, k), dim=dim)

    # arithmetic with zero (None) and one folded away
    def _is_int(self, a: _Node | None, value: builtins.int) -> bool:
        return a is not None and a.op == "int" and a.data == value

    @overload
    def add(self, a: _Node, b: _Node) -> _Node: ...
    @overload
    def add(self, a: _Node | None, b: _Node | None) -> _Node | None: ...
    def add(self, a: _Node | None, b: _Node | None) -> _Node | None:
        if a is None or self._is_int(a, 0):
            return b
        if b is None or self._is_int(b, 0):
            return a
        return self.node("add", a, b)

    @overload
    def sub(self, a: _Node, b: _Node) -> _Node: ...
    @overload
    def sub(self, a: _Node | None, b: _Node | None) -> _Node | None: ...
    def sub(self, a: _Node | None, b: _Node | None) -> _Node | None:
        if b is None:
            return a
        if a is None:
            return self.neg(b)
        return self.node("sub", a, b)

    @overload
    def neg(self, a: _Node) -> _Node: ...
    @overload
    def neg(self, a: _Node | None) -> _Node | None: ...
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
            return self.elem_t(cast(_Node, self.mul(a, b.args[0])), *b.data)
        if a.op == "elemT" and b.dim == 1:
            return self.elem_t(cast(_Node, self.mul(a.args[0], b)), *a.data)
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
    if node.op in ("var", "int", "rat"):
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


@dataclass
class _Schedule:
    """Where each shared value of a formula is computed (see :func:`_emit`).

    ``by_id``: the nodes reachable from the root (children first, ``order`` their positions);
    ``level``: for each shared node, the state vector that computes it; ``reads``: the shared
    nodes each expression reads directly; ``last_use``: the last state (or ``top``, the root) that
    reads each shared node.
    """

    by_id: dict[int, _Node]
    order: dict[int, int]
    level: dict[int, int]
    reads: dict[int, set[int]]
    last_use: dict[int, int]
    top: int

    @staticmethod
    def of(root: _Node, pinned: AbstractSet[int]) -> _Schedule:
        nodes, counts = _postorder(root, _leaf_like)
        shared = {
            id(n) for n in nodes
            if n is not root and not _leaf_like(n) and (counts.get(id(n), 0) > 1 or id(n) in pinned)
        }
        # level of each shared node and the shared nodes each expression reads directly
        height: dict[int, int] = {}
        reads: dict[int, set[int]] = {}
        level: dict[int, int] = {}
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
        by_id = {id(n): n for n in nodes}
        last_use: dict[int, int] = {}
        for consumer in [*(by_id[i] for i in shared), root]:
            at = top if consumer is root else level[id(consumer)]
            for i in reads[id(consumer)]:
                last_use[i] = max(last_use.get(i, 0), at)
        order = {id(n): i for i, n in enumerate(nodes)}  # children first: a deterministic order
        return _Schedule(by_id, order, level, reads, last_use, top)


def _inline(node: _Node, where: dict[int, int], state: str, names: dict[str, str]) -> str:
    """The text of ``node``, reading the values ``where`` holds from the state vector ``state``."""
    if id(node) in where:  # a value of the previous state
        at = where[id(node)]
        return f"Elem({state},{at})" if node.dim == 1 else f"Extract({state},{at},{node.dim})"
    op = node.op
    if op == "var":
        return names[node.data]
    if op == "int":
        return f"IntCst({node.data})"
    if op == "rat":
        return f"RatCst({node.data[0]},{node.data[1]})"
    args = [_inline(a, where, state, names) for a in node.args]
    if op == "elem":
        return f"Elem({args[0]},{node.data})"
    if op == "extract":
        return f"Extract({args[0]},{node.data[0]},{node.data[1]})"
    if op == "elemT":
        return f"ElemT({args[0]},{node.data[0]},{node.data[1]})"
    return f"{_KEOPS_NAMES[op]}({','.join(args)})"


def _concat(pieces: list[str]) -> str:
    """``Concat`` of ``pieces``, balanced, so that no value is copied more than log(k) times."""
    if len(pieces) == 1:
        return pieces[0]
    half = len(pieces) // 2
    return f"Concat({_concat(pieces[:half])},{_concat(pieces[half:])})"


def _state(
    schedule: _Schedule, keep: list[int], new: list[int], where: dict[int, int], state: str, names: dict[str, str]
) -> tuple[str, dict[int, int]]:
    """The body of the next state vector (the values ``keep`` copied from ``state``, then the ``new`` ones)
    and the position of each of its values."""
    pieces: list[str] = []
    layout: dict[int, int] = {}
    offset, run = 0, None
    for i in keep:  # runs of consecutive kept values are copied as one Extract
        at, dim = where[i], schedule.by_id[i].dim
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
        pieces.append(_inline(schedule.by_id[i], where, state, names))
        layout[i] = offset
        offset += schedule.by_id[i].dim
    return _concat(pieces), layout


def _emit(root: _Node, names: dict[str, str], pinned: AbstractSet[int] = frozenset()) -> str:
    """The keopscore formula string of ``root`` as a chain of state vectors (see :mod:`gpntk.contrib.keops`).

    Every node used more than once, or ``pinned`` (``shared``), is computed once, in the state vector of its
    *level* (one more than the highest level among the shared nodes its expression reads). Level
    ``l``'s state holds the new values of that level and the earlier ones still needed later:
    ``(_sl := Factorize(Concat(..., Elem(_s{l-1}, k), f(Elem(_s{l-1}, k'), ...), ...), _s{l-1}))``,
    bound in order at the top level of ``[(_s1 := ...), (_s2 := ...), ..., root][-1]``. Each
    state reads only the one before it, so keopscore's ``Factorize`` (which rewrites its whole
    argument, up to the previous state) and its code generation do work linear in the number of
    states, and ``names`` (the variables' text) is all the emitter needs.
    """
    schedule = _Schedule.of(root, pinned)
    definitions: list[str] = []
    where: dict[int, int] = {}  # position of each live value in the current state
    live: list[int] = []
    state = ""
    for step in range(1, schedule.top):
        new = sorted((i for i, lev in schedule.level.items() if lev == step), key=schedule.order.__getitem__)
        keep = [i for i in live if schedule.last_use[i] > step]
        body, layout = _state(schedule, keep, new, where, state, names)
        name = f"_s{step}"
        definitions.append(f"({name}:={body if not state else f'Factorize({body},{state})'})")
        where, live, state = layout, keep + new, name
    final = _inline(root, where, state, names)
    if state:
        final = f"Factorize({final},{state})"
    if not definitions:
        return final
    return "[" + ",".join(definitions + [final]) + "][-1]"
