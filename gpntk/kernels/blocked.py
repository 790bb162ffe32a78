r"""A kernel matrix filled block by block, and a backward that recomputes each block.

:func:`fill_blocks` evaluates the kernel matrices :math:`(\Sigma, \Theta)` of ``x1`` and ``x2``
block by block (:mod:`gpntk.kernels.planning`) into two preallocated matrices.

Differentiating that fill with plain autograd is slow and memory hungry: autograd stores every
intermediate of every block (dozens of :math:`n \times n` numbers per layer) and each block's
slice assignment copies the whole :math:`n \times n` gradient again in the backward pass
(:math:`O(n^2)` work per block, so :math:`O(n^4 / B)` in all). :class:`RecomputedKernels` is
therefore a custom autograd Function, the blockwise form of gradient checkpointing (Chen et al.,
"Training Deep Nets with Sublinear Memory Cost", 2016): its forward fills the matrices without
recording anything; its backward takes the incoming gradient
:math:`\bar K = \partial L / \partial K` block by block, recomputes that block's recursion with
gradients and pulls :math:`\bar K_{rc}` back to the block's rows of ``x1``, columns of ``x2`` and
the hyperparameters,

.. math::
    \bar x_{1,r} \mathrel{+}= \bar K_{rc} \cdot \partial K_{rc} / \partial x_{1,r}, \qquad
    \bar\theta \mathrel{+}= \textstyle\sum_{ij} (\bar K_{rc})_{ij} \, \partial (K_{rc})_{ij} / \partial \theta.

Each block's intermediates live only while that block is processed and stay in cache on CPUs,
so the backward costs about two forward passes plus one block-sized autograd pass, and the peak
memory is the output and its gradient. A second derivative (``create_graph=True``) recomputes the
whole recursion differentiably from the saved inputs, so double backward stays exact.
``torch.func`` transforms and forward-mode dual tensors take the plain autograd path
(:func:`wants_recomputed_backward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.forward_ad import unpack_dual

from .. import settings
from .._progress import track
from .._transforms import is_transformed
from ..core.coincident import RowIds
from ..core.layer import InputShape, Layer
from .engine import block_kernels, check_finite_kernel, run_block
from .fusion import FusionPolicy
from .memory import empty_matrix
from .planning import Block, batch_shape_of, kernel_blocks

__all__ = [
    "fill_blocks", "assemble_blocks", "RecomputedKernels", "wants_recomputed_backward", "recomputed_kernels", "Kept",
    "BOTH", "Evaluation", "incoming_gradients", "differentiable_backward", "block_cotangent",
]

Kept = tuple[bool, bool]
"""Which of ``(Σ, Θ)`` an evaluation stores and returns."""

BOTH: Kept = (True, True)


def fill_blocks(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    track_ntk: bool,
    block_elements: int | None,
    fusion: FusionPolicy,
    fused: bool | None = None,
    keep: Kept = BOTH,
) -> tuple[Tensor | None, Tensor | None]:
    r"""``(Σ(x1, x2), Θ(x1, x2))``, ``(..., n1, n2)`` each, computed block by block.

    ``keep``: which of the two matrices are stored and returned (the others are ``None``; the
    recursion computes :math:`\Sigma` anyway, so keeping only :math:`\Theta` saves the memory and
    the copies of one matrix). Without ``track_ntk`` :math:`\Theta` is ``None``. ``fused``: whether
    the blocks run compiled (``None``: the policy's decision, :meth:`FusionPolicy.use_fusion`).
    Differentiable by plain autograd (every block recorded).
    """
    blocks, elements, symmetric = kernel_blocks(net, x1, x2, hyper, input_shape, block_elements)
    if fused is None:
        fused = fusion.use_fusion(x1, x2, hyper, input_shape, track_ntk, elements)
    ids = RowIds(x1, x2)
    if len(blocks) == 1:
        kernels = run_block(
            net, x1, x2, hyper, input_shape, track_ntk, symmetric, False, fusion=fusion, fused=fused,
            coincident=ids.block(),
        )
        cov, ntk = (k if kept else None for k, kept in zip(kernels, keep))
        check_finite_kernel(cov, ntk)
        return cov, ntk

    def block(r: slice, c: slice, same: bool) -> list[Tensor | None]:
        a = x1[..., r, :]
        b = a if (same and x2 is x1) else x2[..., c, :]
        kernels = run_block(
            net, a, b, hyper, input_shape, track_ntk, same, False, fusion=fusion, fused=fused,
            coincident=ids.block(r, c),
        )
        return [k if kept else None for k, kept in zip(kernels, keep)]

    if fused and _writes_in_place(x1, x2, hyper):
        outputs = _fill_in_place(blocks, x1, x2, (net, hyper, input_shape, track_ntk), ids, fusion, keep)
    else:
        outputs = assemble_blocks(blocks, x1.shape[-2], x2.shape[-2], block, 2)
        check_finite_kernel(*outputs)
    return outputs[0], outputs[1]


def _writes_in_place(x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> bool:
    """Whether compiled blocks may write into the output matrices: nothing records gradients, no transform."""
    tensors = (x1, x2, *hyper.values())
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not recorded and not any(is_transformed(t) for t in tensors)


def _fill_in_place(
    blocks: list[Block],
    x1: Tensor,
    x2: Tensor,
    recursion: tuple[Layer, dict[str, Tensor], InputShape, bool],
    ids: RowIds,
    fusion: FusionPolicy,
    keep: Kept,
) -> list[Tensor | None]:
    """:func:`assemble_blocks` for compiled blocks, each written by its own loop (:func:`write_block`).

    The matrices, ``(*batch, n1, n2)`` for the broadcast batch shape of the inputs and the
    hyperparameters, are allocated first; the compiled recursion of each block then writes straight
    into its place in them (and, mirrored, into its transpose), without an intermediate block and a
    copy of it: 10 % of a dense 4000 x 4000 NNGP + NTK evaluation (depth-3 ReLU, two threads).
    Every block goes through the same compiled code, so identical rows stay bitwise identical. The
    blocks' sums, added up, are the finiteness check (not finite: the matrices are checked value by
    value, :func:`~gpntk.kernels.engine.check_finite_kernel`).
    """
    net, hyper, input_shape, track_ntk = recursion
    shape = (*batch_shape_of(x1, x2, hyper), x1.shape[-2], x2.shape[-2])
    outputs = [empty_matrix(shape, x1) if kept else None for kept in (keep[0], keep[1] and track_ntk)]
    total = x1.new_zeros(())
    for r, c, same, mirrored in track(blocks, "kernel matrix", unit="block"):
        a = x1[..., r, :]
        b = a if (same and x2 is x1) else x2[..., c, :]
        targets = tuple(None if out is None else out[..., r, c] for out in outputs)
        mirrors = tuple(None if out is None or not mirrored else out[..., c, r] for out in outputs)
        args = (targets, mirrors, net, a, b, hyper, input_shape, track_ntk, same, False, ids.block(r, c))
        total = total + fusion.run(write_block, args, True)
    if not bool(torch.isfinite(total)):  # a value that is not finite, or a sum past the dtype's range
        check_finite_kernel(*outputs)
    return outputs


def write_block(
    targets: tuple[Tensor | None, Tensor | None], mirrors: tuple[Tensor | None, Tensor | None], *args: Any
) -> Tensor:
    """:func:`~gpntk.kernels.engine.block_kernels` ``(*args)`` copied into ``targets`` (and, transposed, into
    ``mirrors``) where these are given; returns the sum of the values written (finite exactly when every
    value is, or the sum overflowed)."""
    kernels = block_kernels(*args)
    total = kernels[0].new_zeros(())
    for kernel, target, mirror in zip(kernels, targets, mirrors):
        if kernel is None or target is None:
            continue
        if kernel.dtype != target.dtype:  # never cast silently (decided when the function is traced)
            raise TypeError(f"a kernel block of {kernel.dtype} cannot be written into a {target.dtype} matrix")
        target.copy_(kernel)
        if mirror is not None:
            mirror.copy_(kernel.transpose(-1, -2))
        total = total + kernel.sum()
    return total


def assemble_blocks(
    blocks: list[Block],
    n1: int,
    n2: int,
    compute: Callable[[slice, slice, bool], Sequence[Tensor | None]],
    count: int,
) -> list[Tensor | None]:
    """``count`` matrices ``(..., n1, n2)`` filled block by block: ``compute(rows, cols, same)`` gives
    each one's block (``None``: not computed); a mirrored block is also written transposed below the
    diagonal. Matrices are allocated at their first block; one never computed stays ``None``."""
    outputs: list[Tensor | None] = [None] * count
    for r, c, same, mirrored in track(blocks, "kernel matrix", unit="block"):
        for which, block in enumerate(compute(r, c, same)):
            if block is None:
                continue
            target = outputs[which]
            if target is None:
                target = outputs[which] = empty_matrix((*block.shape[:-2], n1, n2), block)
            target[..., r, c] = block
            if mirrored:
                target[..., c, r] = block.transpose(-1, -2)
    return outputs


def _has_tangent(x: Tensor) -> bool:
    return unpack_dual(x).tangent is not None


def wants_recomputed_backward(x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> bool:
    """Whether an evaluation records gradients that :class:`RecomputedKernels` can provide.

    True when autograd is on and an input or hyperparameter requires a gradient, none of them
    is wrapped by a ``torch.func`` transform or carries a forward-mode tangent, and
    :class:`gpntk.settings.recompute_backward` is on.
    """
    if not (torch.is_grad_enabled() and settings.recompute_backward.on()):
        return False
    tensors = (x1, x2, *hyper.values())
    if not any(t.requires_grad for t in tensors):
        return False
    return not any(is_transformed(t) or _has_tangent(t) for t in tensors)


@dataclass(frozen=True)
class Evaluation:
    """What one evaluation needs besides its tensors: the network, the options, the hyperparameter names."""

    net: Layer
    input_shape: InputShape
    track_ntk: bool
    block_elements: int | None
    fusion: FusionPolicy
    fused: bool
    names: tuple[str, ...]
    same_object: bool  # x1 is x2
    keep: Kept  # which of (Σ, Θ) are outputs of the Function

    def hyper(self, values: tuple[Tensor, ...]) -> dict[str, Tensor]:
        return dict(zip(self.names, values))

    def plan(self, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> list[Block]:
        """The blocks of the kernel between ``x1`` and ``x2`` (:func:`~gpntk.kernels.planning.kernel_blocks`)."""
        return kernel_blocks(self.net, x1, x2, hyper, self.input_shape, self.block_elements)[0]


class RecomputedKernels(torch.autograd.Function):
    """The kept ones of ``(Σ, Θ)`` of ``x1, x2, *hyperparameters``, in that order; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, how: Evaluation, x1: Tensor, x2: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
        b = x1 if how.same_object else x2
        outs = fill_blocks(how.net, x1, b, how.hyper(values), how.input_shape, how.track_ntk,
                           how.block_elements, how.fusion, how.fused, how.keep)
        ctx.how = how
        ctx.save_for_backward(x1, x2, *values)
        return tuple(o for o in outs if o is not None)

    @staticmethod
    def backward(ctx: Any, *kept_grads: Tensor | None) -> tuple[Tensor | None, ...]:
        how: Evaluation = ctx.how
        x1, x2, *values = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        grads = incoming_gradients(how, kept_grads)
        if torch.is_grad_enabled():  # create_graph: differentiate the whole recursion again, differentiably
            return (None, *differentiable_backward(how, x1, x2, tuple(values), grads, needs))
        return (None, *_blockwise_backward(how, x1, x2, tuple(values), grads, needs))


def incoming_gradients(how: Evaluation, kept_grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """The gradients of a Function's outputs (the kept matrices) aligned with ``(Σ, Θ)``: ``None`` for one not kept."""
    given = iter(kept_grads)
    return tuple(next(given) if kept else None for kept in how.keep[: 1 + how.track_ntk])


def _gradient_slots(how: Evaluation, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[int]:
    """Positions of the Function's tensor inputs that get a gradient (one tensor on both sides: the first)."""
    same = how.same_object
    return [
        i for i, need in enumerate(needs)
        if (need and not (same and i == 1)) or (same and i == 0 and needs[1])
    ]


def differentiable_backward(
    how: Evaluation, x1: Tensor, x2: Tensor, values: tuple[Tensor, ...], grads: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The vector-Jacobian product with a graph of its own (for second derivatives)."""
    b = x1 if how.same_object else x2
    outs = fill_blocks(how.net, x1, b, how.hyper(values), how.input_shape, how.track_ntk, how.block_elements,
                       how.fusion, fused=False, keep=how.keep)
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
    tensors = (x1, x2, *values)
    slots = _gradient_slots(how, tensors, needs)
    out: list[Tensor | None] = [None] * len(tensors)
    if pairs and slots:
        found = torch.autograd.grad([o for o, _ in pairs], [tensors[i] for i in slots], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
        for i, g in zip(slots, found):
            out[i] = g
    return tuple(out)


def block_cotangent(grad: Tensor | None, r: slice, c: slice, mirrored: bool) -> Tensor | None:
    """The gradient of one block; a mirrored block also stands for its transpose below the diagonal."""
    if grad is None:
        return None
    g = grad[..., r, c]
    return g + grad[..., c, r].transpose(-1, -2) if mirrored else g


def _blockwise_backward(  # long: one loop over blocks with its leaves, cotangents and accumulators
    how: Evaluation, x1: Tensor, x2: Tensor, values: tuple[Tensor, ...], grads: tuple[Tensor | None, ...],
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The vector-Jacobian product, block by block (see the module docstring)."""
    need1, need2, *need_hyper = needs
    same_object = how.same_object
    need1 = need1 or (same_object and need2)
    gx1 = torch.zeros_like(x1) if need1 else None
    gx2 = torch.zeros_like(x2) if (need2 and not same_object) else None
    hyper_leaves = tuple(v.detach().requires_grad_(n) for v, n in zip(values, need_hyper))
    ghyper: list[Tensor | None] = [None] * len(values)
    hyper = how.hyper(hyper_leaves)
    b_full = x1 if same_object else x2
    with torch.enable_grad():
        # the plan autograd would follow: blocks mirrored only for one tensor on both sides
        probe1 = x1.detach().requires_grad_(need1)
        probe2 = probe1 if same_object else x2.detach().requires_grad_(need2)
        blocks, _, _ = kernel_blocks(how.net, probe1, probe2, hyper, how.input_shape, how.block_elements)
    ids = RowIds(x1.detach(), x1.detach() if same_object else x2.detach())
    for r, c, same, mirrored in track(blocks, "kernel gradient", unit="block"):
        cotangents = [block_cotangent(g, r, c, mirrored) for g in grads]
        if all(g is None for g in cotangents):
            continue
        a = x1[..., r, :].detach().requires_grad_(need1)
        diagonal_leaf = same and same_object
        b = a if diagonal_leaf else b_full[..., c, :].detach().requires_grad_(need1 if same_object else need2)
        with torch.enable_grad():
            outs = run_block(how.net, a, b, hyper, how.input_shape, how.track_ntk, same, False,
                             fusion=how.fusion, fused=how.fused, coincident=ids.block(r, c))
            pairs = [(o, g) for o, g in zip(outs, cotangents) if o is not None and g is not None]
            inputs: list[Tensor] = [t for t in (a, *(() if diagonal_leaf else (b,)), *hyper_leaves) if t.requires_grad]
            if not inputs:
                continue
            found = dict(zip(map(id, inputs), torch.autograd.grad(
                [o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)))
        ga, gb = found.get(id(a)), None if diagonal_leaf else found.get(id(b))
        if ga is not None and gx1 is not None:
            gx1[..., r, :] += ga
        if gb is not None:
            target = gx1 if same_object else gx2
            if target is not None:
                target[..., c, :] += gb
        for i, leaf in enumerate(hyper_leaves):
            g = found.get(id(leaf))
            if g is not None:
                total = ghyper[i]
                ghyper[i] = g if total is None else total + g
    return (gx1 if needs[0] or same_object else None, gx2, *ghyper)


def recomputed_kernels(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    track_ntk: bool,
    block_elements: int | None,
    fusion: FusionPolicy,
    keep: Kept = BOTH,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`fill_blocks` through :class:`RecomputedKernels` (inputs that need gradients), storing the
    matrices in ``keep``.

    A kernel of one block is left to plain autograd: there is no assembly to undo, its
    intermediates are one block's, and recomputing would double its cost.
    """
    blocks, elements, _ = kernel_blocks(net, x1, x2, hyper, input_shape, block_elements)
    if len(blocks) == 1:
        return fill_blocks(net, x1, x2, hyper, input_shape, track_ntk, block_elements, fusion, keep=keep)
    fused = fusion.use_fusion(x1, x2, hyper, input_shape, track_ntk, elements)
    keep = (keep[0], keep[1] and track_ntk)
    how = Evaluation(net, input_shape, track_ntk, block_elements, fusion, fused, tuple(hyper), x2 is x1, keep)
    from .tangents import TangentsNotFinite, tangent_kernel, wants_tangents  # forward mode builds on this module

    if wants_tangents(net, x1, x2, hyper, fused, keep, blocks):
        try:
            kernel = tangent_kernel(how, x1, x2, hyper)
        except TangentsNotFinite:
            pass  # a tangent that is not finite: the recomputing backward below
        else:
            return (kernel, None) if keep[0] else (None, kernel)
    outs = iter(RecomputedKernels.apply(how, x1, x2, *hyper.values()))  # type: ignore[no-untyped-call]  # untyped apply
    cov = next(outs) if keep[0] else None
    return cov, (next(outs) if keep[1] else None)
