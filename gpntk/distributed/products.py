r"""One rank's tiles of a kernel matrix: products and the dense matrix, summed over ranks.

With the tiles :math:`\mathcal T_p` of rank :math:`p` (:mod:`gpntk.distributed.tiles`),

.. math::
    K V = \sum_p \Big( \sum_{(r, c) \in \mathcal T_p} E_r K_{rc} V_c
        + \sum_{(r, c) \in \mathcal T_p,\ \text{mirrored}} E_c K_{rc}^\top V_r \Big),

where :math:`E_r` places rows in the block :math:`r`. Each rank computes its term, a full
``(n1, c)`` tensor that is zero outside the rows its tiles touch, and one ``all_reduce`` sums them
(:meth:`Communicator.sum <gpntk.distributed.group.Communicator.sum>`), so every rank holds the
same :math:`K V`: the partitioned kernel products of Wang et al. 2019, with the symmetry of
:math:`K(X, X)` used as in :mod:`gpntk.kernels.blockwise`. The tiles are either stored (each
product is then a pass over memory) or recomputed by every product (matrix-free: memory of one
tile).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from .. import settings
from .group import Communicator
from .tiles import Tile

__all__ = ["TileSource", "ShardedTiles", "should_store"]

#: ``source(tile)``: the kernel's entries on one tile, ``(..., rows, cols)``, without autograd graph
TileSource = Callable[[Tile], Tensor]


def should_store(tiles: list[Tile], batch_numel: int, store: bool | None) -> bool:
    """``store``, or where it is ``None`` whether this rank's tiles fit :data:`gpntk.settings.DENSE_MAX_ELEMENTS`."""
    if store is not None:
        return store
    elements = sum((r.stop - r.start) * (c.stop - c.start) for r, c, _, _ in tiles) * batch_numel
    return elements <= settings.DENSE_MAX_ELEMENTS


class ShardedTiles:
    """This rank's tiles of an ``n1 x n2`` kernel matrix (batch shape ``batch_shape``), and their sums.

    :param source: computes a tile (:data:`TileSource`).
    :param tiles: this rank's tiles (:func:`~gpntk.distributed.tiles.plan_tiles`).
    :param store: keep the tiles after their first use (else recompute them every product).
    """

    def __init__(
        self,
        source: TileSource,
        tiles: list[Tile],
        shape: torch.Size,
        like: Tensor,
        comm: Communicator,
        store: bool,
    ):
        self.source, self.tiles, self.comm, self.store = source, tiles, comm, store
        self.batch_shape, (self.n1, self.n2) = shape[:-2], shape[-2:]
        self.dtype, self.device = like.dtype, like.device
        self._stored: list[Tensor] | None = None

    def _each(self) -> Iterable[tuple[Tile, Tensor]]:
        """Each tile with its entries: stored ones, or computed now (and stored when ``store``)."""
        if self._stored is None and self.store:
            with torch.no_grad():
                self._stored = [self.source(tile) for tile in self.tiles]
        if self._stored is not None:
            return zip(self.tiles, self._stored)
        return ((tile, self.source(tile)) for tile in self.tiles)

    def matmul(self, rhs: Tensor) -> Tensor:
        """:math:`K V` for ``rhs`` :math:`V` ``(..., n2, c)``, the same on every rank; ``rhs`` must be replicated."""
        batch = torch.broadcast_shapes(self.batch_shape, rhs.shape[:-2])
        out = rhs.new_zeros(*batch, self.n1, rhs.shape[-1])
        with torch.no_grad():
            for (r, c, _, mirrored), block in self._each():
                out[..., r, :] += block @ rhs[..., c, :]
                if mirrored:
                    out[..., c, :] += block.mT @ rhs[..., r, :]
        return self.comm.sum(out, replicated=[rhs], what="right-hand sides of a kernel product")

    def dense(self) -> Tensor:
        """The whole matrix ``(..., n1, n2)``, the same on every rank."""
        out = torch.zeros(*self.batch_shape, self.n1, self.n2, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for (r, c, _, mirrored), block in self._each():
                out[..., r, c] = block
                if mirrored:
                    out[..., c, r] = block.mT
        return self.comm.sum(out)
