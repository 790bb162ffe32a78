"""The KeOps formula builder evaluates the very pair duals of :mod:`gpntk.activations`, with the right derivatives.

Fast (no KeOps compilation): the formula graph that :class:`~gpntk.contrib.keops.calculus._Calculus`
builds for each shared pair formula is evaluated here by a small torch interpreter of its nodes,
and its values and forward-mode tangents are compared with the torch evaluation of the same
formula (:data:`gpntk.activations.ops.TORCH`) and torch's autograd.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gpntk import layers as L
from gpntk.activations.arccos import abrelu_pair, rectified_monomial_pair, sign_pair
from gpntk.activations.ops import TORCH
from gpntk.activations.smooth import erf_pair, exp_pair, sin_pair
from gpntk.contrib.keops.calculus import _Calculus, _Dual
from gpntk.contrib.keops.graph import _Graph, _Node

DT = torch.float64
_GLOBALS = {"pi": torch.pi, "eps": torch.finfo(DT).eps, "tiny": torch.finfo(DT).tiny}

_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "atan2": torch.atan2,
}
_UNARY = {
    "neg": torch.neg, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "acos": torch.acos, "asin": torch.asin,
    "exp": torch.exp, "square": torch.square, "step": lambda x: (x >= 0).to(x.dtype),
}


def _evaluate(node: _Node, env: dict[str, Tensor], memo: dict[int, Tensor]) -> Tensor:
    """The value of a formula node (a 1-d tensor of its ``dim``), as KeOps computes it."""
    if id(node) in memo:
        return memo[id(node)]
    args = [_evaluate(a, env, memo) for a in node.args]
    op, data = node.op, node.data
    if op == "var":
        out = env[data]
    elif op in ("int", "rat"):
        out = torch.tensor([data if op == "int" else data[0] / data[1]], dtype=DT)
    elif op == "elem":
        out = args[0][data : data + 1]
    elif op == "elemT":
        out = torch.zeros(data[0], dtype=DT).index_add(0, torch.tensor([data[1]]), args[0])
    elif op == "clamp":
        out = torch.minimum(torch.maximum(args[0], args[1]), args[2])
    elif op == "ifelse":
        out = torch.where(args[0] >= 0, args[1], args[2])
    elif op in _BINARY:
        out = _BINARY[op](*args)
    else:
        out = _UNARY[op](*args)
    memo[id(node)] = out
    return out


def _on_duals(formula, constants: list[float], inputs: list[float]):
    """``formula`` evaluated on dual numbers seeded in each input: values and tangents (or None)."""
    g = _Graph()
    names = [*_GLOBALS, *(f"c{k}" for k in range(len(constants)))]
    calculus = _Calculus(g, len(inputs), {name: k for k, name in enumerate(names)}, g.var("C", len(names)))
    x = [_Dual(g.elem(g.var("X", len(inputs)), k), calculus.seed(k)) for k in range(len(inputs))]
    consts = [calculus.const(f"c{k}") for k in range(len(constants))]
    env = {
        "C": torch.tensor([*_GLOBALS.values(), *constants], dtype=DT),
        "X": torch.tensor(inputs, dtype=DT),
    }
    out = []
    for dual in formula(calculus, consts, *x, True):
        if dual is None:
            out.append(None)
            continue
        tangent = calculus.t_vector(dual.tangent)
        out.append((
            _evaluate(dual.value, env, {}),
            torch.zeros(len(inputs), dtype=DT) if tangent is None else _evaluate(tangent, env, {}),
        ))
    return out


def _on_tensors(formula, constants: list[float], inputs: list[float]):
    """``formula`` evaluated by torch: values and autograd derivatives in each input (or None)."""
    x = [torch.tensor(v, dtype=DT, requires_grad=True) for v in inputs]
    out = []
    for value in formula(TORCH, constants, *x, True):
        if value is None or not value.requires_grad:
            out.append(None if value is None else (value.detach().reshape(1), torch.zeros(len(inputs), dtype=DT)))
            continue
        grads = torch.autograd.grad(value, x, allow_unused=True, retain_graph=True)
        tangent = torch.stack([torch.zeros((), dtype=DT) if g_ is None else g_ for g_ in grads])
        out.append((value.detach().reshape(1), tangent))
    return out


def _step_pair(ops, consts, sigma, rho, sqrt_prod, need_dot):
    return rectified_monomial_pair(ops, consts, 0, rho, sqrt_prod, need_dot)


def _sign_pair(ops, consts, sigma, rho, sqrt_prod, need_dot):
    return sign_pair(ops, consts, rho, sqrt_prod, need_dot)


CASES = {
    # (formula, layer whose formula_constants() it takes, inputs: (q1, q12, q2) or (q12, rho, sqrt_prod))
    "erf": (erf_pair, L.Erf(a=1.3, b=0.7, c=0.2), [0.8, 0.35, 1.4]),
    "sin": (sin_pair, L.Sin(a=1.2, b=0.9, c=0.3), [0.8, -0.35, 1.4]),
    "cos": (sin_pair, L.Cos(a=1.1, b=0.8), [0.8, 0.5, 1.4]),
    "rbf": (sin_pair, L.Rbf(gamma=0.3), [0.8, 0.5, 1.4]),
    "exp": (exp_pair, L.Exp(a=0.9, b=0.4), [0.8, 0.35, 1.4]),
    "abrelu": (abrelu_pair, L.ABReLU(-0.4, 1.1), [0.3, 0.45, 0.7]),
    "relu": (abrelu_pair, L.ReLU(), [-0.3, -0.45, 0.7]),
    "step": (_step_pair, L.RectifiedMonomial(0), [0.3, 0.45, 0.7]),
    "sign": (_sign_pair, L.Sign(), [0.3, -0.6, 0.7]),
}


@pytest.mark.parametrize("name", CASES)
def test_formula_builder_evaluates_the_shared_duals(name):
    """Values and first derivatives of (k, kdot) built as KeOps nodes equal torch's on the same formula."""
    formula, layer, inputs = CASES[name]
    constants = list(layer.formula_constants())
    built, reference = _on_duals(formula, constants, inputs), _on_tensors(formula, constants, inputs)
    for ours, theirs in zip(built, reference):
        if ours is None:  # KeOps leaves an identically zero derivative out (None)
            assert theirs is None or (theirs[0] == 0).all()
            continue
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-12, atol=1e-14)


def test_literals_are_exact():
    """Numbers written in a formula become exact KeOps literals; other numbers must be constants."""
    g = _Graph()
    calculus = _Calculus(g, 0, {}, g.var("C", 1))
    assert calculus.lift(2).value is g.int(2)
    assert calculus.lift(0.5).value.op == "rat" and calculus.lift(0.5).value.data == (1, 2)
    with pytest.raises(ValueError, match="no exact KeOps literal"):
        calculus.lift(0.1)
