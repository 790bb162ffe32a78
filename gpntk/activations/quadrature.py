r"""Activations without closed-form duals, by Gauss–Hermite quadrature.

Writing :math:`u = \sqrt{q_{11}}\, z_1` and
:math:`v = \sqrt{q_{22}}\,(\rho z_1 + \sqrt{1 - \rho^2}\, z_2)` with independent standard normal
:math:`z_1, z_2`, the dual kernels are two-dimensional Gaussian integrals, evaluated with the
tensor product of a :math:`D`-point Gauss–Hermite rule (nodes :math:`\sqrt2\, x_i`, weights
:math:`w_i/\sqrt\pi`):

.. math::
    \mathbb E[\phi(u)\phi(v)] \approx \sum_{i,j} \tfrac{w_i w_j}{\pi}\,
        \phi\bigl(\sqrt{2 q_{11}}\, x_i\bigr)\,
        \phi\bigl(\sqrt{2 q_{22}}\,(\rho x_i + \sqrt{1-\rho^2}\, x_j)\bigr),

and the same with :math:`\phi'` for :math:`\dot k`. The per-point maps use the one-dimensional
rule. This is the scheme of Neural Tangents (Novak et al. 2020), and with the default
:math:`D = 64` it reproduces its numbers. Pairs are processed in row blocks so memory stays
bounded for large kernels. :math:`\phi'` comes from a given ``derivative`` or from autograd.

Accuracy: exact for polynomials of degree :math:`< 2D`, but for activations with complex
singularities (:math:`\tanh` has poles at :math:`\pm i\pi/2`) Gauss–Hermite converges only
root-exponentially in :math:`D`, and more slowly as the variance grows (the singularities move
towards the real axis in units of the standard deviation). Measured relative errors of the
default rule for ``Tanh``: a few :math:`10^{-9}` at :math:`q = 1`, :math:`3 \cdot 10^{-4}` for
:math:`\dot k` at :math:`q = 2.5`, and :math:`2 \cdot 10^{-2}` at :math:`q = 6`; ``Sigmoid``,
``SiLU`` and ``Softplus`` (poles at :math:`\pm i\pi`) are around :math:`10^{-9}` or better at
:math:`q \le 3`. Raise ``degree`` where this matters (256 points bring ``Tanh`` to
:math:`\sim 10^{-8}` at :math:`q = 3`; the cost grows as :math:`D^2`).

Every evaluation estimates the rule's error at the points' variances (its difference from the
:math:`2D`-point rule, :meth:`Elementwise.rule_error`) and warns with
:class:`~gpntk.ApproximationWarning` above a relative :math:`10^{-7}` (16 rounding units in
float32): an ``mlp(2, "tanh")`` kernel on standard normal inputs in three dimensions (variances up
to 4.4) is :math:`2 \cdot 10^{-3}` off with the default rule, and says so.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Callable, Sequence, cast

import numpy as np
import torch
import torch.utils.checkpoint
from torch import Tensor

from .._transforms import is_transformed
from .._validation import integer_argument
from ..errors import ApproximationWarning, ArchitectureError
from .base import Activation, correlation, safe_sqrt

__all__ = ["Elementwise", "Tanh", "Sigmoid", "Softplus", "SiLU"]

#: elements of the (rows x n2 x D x D) block evaluated at once: 2 MB per float64 tensor, which stays
#: in cache (measured, depth-2 Tanh NTK at n = 100, one thread: 3.1 s against 7.6 s with 2**22, and
#: 1.0 GB resident against 3.1 GB, the allocator keeping the larger freed blocks)
_BLOCK_ELEMENTS = 1 << 18


class _AutogradDerivative:
    r""":math:`\phi'` of an elementwise ``fn`` by forward-mode autograd (picklable when ``fn`` is)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def __call__(self, x: Tensor) -> Tensor:
        _, tangent = cast("tuple[Tensor, Tensor]", torch.func.jvp(self.fn, (x,), (torch.ones_like(x),)))
        return tangent


#: relative error of the quadrature rule above which a kernel evaluation warns (float64; at
#: least 16 rounding units in lower precision)
_RULE_TOLERANCE = 1e-7

#: the default number of Gauss–Hermite points per dimension (Neural Tangents' default)
_DEFAULT_DEGREE = 64

#: up to this degree the rule is numpy's ``hermgauss`` (the one Neural Tangents uses)
_HERMGAUSS_MAX_DEGREE = 100


@lru_cache(maxsize=None)
def _standard_normal_rule(degree: int) -> tuple[Tensor, Tensor]:
    r"""Nodes and weights of the ``degree``-point Gauss–Hermite rule for :math:`\mathbb E f(z)`,
    :math:`z \sim \mathcal N(0, 1)`.

    Small degrees use ``numpy.polynomial.hermite.hermgauss``, so the default rule reproduces
    Neural Tangents. That routine overflows (NaN weights) beyond about 360 points and is slow for
    large degrees, so larger rules come from the Golub–Welsch eigenproblem of the Jacobi matrix of
    the probabilists' Hermite polynomials (``torch.linalg.eigh``); its weights are accurate
    relative to the largest one (the far nodes' weights underflow to 0, as they should).
    Cached; the returned float64 tensors are shared and must not be modified in place.
    """
    if degree <= _HERMGAUSS_MAX_DEGREE:
        nodes, weights = np.polynomial.hermite.hermgauss(degree)
        return torch.from_numpy(nodes * math.sqrt(2.0)), torch.from_numpy(weights / math.sqrt(math.pi))
    off = torch.arange(1, degree, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = vectors[0].square()
    nodes = (nodes - nodes.flip(0)) / 2  # exactly symmetric
    weights = (weights + weights.flip(0)) / 2
    return nodes, weights / weights.sum()


class Elementwise(Activation):
    r"""Any elementwise activation ``fn``: kernels by Gauss–Hermite quadrature, or a closed form you give.

    Quadrature (the default): ``Elementwise(fn, derivative=None, degree=64)`` integrates
    :math:`\mathbb E[\phi(u)\phi(v)]` and :math:`\mathbb E[\phi'(u)\phi'(v)]` numerically (module
    notes), for smooth ``fn``, with an accuracy estimate and :class:`~gpntk.ApproximationWarning`.

    Closed form: ``Elementwise(fn, nngp_fn=..., d_nngp_fn=None)`` (as Neural Tangents'
    ``Elementwise``): ``nngp_fn(cov12, var1, var2)`` returns :math:`\mathbb E[\phi(u)\phi(v)]`
    for :math:`(u, v) \sim \mathcal N(0, [[\mathrm{var1}, \mathrm{cov12}], [\mathrm{cov12},
    \mathrm{var2}]])`, elementwise on three tensors of one shape, and ``d_nngp_fn`` the same
    expectation for :math:`\phi'`. Without ``d_nngp_fn`` it is :math:`\partial\,\mathrm{nngp\_fn}/
    \partial\,\mathrm{cov12}` by forward-mode autograd, which equals :math:`\mathbb E[\phi'(u)\phi'(v)]`
    by Price's theorem (Price 1958). gpntk cannot check that ``nngp_fn`` is the dual of ``fn``: the
    kernel is ``nngp_fn``'s, the finite network (``net.finite``) uses ``fn``. The diagonal is
    ``nngp_fn(q, q, q)``.

    :param fn: a torch function applied elementwise (e.g. ``torch.tanh``).
    :param derivative: :math:`\phi'` for the quadrature; if omitted it is computed by forward-mode autograd.
    :param degree: the number of Gauss–Hermite points per dimension (default 64; cost grows as
        degree²; see the module notes on accuracy). Refused with ``nngp_fn``, where no quadrature runs.
    :param name: a name for ``repr``.
    :param nngp_fn: the closed-form dual (keyword only); then no quadrature is done and
        ``derivative`` must not be given.
    :param d_nngp_fn: the closed-form dual of :math:`\phi'` (keyword only, with ``nngp_fn``).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        derivative: Callable[[Tensor], Tensor] | None = None,
        degree: int | None = None,
        name: str | None = None,
        *,
        nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        d_nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        if not callable(fn):
            raise ArchitectureError(f"Elementwise needs a callable fn, got {fn!r}")
        if derivative is not None and not callable(derivative):
            raise ArchitectureError(f"derivative must be callable, got {derivative!r}")
        _check_closed_form(derivative, nngp_fn, d_nngp_fn)
        if degree is not None and nngp_fn is not None:
            raise ArchitectureError(
                "Elementwise degree is the quadrature's; with nngp_fn the dual is exact and no quadrature runs"
            )
        degree = integer_argument("degree", _DEFAULT_DEGREE if degree is None else degree, minimum=2,
                                  error=ArchitectureError)
        self._fn = fn
        self._derivative = derivative if derivative is not None else _AutogradDerivative(fn)
        self.degree = degree
        self._label = name or getattr(fn, "__name__", "fn")
        self._nodes, self._weights = _standard_normal_rule(degree)
        self._closed_form = None if nngp_fn is None else _ClosedFormDual(nngp_fn, d_nngp_fn)

    @property
    def closed_form(self) -> bool:
        """Whether the kernel is the given ``nngp_fn`` (no quadrature)."""
        return self._closed_form is not None

    def fn(self, x: Tensor) -> Tensor:
        return self._fn(x)

    def derivative(self, x: Tensor) -> Tensor:
        return self._derivative(x)

    def _rule(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._nodes.to(like), self._weights.to(like)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        if self._closed_form is not None:
            return self._closed_form(q, q, q, need_dot)
        self._check_accuracy(q, need_dot)
        z, w = self._rule(q)
        u = safe_sqrt(q).unsqueeze(-1) * z
        k = (self.fn(u).square() * w).sum(-1)
        kdot = (self.derivative(u).square() * w).sum(-1) if need_dot else None
        return k, kdot

    def _check_accuracy(self, q: Tensor, need_dot: bool) -> None:
        r"""Warn (:class:`~gpntk.ApproximationWarning`) where the rule is off by more than rounding.

        The error of the :math:`D`-point rule is estimated at the points' variances ``q`` (every
        evaluation passes through them) as its difference from the :math:`2D`-point rule on
        :math:`\mathbb E[\phi(u)^2]` and :math:`\mathbb E[\phi'(u)^2]`, which is where the pair
        rule's error is largest for analytic activations (at correlation one the 2-D rule is the
        1-D one). Skipped under ``torch.compile`` and ``torch.func`` transforms (data-dependent).
        """
        if torch.compiler.is_compiling() or is_transformed(q) or q.numel() == 0:
            return
        error, _ = self.rule_error(q.detach(), need_dot)
        tolerance = max(_RULE_TOLERANCE, 16 * torch.finfo(q.dtype).eps)
        if error > tolerance:
            # the message names a power of ten only, so that a fit loop warns once per order of magnitude
            bound = 10.0 ** math.floor(math.log10(error))
            warnings.warn(
                f"{self!r}: the {self.degree}-point Gauss–Hermite rule for this activation (no closed-form "
                f"kernel) has an estimated relative error above {bound:.0e} at these variances; pass a larger "
                f"degree (the cost grows as its square), e.g. degree={4 * self.degree}, or smaller variances",
                ApproximationWarning,
                stacklevel=2,
            )

    def rule_error(self, q: Tensor, need_dot: bool = True) -> tuple[float, float]:
        r"""``(error, variance)``: the largest estimated relative error of the rule over the variances ``q``.

        The estimate is :math:`|E_D - E_{2D}| / |E_{2D}|` for :math:`E = \mathbb E[\phi(\sqrt q z)^2]`
        (and :math:`\mathbb E[\phi'(\sqrt q z)^2]` with ``need_dot``), in float64, at up to 257
        distinct variances spread over their range (the error grows with the variance).
        """
        q = torch.unique(q.reshape(-1).double().clamp_min(0))
        if q.numel() > 257:
            q = q[torch.linspace(0, q.numel() - 1, 257, device=q.device).round().long()]
        u = safe_sqrt(q).unsqueeze(-1)
        functions = (self.fn, self.derivative) if need_dot else (self.fn,)
        worst, at = 0.0, 0.0
        for f in functions:
            estimates = []
            for degree in (self.degree, 2 * self.degree):
                z, w = _standard_normal_rule(degree)
                estimates.append((f(u * z.to(u)).square() * w.to(u)).sum(-1))
            low, high = estimates
            scale = high.abs().clamp_min(torch.finfo(torch.float64).tiny)
            relative = (low - high).abs() / scale
            relative = torch.where(torch.isfinite(relative), relative, torch.zeros_like(relative))
            index = int(relative.argmax())
            if float(relative[index]) > worst:
                worst, at = float(relative[index]), float(q[index])
        return worst, at

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        shape = torch.broadcast_shapes(q11.shape, q12.shape, q22.shape)
        if self._closed_form is not None:
            return self._closed_form(q11.expand(shape), q12.expand(shape), q22.expand(shape), need_dot)
        q11, q12, q22 = q11.expand(*shape[:-1], 1), q12.expand(shape), q22.expand(*shape[:-2], 1, shape[-1])
        n1, n2 = shape[-2], shape[-1]
        rows = max(1, _BLOCK_ELEMENTS // max(1, n2 * self.degree**2))
        ks, kdots = [], []
        # With gradients, each block's nodes (rows x n2 x D^2 numbers, several tensors of them) would
        # be kept for the backward pass: 4 GB at n = 100. Checkpointed blocks keep only their
        # inputs and recompute the nodes in the backward pass (derivatives of every order).
        checkpointed = (
            torch.is_grad_enabled()
            and any(q.requires_grad for q in (q11, q12, q22))
            and not is_transformed(q12)
            and not torch.compiler.is_compiling()
        )
        for start in range(0, n1, rows):
            block = slice(start, start + rows)
            if checkpointed:
                k, kdot = torch.utils.checkpoint.checkpoint(
                    self._dual_block, q11[..., block, :], q12[..., block, :], q22, need_dot, use_reentrant=False
                )
            else:
                k, kdot = self._dual_block(q11[..., block, :], q12[..., block, :], q22, need_dot)
            ks.append(k)
            kdots.append(kdot)
        k12 = torch.cat(ks, dim=-2) if len(ks) > 1 else ks[0]
        kdot12 = None
        if need_dot:
            kdot12 = torch.cat(kdots, dim=-2) if len(kdots) > 1 else kdots[0]
        return k12, kdot12

    def _dual_block(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        r"""The pair map on one block of rows; autograd differentiates through the nodes.

        That gives the exact derivatives of the computed values, except at correlation exactly
        :math:`\pm 1` (identical inputs, or :math:`x' = -x` without bias): there the nodes
        :math:`v = \sqrt{q_{22}}(\rho z_1 + \epsilon z_2)`, :math:`\epsilon = \sqrt{1-\rho^2}`, have an
        infinite derivative, multiplied by a sum that vanishes (0 x inf, dropped). The first
        derivatives are unaffected (:math:`\rho` is at its extreme, so its gradient vanishes), but
        :math:`\partial k/\partial\rho` lacks the limit of the dropped product,

        .. math::
            c = -\rho\, q_{22} \sum_i w_i\, \phi^{(a)}(u_i)\, \phi^{(b+2)}(\sqrt{q_{22}}\rho z_i)

        (for :math:`\mathbb E[\phi^{(a)}(u)\phi^{(b)}(v)]`; expand :math:`\phi^{(b+1)}` to first order
        in :math:`\epsilon` and use :math:`\sum_j w_j z_j^2 = 1`), which second derivatives need
        (:math:`c\, \nabla^2\rho`). It is added as :math:`c\,(\rho - \rho)` with :math:`c` and the
        second :math:`\rho` constants: no change of value or first derivative.
        """
        orders = ((0, 0), (1, 1)) if need_dot else ((0, 0),)
        values = self.expectations(q11, q12, q22, orders)
        if torch.is_grad_enabled() and (q12.requires_grad or is_transformed(q12)):
            values = self._edge_second_order(q11, q12, q22, orders, values)
        return values[0], (values[1] if need_dot else None)

    def _edge_second_order(
        self,
        q11: Tensor,
        q12: Tensor,
        q22: Tensor,
        orders: Sequence[tuple[int, int]],
        values: tuple[Tensor, ...],
    ) -> tuple[Tensor, ...]:
        r"""``values`` plus the term :math:`c(\rho - \rho)` of :meth:`_dual_block` where :math:`|\rho| = 1`.

        :math:`c` is evaluated only at those pairs (usually a diagonal), except under ``torch.func``
        transforms, where data-dependent indexing is unavailable and it is formed for every pair.
        """
        rho, _ = correlation(q11, q12, q22)
        edge = rho.abs() == 1
        step = rho - rho.detach()
        s1 = safe_sqrt(q11).expand_as(rho)
        s2 = safe_sqrt(q22).expand_as(rho)
        q22 = q22.expand_as(rho)
        transformed = is_transformed(q12)
        if not transformed:
            if not bool(edge.any()):
                return values
            s1, s2, q22, rho_at = s1[edge], s2[edge], q22[edge], rho[edge]
        else:
            rho_at = rho
        # Constants: built from detached tensors, so no graph is recorded for them.
        z, w = self._rule(rho_at)
        u = s1.detach().unsqueeze(-1) * z
        v = (s2.detach() * rho_at.detach()).unsqueeze(-1) * z  # the nodes at epsilon = 0
        scale = -(rho_at * q22).detach()
        out = []
        for value, (a, b) in zip(values, orders):
            c_at = (scale * (self.nth_derivative(u, a) * self.nth_derivative(v, b + 2) * w).sum(-1)).detach()
            c = c_at if transformed else torch.zeros_like(step).masked_scatter(edge, c_at)
            out.append(value + torch.where(edge, c * step, torch.zeros_like(step)))
        return tuple(out)

    def nth_derivative(self, x: Tensor, order: int) -> Tensor:
        r""":math:`\phi^{(n)}(x)`: ``fn``, ``derivative``, then forward-mode autograd of the one before."""
        if order == 0:
            return self.fn(x)
        if order == 1:
            return self.derivative(x)
        _, tangent = cast(
            "tuple[Tensor, Tensor]",
            torch.func.jvp(lambda t: self.nth_derivative(t, order - 1), (x,), (torch.ones_like(x),)),
        )
        return tangent

    def expectations(
        self, q11: Tensor, q12: Tensor, q22: Tensor, orders: Sequence[tuple[int, int]]
    ) -> tuple[Tensor, ...]:
        r""":math:`\mathbb E[\phi^{(a)}(u)\, \phi^{(b)}(v)]` for each ``(a, b)`` in ``orders``, by the 2-D rule.

        ``q11`` ``(..., r, 1)``, ``q12`` ``(..., r, n2)``, ``q22`` ``(..., 1, n2)``; the nodes
        :math:`v` are shared by all orders.
        """
        z, w = self._rule(q12)
        rho, _ = correlation(q11, q12, q22)
        s1, s2 = safe_sqrt(q11), safe_sqrt(q22)
        # u: (..., r, 1, D); v: (..., r, n2, D, D) over (i, j)
        u = s1.unsqueeze(-1) * z
        coef_i = (s2 * rho).unsqueeze(-1).unsqueeze(-1) * z.view(-1, 1)
        coef_j = (s2 * safe_sqrt(1 - rho.square())).unsqueeze(-1).unsqueeze(-1) * z.view(1, -1)
        v = coef_i + coef_j
        outputs = []
        for a, b in getattr(orders, "pairs", orders):
            inner = (self.nth_derivative(v, b) * w).sum(-1)  # (..., r, n2, D): integrated over z2
            outputs.append((self.nth_derivative(u, a) * w * inner).sum(-1))
        return tuple(outputs)

    def __repr__(self) -> str:
        if self._closed_form is not None:
            return f"Elementwise({self._label}, nngp_fn={self._closed_form.label})"
        return f"Elementwise({self._label}, degree={self.degree})"


def _check_closed_form(derivative: object, nngp_fn: object, d_nngp_fn: object) -> None:
    """Refuse inconsistent closed-form arguments of :class:`Elementwise`, naming them."""
    if nngp_fn is None:
        if d_nngp_fn is not None:
            raise ArchitectureError("Elementwise d_nngp_fn needs nngp_fn (the closed-form dual of fn itself)")
        return
    if not callable(nngp_fn):
        raise ArchitectureError(f"Elementwise nngp_fn must be callable (cov12, var1, var2) -> tensor, got {nngp_fn!r}")
    if d_nngp_fn is not None and not callable(d_nngp_fn):
        raise ArchitectureError(
            f"Elementwise d_nngp_fn must be callable (cov12, var1, var2) -> tensor, got {d_nngp_fn!r}"
        )
    if derivative is not None:
        raise ArchitectureError(
            "Elementwise derivative is for the quadrature; with nngp_fn, give the closed-form dual of the "
            "derivative as d_nngp_fn (or leave it out: autograd of nngp_fn in cov12)"
        )


class _ClosedFormDual:
    r"""A user-supplied closed-form dual: ``nngp_fn`` and ``d_nngp_fn``
    (or :math:`\partial\,\mathrm{nngp\_fn}/\partial q_{12}`)."""

    def __init__(
        self,
        nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
        d_nngp_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None,
    ):
        self.nngp_fn, self.d_nngp_fn = nngp_fn, d_nngp_fn
        self.label = getattr(nngp_fn, "__name__", "nngp_fn")

    def __call__(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        """``(k12, kdot12)`` on three tensors of one shape."""
        if not need_dot:
            return self._checked("nngp_fn", self.nngp_fn(q12, q11, q22), q12), None
        if self.d_nngp_fn is not None:
            k12 = self._checked("nngp_fn", self.nngp_fn(q12, q11, q22), q12)
            return k12, self._checked("d_nngp_fn", self.d_nngp_fn(q12, q11, q22), q12)
        # forward mode: the derivative of each entry in its own cov12 (nngp_fn acts elementwise);
        # differentiable in all three arguments by backward-mode autograd
        k12, kdot12 = cast(
            "tuple[Tensor, Tensor]",
            torch.func.jvp(lambda c: self.nngp_fn(c, q11, q22), (q12,), (torch.ones_like(q12),)),
        )
        return self._checked("nngp_fn", k12, q12), self._checked("the derivative of nngp_fn", kdot12, q12)

    def _checked(self, what: str, value: object, like: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or value.shape != like.shape:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"Elementwise {what} must return a tensor shaped as its (cov12, var1, var2) arguments, "
                f"{tuple(like.shape)}, got {got}"
            )
        return value


def _tanh_derivative(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x).square()


def _sigmoid_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _softplus(x: Tensor) -> Tensor:
    # torch's default threshold (20: x is returned above it) is a float32 choice that is off by
    # e^-20 ~ 2e-9 there; log1p(exp(x)) rounds to x in float64 only past ~37
    return torch.nn.functional.softplus(x, threshold=40.0)


def _silu_derivative(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _degree_argument(degree: int) -> str:
    return "" if degree == _DEFAULT_DEGREE else f"degree={degree}"


class Tanh(Elementwise):
    r""":math:`\phi(x) = \tanh x` by quadrature, :math:`\phi' = 1 - \tanh^2 x`."""

    def __init__(self, degree: int = _DEFAULT_DEGREE):
        super().__init__(torch.tanh, _tanh_derivative, degree, "tanh")

    def __repr__(self) -> str:
        return f"Tanh({_degree_argument(self.degree)})"


class Sigmoid(Elementwise):
    r""":math:`\phi(x) = 1/(1 + e^{-x})` by quadrature."""

    def __init__(self, degree: int = _DEFAULT_DEGREE):
        super().__init__(torch.sigmoid, _sigmoid_derivative, degree, "sigmoid")

    def __repr__(self) -> str:
        return f"Sigmoid({_degree_argument(self.degree)})"


class Softplus(Elementwise):
    r""":math:`\phi(x) = \log(1 + e^x)` by quadrature, :math:`\phi' = \sigma(x)`."""

    def __init__(self, degree: int = _DEFAULT_DEGREE):
        super().__init__(_softplus, torch.sigmoid, degree, "softplus")

    def __repr__(self) -> str:
        return f"Softplus({_degree_argument(self.degree)})"


class SiLU(Elementwise):
    r""":math:`\phi(x) = x\,\sigma(x)` (swish) by quadrature."""

    def __init__(self, degree: int = _DEFAULT_DEGREE):
        super().__init__(torch.nn.functional.silu, _silu_derivative, degree, "silu")

    def __repr__(self) -> str:
        return f"SiLU({_degree_argument(self.degree)})"
