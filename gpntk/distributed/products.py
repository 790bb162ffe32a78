r"""One rank's row blocks of a kernel matrix: its rows of products and of the dense matrix, gathered over ranks.

With the row blocks :math:`\mathcal R_p` of rank :math:`p` (:mod:`gpntk.distributed.rows`),

.. math::
    K V = \begin{pmatrix} \vdots \\ K_{\mathcal R_p,:}\, V \\ \vdots \end{pmatrix},
    \qquad K_{\mathcal R_p,:}\, V = \begin{pmatrix} K_{b_1,:} V \\ K_{b_2,:} V \\ \vdots \end{pmatrix}
    \quad (b_1, b_2, \dots \in \mathcal R_p):

each rank multiplies its blocks of rows, over all columns, by the whole :math:`V`, and one
``all_gather`` concatenates the ranks' rows
(:meth:`Communicator.concat <gpntk.distributed.group.Communicator.concat>`): the partitioned
kernel products of Wang et al. 2019. No number is summed across ranks, and the blocks do not
depend on the number of ranks, so every row of :math:`K V` is bitwise the one a single process
computes. The blocks are either stored (each product is then a pass over memory) or recomputed
by every product (matrix-free: the memory of one block).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .. import settings
from .group import Communicator
from .rows import rows_of

__all__ = ["BlockSource", "ShardedRows", "should_store"]

#: ``source(rows)``: the kernel's entries on a block of rows over all columns, ``(..., rows, n2)``, without graph
BlockSource = Callable[[slice], Tensor]


def should_store(blocks: list[slice], n2: int, batch_numel: int, store: bool | None) -> bool:
    """``store``, or where it is ``None`` whether this rank's rows fit :data:`gpntk.settings.DENSE_MAX_ELEMENTS`."""
    if store is not None:
        return store
    return rows_of(blocks) * n2 * batch_numel <= settings.DENSE_MAX_ELEMENTS


class ShardedRows:
    """This rank's row blocks of an ``n1 x n2`` kernel matrix (batch shape from ``shape``), and their gathers.

    :param source: computes a block of rows (:data:`BlockSource`).
    :param plan: every rank's row blocks (:func:`~gpntk.distributed.rows.plan_rows`).
    :param store: keep this rank's blocks after their first use (else recompute them every product).
    """

    def __init__(
        self,
        source: BlockSource,
        plan: list[list[slice]],
        shape: torch.Size,
        like: Tensor,
        comm: Communicator,
        store: bool,
    ):
        self.source, self.comm, self.store = source, comm, store
        self.blocks = plan[comm.rank]
        self.counts = [rows_of(blocks) for blocks in plan]
        self.batch_shape, (self.n1, self.n2) = shape[:-2], shape[-2:]
        self.dtype, self.device = like.dtype, like.device
        self._stored: list[Tensor] | None = None

    def _each(self) -> Iterable[Tensor]:
        """This rank's blocks in row order: stored ones, or computed now (and stored when ``store``)."""
        if self._stored is None and self.store:
            with torch.no_grad():
                self._stored = [self.source(rows) for rows in self.blocks]
        if self._stored is not None:
            return iter(self._stored)
        return (self.source(rows) for rows in self.blocks)

    def gather(self, mine: list[Tensor], like: Tensor, replicated: list[Tensor], what: str) -> Tensor:
        """This rank's row blocks of a result (``(..., rows, c)`` each), concatenated with every rank's."""
        if mine:
            part = torch.cat(mine, dim=-2)
        else:  # a rank with no rows (more ranks than blocks)
            part = like.new_zeros(*like.shape[:-2], 0, like.shape[-1])
        gathered = self.comm.concat(part.movedim(-2, 0), self.counts, replicated, what).movedim(0, -2)
        return gathered.contiguous()  # the layout of one process's result, so later operations take the same paths

    def matmul(self, rhs: Tensor) -> Tensor:
        """:math:`K V` for ``rhs`` :math:`V` ``(..., n2, c)``, the same on every rank; ``rhs`` must be replicated."""
        batch = torch.broadcast_shapes(self.batch_shape, rhs.shape[:-2])
        with torch.no_grad():
            mine = [block @ rhs for block in self._each()]
        like = rhs.new_empty(*batch, 0, rhs.shape[-1])
        return self.gather(mine, like, [rhs], "right-hand sides of a kernel product")

    def dense(self) -> Tensor:
        """The whole matrix ``(..., n1, n2)``, the same on every rank."""
        with torch.no_grad():
            mine = [block.expand(*self.batch_shape, *block.shape[-2:]) for block in self._each()]
        like = torch.empty(*self.batch_shape, 0, self.n2, dtype=self.dtype, device=self.device)
        return self.gather(mine, like, [], "kernel matrices")
