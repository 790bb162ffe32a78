r"""The graph that travels with a kernel state: message passing and pooling over nodes.

For graph inputs the "positions" of the kernel state are nodes, held in the full layout
(:mod:`gpntk.core.spatial`): :math:`\Sigma(G, G')_{u, u'}` for every node :math:`u` of
:math:`G` and :math:`u'` of :math:`G'`. Unlike a convolution, the linear maps here depend on the
inputs themselves, so each state carries its graphs:

* :class:`PaddedGraphs` (graph-level kernels, :class:`~gpntk.core.graph_inputs.GraphInputs`):
  the adjacencies and node masks of the two sets of graphs of a block;
* :class:`SparseGraph` (node-level kernels, :class:`~gpntk.core.graph_inputs.NodeGraph`): one
  graph's sparse adjacency; its state is the per-point state of that single graph, whose
  covariance between its own nodes is the node kernel.

Aggregation :math:`h'_u = \sum_v A_{uv} h_v` maps every covariance and the NTK alike,

.. math::
    \Sigma' = A\, \Sigma\, A'^{\top}, \qquad \Theta' = A\, \Theta\, A'^{\top}

(Du et al. 2019, the GNTK; Sabanayagam et al. 2023, the GCN-NTK): the map of a linear layer
without parameters. Pooling sums (or averages) over the real nodes of each graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .spatial import Layout

if TYPE_CHECKING:
    from .state import KernelState

__all__ = ["PaddedGraphs", "SparseGraph", "GraphContext"]

#: ``f(t, left, right)``: a map of one covariance tensor given each side's graph data in broadcast form
SideMap = Callable[[Tensor, Tensor, Tensor], Tensor]


def _rows(side: Tensor, trailing: int) -> Tensor:
    """Per-graph data ``(..., n, *rest)`` (``trailing = len(rest)``) as rows of pairs: ``(..., n, 1, *rest)``."""
    return side.unsqueeze(-1 - trailing)


def _cols(side: Tensor, trailing: int) -> Tensor:
    """Per-graph data ``(..., n, *rest)`` as the columns of a pair tensor, ``(..., 1, n, *rest)``."""
    return side.unsqueeze(-2 - trailing)


def _map_sides(state: "KernelState", side1: Tensor, side2: Tensor, trailing: int, fn: SideMap) -> "KernelState":
    """Apply ``fn`` to Σ(x1, x2), Σ(x1, x1), Σ(x2, x2) and Θ, each with the graph data of its two sides."""
    r1 = _rows(side1, trailing)
    if state.diag:
        cov12 = fn(state.cov12, r1, r1)
        ntk12 = None if state.ntk12 is None else fn(state.ntk12, r1, r1)
        return state.replace(cov12=cov12, var1=cov12, var2=cov12, ntk12=ntk12)
    c2 = _cols(side2, trailing)
    return state.replace(
        cov12=fn(state.cov12, r1, c2),
        var1=fn(state.var1, r1, r1),
        var2=fn(state.var2, c2, c2),
        ntk12=None if state.ntk12 is None else fn(state.ntk12, r1, c2),
    )


def _check_full(state: "KernelState", what: str) -> None:
    if not state.layout.full:
        raise RuntimeError(f"{what} needs the full node-by-node covariance")


@dataclass(frozen=True)
class PaddedGraphs:
    """A block of graph-level pairs: ``adjacency`` ``(..., n, N, N)`` and ``mask`` ``(..., n, N)`` of each side.

    In per-point mode (``diag``) the two sides are the same graphs.
    """

    adjacency1: Tensor
    adjacency2: Tensor
    mask1: Tensor
    mask2: Tensor

    def aggregate(self, state: "KernelState") -> "KernelState":
        r""":math:`\Sigma(G_i, G'_j) \leftarrow A_i \Sigma(G_i, G'_j) A_j'^{\top}` for every tensor of the state."""
        _check_full(state, "Aggregate")
        a1, a2 = self.adjacency1.to(state.cov12), self.adjacency2.to(state.cov12)
        return _map_sides(state, a1, a2, 2, lambda t, left, right: left @ t @ right.transpose(-1, -2))

    def pool(self, state: "KernelState", average: bool) -> "KernelState":
        r"""Sum over the real nodes of both graphs, :math:`\sum_{u \in G,\, u' \in G'} \Sigma_{u u'}`; or the mean."""
        _check_full(state, "pooling over nodes")
        m1, m2 = self.mask1.to(state.cov12), self.mask2.to(state.cov12)

        def pooled(t: Tensor, left: Tensor, right: Tensor) -> Tensor:
            total = (left.unsqueeze(-1) * t * right.unsqueeze(-2)).sum(dim=(-2, -1))
            if average:
                total = total / (left.sum(-1) * right.sum(-1)).clamp_min(1)
            return total

        return _map_sides(state, m1, m2, 1, pooled).replace(layout=Layout())


@dataclass(frozen=True)
class SparseGraph:
    """The one graph of a node-level kernel: its ``adjacency``, a sparse COO ``(N, N)`` tensor."""

    adjacency: Tensor

    def aggregate(self, state: "KernelState") -> "KernelState":
        r""":math:`\Sigma \leftarrow A \Sigma A^\top` (and :math:`\Theta`) by two sparse products."""
        _check_full(state, "Aggregate")
        if not state.diag:
            raise RuntimeError("a node-level kernel state holds the single graph with itself (per-point mode)")
        with warnings.catch_warnings():  # torch calls its CSR layout beta; the product used here is stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            csr = self.adjacency.to(state.cov12).to_sparse_csr()  # once for Σ and Θ

        def both_sides(t: Tensor, left: Tensor, right: Tensor) -> Tensor:
            return _sparse_sandwich(csr, t)

        placeholder = torch.empty(0)
        return _map_sides(state, placeholder, placeholder, 0, both_sides)

    def pool(self, state: "KernelState", average: bool) -> "KernelState":
        raise RuntimeError("a node-level kernel does not pool over its nodes (its outputs are per node)")


def _sparse_sandwich(csr: Tensor, t: Tensor) -> Tensor:
    r""":math:`A\, t\, A^\top` for ``csr`` (A, sparse CSR ``(N, N)``), dense ``t`` ``(..., N, N)``: two products.

    Each product multiplies a contiguous ``(N, b·N)`` stack of the batch's matrices (a strided
    view makes the sparse product several times slower).
    """
    n = t.shape[-1]
    batch = t.shape[:-2]
    flat = t.reshape(-1, n, n)
    b = flat.shape[0]
    def left_multiply(m: Tensor) -> Tensor:  # A @ m[k] for every k, m (b, N, N)
        stacked = m.permute(1, 0, 2).reshape(n, b * n).contiguous()
        return (csr @ stacked).reshape(n, b, n).permute(1, 0, 2)

    left = left_multiply(flat)  # A t
    out = left_multiply(left.transpose(-1, -2)).transpose(-1, -2)  # (A (A t)^T)^T = A t A^T
    return out.reshape(*batch, n, n)


#: what a graph kernel state carries
GraphContext = PaddedGraphs | SparseGraph
