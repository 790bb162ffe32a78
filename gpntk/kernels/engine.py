r"""One block of the kernel recursion: the input kernel, then every layer's map.

:func:`block_kernels` is the whole recursion for one block of input pairs — it builds the input
:class:`~gpntk.core.state.KernelState` and hands it through ``net.kernel_map`` — with no
data-dependent branch, so that it compiles. :func:`run_block` finds the block's identical rows
(:mod:`gpntk.core.coincident`) and runs it eagerly or through the owner's
:class:`~gpntk.kernels.fusion.FusionPolicy`. :func:`check_finite_kernel` turns an overflow into an
error. The dense and blockwise backends (:mod:`gpntk.kernels.dense`,
:mod:`gpntk.kernels.blockwise`) call these once per block of their plan
(:mod:`gpntk.kernels.planning`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .._transforms import is_batched, is_transformed
from ..core.coincident import Coincidence, RowIds
from ..core.graph_inputs import GraphDataset, GraphInputs, NodeGraph
from ..core.hyperparameters import Hyperparameters
from ..core.layer import InputShape, Layer
from ..core.spatial import Layout
from ..core.state import KernelState
from .fusion import FusionPolicy

__all__ = ["Output", "block_kernels", "run_block", "check_finite_kernel", "same_inputs", "input_layout"]

Output = Literal["ntk", "nngp"]


def same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x1`` and ``x2`` hold the same points (then diagonals use the per-point recursion).

    Inside a ``torch.func`` batching transform (``vmap``), where values cannot decide a branch,
    only ``x1 is x2`` counts (coincident rows are still found, see :mod:`gpntk.core.coincident`).
    """
    if x1 is x2:
        return True
    if x1.shape != x2.shape or is_batched(x1) or is_batched(x2):
        return False
    return bool(torch.equal(x1, x2))


def input_layout(net: Layer, input_shape: InputShape) -> Layout:
    """The layout of the input kernel: spatial when ``input_shape`` has spatial dims, full if pooling follows.

    Graphs: their nodes, always in the full layout (aggregation and pooling mix nodes).
    """
    if isinstance(input_shape, (GraphInputs, NodeGraph, GraphDataset)):
        return Layout(input_shape.spatial, full=True)
    if input_shape is None or len(input_shape) < 2:
        return Layout()
    return Layout(tuple(input_shape[1:]), full=net.needs_full(False))


def block_kernels(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    track_ntk: bool,
    same: bool,
    diag: bool,
    coincident: Coincidence | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(Σ, Θ or None)`` of one block: the input kernel and every layer's map.

    ``same``: ``x1`` and ``x2`` are the same points; ``coincident``: the pairs of identical rows
    (:mod:`gpntk.core.coincident`). No data-dependent branch, so it compiles.
    """
    layout = input_layout(net, input_shape)
    state = KernelState.from_inputs(
        x1, x2, diag=diag, same_inputs=same, track_ntk=track_ntk, input_shape=input_shape, full=layout.full,
        coincident=coincident,
    )
    state = net.kernel_map(state, Hyperparameters(net, hyper))
    return state.cov12, (state.ntk_or_zeros() if track_ntk else None)


#: ``run_block``'s default: find the coincident pairs of the block itself
_FIND = object()


def run_block(
    *args: Any, fusion: FusionPolicy | None, fused: bool, coincident: Any = _FIND
) -> tuple[Tensor, Tensor | None]:
    """One block's kernels, :func:`block_kernels` ``(*args, coincident)``, compiled when ``fused``.

    ``args`` are ``(net, x1, x2, hyper, input_shape, track_ntk, same, diag)``; ``fusion`` is the
    owner's compile policy (``fused`` its decision for this evaluation, see
    :meth:`FusionPolicy.use_fusion`). The coincident pairs (data-dependent, so found outside the
    compiled function) are found here unless given.
    """
    if coincident is _FIND:
        x1, x2, diag = args[1], args[2], args[7]
        coincident = None if diag else RowIds(x1, x2).block()
    args = (*args, coincident)
    if fusion is None or not fused:
        return block_kernels(*args)
    return fusion.run(block_kernels, args, fused)


def check_finite_kernel(*values: Tensor | None, inputs: Tensor | None = None) -> None:
    """Raise ``FloatingPointError`` if a kernel value (or product) computed from finite inputs is not finite.

    Inputs are checked for NaN and infinities before any evaluation, so a non-finite value here
    means the recursion overflowed the dtype's range (an ``Exp`` or polynomial activation on large
    variances, a deep network with a large weight variance, float32 on large inputs); it is
    reported rather than returned. ``inputs``: a right-hand side of a product, which may itself be
    non-finite (then nothing is checked). Skipped under ``torch.func`` transforms, where a
    data-dependent check is unavailable.
    """
    if inputs is not None and is_transformed(inputs):
        return
    for value in values:
        if value is None or is_transformed(value) or value.numel() == 0:
            continue
        # one pass: a finite sum means every value is finite (a NaN or an infinity makes the sum
        # NaN or infinite); only a non-finite sum (such a value, or a sum past the dtype's range) is
        # looked at value by value
        if bool(torch.isfinite(value.sum())):
            continue
        if not bool(torch.isfinite(value).all()):
            if inputs is not None and not bool(torch.isfinite(inputs).all()):
                return
            count = int((~torch.isfinite(value)).sum())
            remedy = "float64, " if value.dtype != torch.float64 else ""
            raise FloatingPointError(
                f"the kernel overflowed: {count} of {value.numel()} values are NaN or infinite in {value.dtype} "
                "although the inputs are finite (the exact values exceed the dtype's range). Use "
                f"{remedy}smaller weight or bias variances, fewer layers, or rescaled inputs."
            )
