r"""The arc-cosine functions :math:`J_p(\rho)` of Cho & Saul (2009), with exact derivatives.

For the rectified monomial :math:`\phi(x) = x^p\,\mathbb 1[x > 0]` the dual kernel is
:math:`(q_{11} q_{22})^{p/2} J_p(\theta) / 2\pi` with :math:`\theta = \arccos \rho`,
:math:`J_0 = \pi - \theta`, :math:`J_1 = \sin\theta + (\pi - \theta)\cos\theta` and
:math:`J_p = (2p - 1)\cos\theta\, J_{p-1} - \sin\theta\, J_{p-1}'(\theta)`. As functions of
:math:`\rho`, Price's theorem gives :math:`\mathrm dJ_p/\mathrm d\rho = p^2 J_{p-1}`, which is
what the custom autograd functions below use: derivatives are exact and finite at
:math:`\rho = 1` for :math:`p \ge 1` (there :math:`\sin\theta` itself is not differentiable).
The activations of :mod:`gpntk.activations.arccos` reach them through
:class:`gpntk.activations.ops.TorchOps`.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, cast

import torch
from torch import Tensor

from . import first_order

__all__ = ["arccos_j", "arccos_j1_j0"]

# A J_p is stored as two polynomials in (cos θ, sin θ): J = A(c, s) + (π - θ) B(c, s),
# each a dict {(i, j): coefficient} for the monomial c^i s^j.
_Poly = dict[tuple[int, int], float]


def _poly_add(a: _Poly, b: _Poly, scale: float = 1.0) -> _Poly:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0.0) + scale * value
    return {k: v for k, v in out.items() if v != 0.0}


def _poly_derivative(p: _Poly) -> _Poly:
    """d/dθ of a polynomial in c = cos θ, s = sin θ."""
    out: _Poly = {}
    for (i, j), coef in p.items():
        if i:
            out = _poly_add(out, {(i - 1, j + 1): -i * coef})
        if j:
            out = _poly_add(out, {(i + 1, j - 1): j * coef})
    return out


def _poly_times(p: _Poly, di: int, dj: int, scale: float) -> _Poly:
    return {(i + di, j + dj): scale * coef for (i, j), coef in p.items()}


@lru_cache(maxsize=None)
def _arccos_j_terms(p: int) -> tuple[tuple[tuple[int, int, float], ...], tuple[tuple[int, int, float], ...]]:
    a: _Poly = {}
    b: _Poly = {(0, 0): 1.0}  # J_0 = π - θ
    for n in range(1, p + 1):
        # J' = A' + (π-θ) B' - B, so J_n = (2n-1) c J - s J'
        da, db = _poly_derivative(a), _poly_derivative(b)
        new_a = _poly_add(
            _poly_times(a, 1, 0, 2 * n - 1), _poly_add(_poly_times(da, 0, 1, -1.0), _poly_times(b, 0, 1, 1.0))
        )
        new_b = _poly_add(_poly_times(b, 1, 0, 2 * n - 1), _poly_times(db, 0, 1, -1.0))
        a, b = new_a, new_b
    return tuple((i, j, c) for (i, j), c in a.items()), tuple((i, j, c) for (i, j), c in b.items())


def _arccos_j_value(rho: Tensor, p: int) -> Tensor:
    if p == 0:  # J_0 = π - θ
        return math.pi - torch.arccos(rho)
    if p == 1:  # J_1 = sin θ + (π - θ) cos θ
        return (1 - rho.square()).clamp_min(0).sqrt().addcmul(math.pi - torch.arccos(rho), rho)
    terms_a, terms_b = _arccos_j_terms(p)
    cos = rho
    sin = (1 - rho.square()).clamp_min(0).sqrt()
    rest = math.pi - torch.arccos(rho)
    value_a = torch.zeros_like(rho)
    for i, j, coef in terms_a:
        value_a = value_a + coef * cos**i * sin**j
    value_b = torch.zeros_like(rho)
    for i, j, coef in terms_b:
        value_b = value_b + coef * cos**i * sin**j
    return value_a + rest * value_b


def _arccos_j_derivative(rho: Tensor, p: int) -> Tensor:
    r""":math:`\mathrm dJ_p/\mathrm d\rho`: :math:`p^2 J_{p-1}(\rho)`, and for :math:`p = 0`
    :math:`1/\sqrt{1-\rho^2}` inside (-1, 1), 0 at :math:`|\rho| = 1`.

    :math:`J_0 = \pi - \theta` has a kink at :math:`\theta = 0` (and :math:`\pi`): along any
    path through identical inputs the angle grows like the distance, so the one-sided derivatives
    are opposite and their average is 0. Returning 0 there makes every derivative built on
    :math:`J_0'` (the ReLU family's NTK, Sign, the second derivatives of the ReLU NNGP) the average
    of its one-sided values, finite, instead of the ``1/sqrt(eps)`` of a clamped square root.
    Differentiable (in ``rho``) to any order.
    """
    if p > 0:
        return (p * p) * arccos_j(rho, p - 1)
    inside = rho.abs() < 1
    gap = torch.where(inside, 1 - rho.square(), torch.ones_like(rho))
    return torch.where(inside, torch.rsqrt(gap), torch.zeros_like(rho))


class _ArcCosJCompiled(torch.autograd.Function):
    """:math:`J_p(\\rho)` with derivative :func:`_arccos_j_derivative`, reverse mode only.

    The form :func:`torch.compile` traces (TorchDynamo cannot trace a Function with a ``jvp``);
    :class:`_ArcCosJ` adds the forward-mode derivative for eager code and ``torch.func``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rho: Tensor, p: int) -> Tensor:
        return _arccos_j_value(rho, p)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        rho, p = inputs
        ctx.p = p
        ctx.save_for_backward(rho)
        ctx.save_for_forward(rho)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rho,) = ctx.saved_tensors
        return grad * _arccos_j_derivative(rho, ctx.p), None


class _ArcCosJ(_ArcCosJCompiled):
    """:math:`J_p(\\rho)` with derivative :func:`_arccos_j_derivative`; works under ``torch.func`` transforms."""

    @staticmethod
    def jvp(ctx: Any, rho_tangent: Tensor, _p: None) -> Tensor:
        (rho,) = ctx.saved_tensors
        return rho_tangent * _arccos_j_derivative(rho, ctx.p)


def arccos_j(rho: Tensor, p: int) -> Tensor:
    r"""The arc-cosine function :math:`J_p` of Cho & Saul (2009) as a function of :math:`\rho = \cos\theta`.

    Differentiable to any order, also under ``torch.func`` (``grad``, ``jacrev``, ``jacfwd``,
    ``hessian``, ``vmap``); at :math:`|\rho| = 1` the derivative of :math:`J_0` is taken as 0 (see
    :func:`_arccos_j_derivative`). Under :func:`~gpntk.activations.first_order.first_order_tangents`:
    the same value, first derivatives only (:func:`~gpntk.activations.first_order.linearized`).
    """
    if first_order.active():
        fixed = rho.detach()
        # dJ_p/drho = p^2 J_{p-1} from its value directly (not through arccos_j, linearized again)
        derivative = (p * p) * _arccos_j_value(fixed, p - 1) if p > 0 else _arccos_j_derivative(fixed, 0)
        return first_order.linearized(_arccos_j_value(fixed, p), derivative, rho)
    function = _ArcCosJCompiled if torch.compiler.is_compiling() else _ArcCosJ
    return cast(Tensor, function.apply(rho, p))  # type: ignore[no-untyped-call]  # Function.apply is untyped


def _j1_j0_value(rho: Tensor) -> tuple[Tensor, Tensor]:
    j0 = math.pi - torch.arccos(rho)
    j1 = (1 - rho.square()).clamp_min(0).sqrt().addcmul(j0, rho)
    return j1, j0


class _ArcCosJ1J0Compiled(torch.autograd.Function):
    r"""``(J_1, J_0)`` from one arccos, with :math:`J_1' = J_0` and :math:`J_0'` from :func:`_arccos_j_derivative`.

    Reverse mode only, the form :func:`torch.compile` traces; :class:`_ArcCosJ1J0` adds ``jvp``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rho: Tensor) -> tuple[Tensor, Tensor]:
        return _j1_j0_value(rho)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: tuple[Tensor, Tensor]) -> None:
        (rho,) = inputs
        ctx.save_for_backward(rho)
        ctx.save_for_forward(rho)

    @staticmethod
    def backward(ctx: Any, grad_j1: Tensor | None, grad_j0: Tensor | None) -> Tensor | None:
        (rho,) = ctx.saved_tensors
        grad = None
        if grad_j1 is not None:
            grad = grad_j1 * arccos_j(rho, 0)
        if grad_j0 is not None:
            term = grad_j0 * _arccos_j_derivative(rho, 0)
            grad = term if grad is None else grad + term
        return grad


class _ArcCosJ1J0(_ArcCosJ1J0Compiled):
    r"""``(J_1, J_0)`` with reverse- and forward-mode derivatives (eager code and ``torch.func``)."""

    @staticmethod
    def jvp(ctx: Any, rho_tangent: Tensor) -> tuple[Tensor, Tensor]:
        (rho,) = ctx.saved_tensors
        return rho_tangent * arccos_j(rho, 0), rho_tangent * _arccos_j_derivative(rho, 0)


def arccos_j1_j0(rho: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`(J_1(\rho), J_0(\rho))` together, sharing one :math:`\arccos` (the ReLU family's NNGP and NTK).

    Under :func:`~gpntk.activations.first_order.first_order_tangents` the same values with first
    derivatives only: :math:`\dot J_1 = J_0 \dot\rho`, :math:`\dot J_0 = \dot\rho/\sqrt{1-\rho^2}` (0 at
    :math:`|\rho| = 1`, :func:`_arccos_j_derivative`), one multiplication each per tangent.
    """
    if first_order.active():
        fixed = rho.detach()
        j1, j0 = _j1_j0_value(fixed)
        return (
            first_order.linearized(j1, j0, rho),
            first_order.linearized(j0, _arccos_j_derivative(fixed, 0), rho),
        )
    function = _ArcCosJ1J0Compiled if torch.compiler.is_compiling() else _ArcCosJ1J0
    return cast("tuple[Tensor, Tensor]", function.apply(rho))  # type: ignore[no-untyped-call]  # untyped apply
