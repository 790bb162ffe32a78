r"""Block planning: which blocks of input pairs one kernel evaluation computes, within a memory budget.

Kernels are computed in blocks of input pairs so that no intermediate tensor holds more than
``block_elements`` numbers (default :func:`default_block_elements`). Spatial architectures carry a
covariance per pair of positions (``P`` or ``P²`` numbers per pair of inputs, see
:mod:`gpntk.core.spatial`), so for them blocks bound the memory; on CPUs small blocks are also much
faster, because the dozens of elementwise passes of the recursion then run in cache instead of
allocating fresh memory for every pass (measured: a 2000 x 2000 depth-3 ReLU NTK 2.8x faster in
512 x 512 blocks, a CNN-with-pooling kernel 6x faster in blocks of 2**18 numbers than 2**23). For
inputs that are the same points only the blocks on and above the diagonal are computed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._transforms import is_transformed
from ..core.layer import InputShape, Layer
from .engine import input_layout, same_inputs

__all__ = [
    "default_block_elements", "block_ranges", "block_plan", "batch_shape_of", "numbers_per_pair", "kernel_blocks",
]

Block = tuple[slice, slice, bool, bool]


def default_block_elements(device: torch.device) -> int:
    """The most numbers one intermediate tensor of a block holds by default.

    On CPUs ``2**18`` (2 MiB in float64: the recursion's passes stay in cache); on GPUs ``2**25``
    (256 MiB in float64: large kernels launches, few blocks).
    """
    return 2**18 if device.type == "cpu" else 2**25


def block_ranges(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def block_plan(
    n1: int, n2: int, per_pair: int, budget: int, symmetric: bool, mirror: bool = True
) -> list[Block]:
    """The blocks ``(rows, cols, on_diagonal, mirrored)`` that cover an ``n1 x n2`` kernel.

    Each block holds at most ``budget`` numbers (``per_pair`` per pair of inputs). For a
    ``symmetric`` kernel K(X, X) the blocks are squares and ``on_diagonal`` blocks pair the same
    points; with ``mirror`` only blocks on and above the diagonal are listed, the ``mirrored``
    ones standing for their transpose below it too. Otherwise, when a whole row fits, blocks are
    full-width row bands.
    """
    if symmetric or n2 * per_pair > budget:
        size = max(1, math.isqrt(max(budget // per_pair, 1)))
        rows, cols = block_ranges(n1, size), block_ranges(n2, size)
    else:
        rows, cols = block_ranges(n1, max(1, budget // (n2 * per_pair))), [slice(0, n2)]
    return [
        (r, c, symmetric and i == j, symmetric and mirror and j > i)
        for i, r in enumerate(rows)
        for j, c in enumerate(cols)
        if not (symmetric and mirror and j < i)
    ]


def batch_shape_of(x1: Tensor, x2: Tensor, hyper: dict[str, Tensor]) -> torch.Size:
    """The broadcast batch shape of the inputs and the hyperparameters."""
    return torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(h.shape[:-2] for h in hyper.values()))


def numbers_per_pair(
    net: Layer, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], input_shape: InputShape
) -> int:
    """Numbers one pair of inputs takes in the recursion: spatial entries times the batch size."""
    return input_layout(net, input_shape).elements_per_pair * math.prod(batch_shape_of(x1, x2, hyper))


def kernel_blocks(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    block_elements: int | None,
    mirror: bool = True,
) -> tuple[list[Block], int, bool]:
    """``(blocks, numbers in the whole kernel, same points)`` of the kernel between ``x1`` and ``x2``.

    ``blocks`` as in :func:`block_plan`, for the budget ``block_elements`` (default
    :func:`default_block_elements`); "same points": ``x1`` and ``x2`` hold equal values. Blocks are
    mirrored only where that keeps gradients right: a mirrored block stands for rows of ``x2`` and
    columns of ``x1``, so for two different tensors that autograd (or a ``torch.func`` transform)
    follows, every block is computed.
    """
    if x1 is not x2 and (
        (torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad))
        or is_transformed(x1) or is_transformed(x2)
    ):
        mirror = False
    budget = default_block_elements(x1.device) if block_elements is None else block_elements
    per_pair = numbers_per_pair(net, x1, x2, hyper, input_shape)
    n1, n2 = x1.shape[-2], x2.shape[-2]
    symmetric = same_inputs(x1, x2)
    if n1 * n2 * per_pair <= budget:
        blocks = [(slice(0, n1), slice(0, n2), symmetric, False)]
    else:
        blocks = block_plan(n1, n2, per_pair, budget, symmetric, mirror)
    return blocks, n1 * n2 * per_pair, symmetric
