r"""Which rows of a kernel matrix each rank computes: fixed row blocks, dealt to ranks contiguously.

The rows of an ``n1 x n2`` kernel matrix are cut into blocks of :func:`block_rows` rows, a number
that depends on the matrix's size alone, **not on the number of ranks**. Rank :math:`r` of
:math:`p` owns the blocks :math:`\lfloor rB/p \rfloor, \dots, \lfloor (r+1)B/p \rfloor - 1` of
the :math:`B` blocks (contiguous rows; the ranks' block counts differ by at most one) and
evaluates each of them against all ``n2`` columns. A row of :math:`K V` is therefore computed by
the same operations, on tensors of the same shapes, whatever the number of ranks — one process
runs the very same blocks — so products are bitwise equal for every world size (the row
partition of Wang et al. 2019, "Exact Gaussian Processes on a Million Data Points", NeurIPS).

Rows of :math:`K(X, X)` cannot use its symmetry (a mirrored entry would belong to another rank's
rows): the ranks together evaluate all :math:`n^2` entries, twice the :math:`n(n+1)/2` of a
single process that mirrors, in exchange for reproducible products.
"""

from __future__ import annotations

import math

__all__ = ["block_rows", "plan_rows", "rows_of", "MAX_BLOCK_ELEMENTS"]

#: the most numbers in one row block (``rows x n2 x batch``): 2**22 float64 numbers are 32 MiB. The
#: blocks' sizes, not the world size, decide whether they compile (:class:`gpntk.settings.fusion`: in a fit
#: from :data:`gpntk.settings.FUSION_MIN_ELEMENTS_FIT`; outside one, below :data:`~gpntk.settings.FUSION_MIN_ELEMENTS`
#: they never do), so every world size runs the same code on every block
MAX_BLOCK_ELEMENTS = 2**22
#: about this many row blocks (enough to deal among several ranks); fewer where blocks would be thinner than
TARGET_BLOCKS = 32
#: this many rows (thinner blocks cost more in per-call overhead than they gain in balance)
MIN_BLOCK_ROWS = 16


def block_rows(n1: int, n2: int, batch_numel: int = 1) -> int:
    """Rows per block of an ``n1 x n2`` kernel matrix (batch of ``batch_numel``): a function of the sizes only."""
    fits = max(1, MAX_BLOCK_ELEMENTS // max(1, n2 * batch_numel))
    return max(1, min(max(math.ceil(n1 / TARGET_BLOCKS), MIN_BLOCK_ROWS), fits, n1))


def plan_rows(n1: int, n2: int, world_size: int, batch_numel: int = 1) -> list[list[slice]]:
    """The row blocks of each rank (``world_size`` lists of slices); together, in rank order, rows ``0..n1-1``."""
    if n1 == 0:
        return [[] for _ in range(world_size)]
    size = block_rows(n1, n2, batch_numel)
    blocks = [slice(start, min(start + size, n1)) for start in range(0, n1, size)]
    count = len(blocks)
    return [blocks[count * rank // world_size : count * (rank + 1) // world_size] for rank in range(world_size)]


def rows_of(blocks: list[slice]) -> int:
    """How many rows ``blocks`` hold."""
    return sum(block.stop - block.start for block in blocks)
