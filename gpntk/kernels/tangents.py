r"""Hyperparameter gradients of a kernel matrix in forward mode: the tangents stored with the matrix.

Of a kernel matrix :math:`K` in a marginal-likelihood step only the gradients of a few scalar
hyperparameters :math:`\theta_k` (:math:`\sigma_w^2`, :math:`\sigma_b^2`) are wanted,

.. math::
    \bar\theta_k = \textstyle\sum_{ij} \bar K_{ij}\, T^{(k)}_{ij}, \qquad
    T^{(k)} = \partial K / \partial \theta_k .

Reverse mode (:mod:`gpntk.kernels.blocked`) recomputes each block in the backward pass and carries
the gradients of the per-point variances down the layers as sums over rows and over columns; a
compiler cannot fuse those reductions with the elementwise recursion, so the backward of a block
costs about four of its forward passes (512 × 512 blocks of a depth-3 ReLU NTK, compiled, one
thread: 7 ms forward, 30 ms forward with gradients and backward). Forward mode has no such
reductions: each value of the recursion carries its derivative in one hyperparameter
(:func:`torch.func.jvp`), and the value with two tangents is about three forward passes (21 ms).
:class:`TangentKernels` therefore fills :math:`K` and every :math:`T^{(k)}` in its forward pass
and its backward is the sum above, one pass over stored matrices.

The price is memory, one :math:`n_1 \times n_2` matrix per hyperparameter until the backward has
run (half of one for a symmetric kernel: the blocks on and above the diagonal), so this path is
taken (:func:`wants_tangents`) only for compiled evaluations of one kernel matrix
(:func:`~gpntk.kernels.dense.evaluate_output`) whose inputs need no gradient, whose
hyperparameters are of shape ``(..., 1, 1)`` (each entry of :math:`K` depends on one entry of
each) and whose tangents fit in :data:`gpntk.settings.TANGENT_MAX_ELEMENTS`. A second derivative
(``create_graph=True``) recomputes the whole recursion differentiably, as in
:mod:`gpntk.kernels.blocked`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import settings
from ..activations.first_order import first_order_tangents
from ..core.coincident import Coincidence, RowIds, exact_values
from ..core.layer import InputShape, Layer
from ..layers.dropout import Dropout
from .blocked import Evaluation, assemble_blocks, block_cotangent, differentiable_backward, incoming_gradients
from .engine import block_kernels, check_finite_kernel
from .planning import Block

__all__ = ["TangentKernels", "TangentsNotFinite", "block_tangents", "wants_tangents", "tangent_kernel"]


def block_tangents(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    track_ntk: bool,
    same: bool,
    coincident: Coincidence | None,
    wanted: tuple[bool, ...],
) -> tuple[Tensor, ...]:
    r"""``(K, T⁽ᵏ⁾ for each hyperparameter k with wanted[k])`` of one block, :math:`K` the NTK
    (``track_ntk``) or the NNGP and :math:`T^{(k)} = \partial K/\partial\theta_k` (every entry of
    :math:`\theta_k` moved together: each entry of :math:`K` depends on one of them).

    One :func:`torch.func.jvp` per hyperparameter (:func:`fill_tangents` asks for one at a time). The
    caller switches the arc-cosine functions to their first-order forms
    (:mod:`gpntk.activations.first_order`): the same values, tangents in closed form. The pairs
    are computed as if no inputs coincided, and the coincident pairs then take the value and the
    tangents of the per-point recursion: identical inputs stay at correlation one for every
    :math:`\theta`, where the pair formula's derivative in the correlation is infinite (times a zero
    change), and every pair depends on no other pair, so this is what the exact evaluation gives
    (:mod:`gpntk.core.coincident`), and the block stays one elementwise loop. No data-dependent
    branch, so it compiles.
    """
    names = tuple(hyper)
    values = tuple(hyper.values())

    def kernel(*moved: Tensor) -> Tensor:
        # same=False: no coincident pairs at all (with same=True the diagonal would be taken as coincident)
        cov, ntk = block_kernels(net, x1, x2, dict(zip(names, moved)), input_shape, track_ntk, False, False, None)
        return ntk if ntk is not None else cov

    def per_point(*moved: Tensor) -> Tensor:  # (..., n1, 1): each row point with itself
        cov, ntk = block_kernels(net, x1, x1, dict(zip(names, moved)), input_shape, track_ntk, True, True, None)
        return ntk if ntk is not None else cov

    value: Tensor | None = None
    tangents = []
    for k, want in enumerate(wanted):
        if not want:
            continue
        direction = tuple(torch.ones_like(v) if i == k else torch.zeros_like(v) for i, v in enumerate(values))
        value_and_tangent = torch.func.jvp(kernel, values, direction)
        value, tangent = value_and_tangent[0], value_and_tangent[1]
        if coincident is not None:
            points = torch.func.jvp(per_point, values, direction)
            value = _with_point_values(value, points[0], coincident)
            tangent = _with_point_values(tangent, points[1], coincident)
        tangents.append(tangent)
    assert value is not None  # at least one hyperparameter is wanted
    return (value, *tangents)


def _with_point_values(pairs: Tensor, points: Tensor, coincident: Coincidence) -> Tensor:
    """``pairs`` with each coincident entry replaced by its row's entry of ``points`` (a plain
    replacement: the entries replaced may be NaN, so no derivative carrier is taken from them)."""
    if coincident.mask is not None:
        carrier = torch.zeros_like(pairs)
    else:
        assert coincident.rows is not None  # index form
        carrier = pairs.new_zeros(*pairs.shape[:-2], coincident.rows.shape[0])
    return exact_values(pairs, points, coincident, derivatives=carrier)


def wants_tangents(
    net: Layer, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], fused: bool, keep: tuple[bool, bool],
    blocks: list[Block],
) -> bool:
    """Whether an evaluation that records gradients (:func:`~gpntk.kernels.blocked.wants_recomputed_backward`)
    takes this module's forward-mode path; see the module docstring for the conditions.

    Networks with ``Dropout`` never do: after it, identical inputs other than a point with itself are
    different draws (:func:`~gpntk.core.coincident.same_point_pairs`), which :func:`block_tangents`'
    per-point values at every coincident pair would not respect.
    """
    wanted = sum(v.requires_grad for v in hyper.values())
    if not fused or len(blocks) < 2 or sum(keep) != 1 or x1.requires_grad or x2.requires_grad or wanted == 0:
        return False
    if _contains_dropout(net):
        return False
    if any(v.dim() < 2 or v.shape[-2:] != (1, 1) for v in hyper.values()):
        return False
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(v.shape[:-2] for v in hyper.values()))
    # the tangents of the blocks computed: a block mirrored below the diagonal is stored once
    pairs = sum(_length(r, x1.shape[-2]) * _length(c, x2.shape[-2]) for r, c, _, _ in blocks)
    return wanted * math.prod(batch) * pairs <= settings.TANGENT_MAX_ELEMENTS


def _length(part: slice, n: int) -> int:
    return len(range(*part.indices(n)))


def _contains_dropout(net: Layer) -> bool:
    return isinstance(net, Dropout) or any(_contains_dropout(layer) for layer in net.children_layers())


def fill_tangents(
    how: Evaluation, x1: Tensor, x2: Tensor, values: tuple[Tensor, ...], wanted: tuple[bool, ...]
) -> tuple[Tensor, list[tuple[Block, tuple[Tensor, ...]]]]:
    """``(K, [(block, (T⁽ᵏ⁾ of the block for each wanted k))])``: the kernel ``(..., n1, n2)`` filled block by
    block (compiled: ``how.fused``) and the tangents of each computed block (those mirrored below the
    diagonal are not stored twice)."""
    hyper = how.hyper(values)
    blocks = how.plan(x1, x2, hyper)
    ids = RowIds(x1, x2)
    computed: list[tuple[Tensor, ...]] = []  # each block's tangents, in the order of blocks

    def block(r: slice, c: slice, same: bool) -> tuple[Tensor]:
        a = x1[..., r, :]
        b = a if (same and x2 is x1) else x2[..., c, :]
        coincident = ids.block(r, c)
        value: Tensor | None = None
        parts: list[Tensor] = []
        for k in (k for k, want in enumerate(wanted) if want):
            # one call (one compiled loop) per hyperparameter: a loop carrying all tangents shares the
            # value's intermediates between them through stored n1 x n2 buffers, which measured slower
            alone = tuple(i == k for i in range(len(wanted)))
            args = (how.net, a, b, hyper, how.input_shape, how.track_ntk, same, coincident, alone)
            value, tangent = how.fusion.run(block_tangents, args, how.fused)
            parts.append(tangent)
        assert value is not None  # at least one hyperparameter is wanted
        computed.append(tuple(parts))
        return (value,)

    with first_order_tangents():  # first derivatives only, in closed form (gpntk.activations.first_order)
        (kernel,) = assemble_blocks(blocks, x1.shape[-2], x2.shape[-2], block, 1)
    assert kernel is not None  # every block computes it
    tangents = list(zip(blocks, computed))
    check_finite_kernel(kernel)
    try:
        check_finite_kernel(*(t for _, ts in tangents for t in ts))
    except FloatingPointError:
        # a finite kernel with an infinite tangent (a pair formula whose derivative in the correlation
        # is infinite somewhere; the arc-cosine family's closed-form tangents are finite at ±1, see
        # gpntk.activations.first_order): reverse mode, with its conventions, takes over
        raise TangentsNotFinite from None
    return kernel, tangents


class TangentsNotFinite(ArithmeticError):
    """Some tangent is not finite although the kernel is: the evaluation takes reverse mode instead."""


class TangentKernels(torch.autograd.Function):
    """The one kept kernel matrix of ``x1, x2, *hyperparameters``, with the tangents for its backward."""

    @staticmethod
    def forward(ctx: Any, how: Evaluation, x1: Tensor, x2: Tensor, *values: Tensor) -> Tensor:
        wanted = tuple(ctx.needs_input_grad[3:])  # the hyperparameters that get a gradient
        kernel, tangents = fill_tangents(how, x1, x1 if how.same_object else x2, values, wanted)
        ctx.how, ctx.wanted, ctx.tangents = how, wanted, tangents
        ctx.save_for_backward(x1, x2, *values)
        return kernel

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        how: Evaluation = ctx.how
        x1, x2, *values = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the whole recursion again, differentiably
            grads = incoming_gradients(how, (grad,))
            return (None, *differentiable_backward(how, x1, x2, tuple(values), grads, ctx.needs_input_grad[1:]))
        totals: list[Tensor | None] = [None] * sum(ctx.wanted)
        for (r, c, _, mirrored), block_tangents_ in ctx.tangents:
            cotangent = block_cotangent(grad, r, c, mirrored)
            for k, tangent in enumerate(block_tangents_):
                part = (cotangent * tangent).sum((-2, -1), keepdim=True)
                total = totals[k]
                totals[k] = part if total is None else total + part
        found = iter(totals)
        out: list[Tensor | None] = []
        for value, want in zip(values, ctx.wanted):
            total = next(found) if want else None
            # each entry of K depends on one entry of the hyperparameter: sum over the entries it reaches
            out.append(None if total is None else total.sum_to_size(value.shape))
        return (None, None, None, *out)


def tangent_kernel(how: Evaluation, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> Tensor:
    """The kept matrix of ``how`` through :class:`TangentKernels` (see :func:`wants_tangents`)."""
    return TangentKernels.apply(how, x1, x2, *hyper.values())  # type: ignore[no-untyped-call]
