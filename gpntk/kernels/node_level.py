r"""Node-level kernels on one graph (:class:`~gpntk.core.graph_inputs.NodeGraph`): the whole graph, then entries.

The kernel between two nodes of a graph network depends on their neighbourhoods, through every
``Aggregate`` of the network, so it is computed for the whole graph at once: the recursion runs
on the graph's covariance between its own nodes, :math:`\Sigma_0 = X X^\top / C`
``(N, N)``, with sparse products for the aggregations (:mod:`gpntk.core.graph_state`), and the
requested pairs of nodes are read from the result. Cost per evaluation: :math:`O(L\,(|E| N +
N^2))` time and :math:`O(N^2)` memory for :math:`L` layers and :math:`|E|` edges (the dense
:math:`N \times N` kernel is the output itself); the adjacency stays sparse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.graph_inputs import NodeGraph
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer
from ..core.state import KernelState
from .engine import check_finite_kernel
from .planning import batch_shape_of

__all__ = ["graph_kernels", "node_kernels", "node_kernel_diagonal"]


def graph_kernels(
    net: Layer, graph: NodeGraph, hyper: dict[str, Tensor], like: Tensor, track_ntk: bool
) -> tuple[Tensor, Tensor | None]:
    """``(Σ, Θ or None)`` between all nodes of ``graph``, ``(*batch, N, N)`` (``batch`` the hyperparameters')."""
    state = KernelState.of_node_graph(graph, like, track_ntk)
    state = net.kernel_map(state, Hyperparameters(net, hyper))
    cov = state.cov12.squeeze(-3).squeeze(-3)
    ntk = state.ntk_or_zeros().squeeze(-3).squeeze(-3) if track_ntk else None
    check_finite_kernel(cov, ntk)
    return cov, ntk


def node_kernels(
    net: Layer, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], graph: NodeGraph, track_ntk: bool
) -> tuple[Tensor, Tensor | None]:
    """``(Σ(x1, x2), Θ(x1, x2) or None)``, ``(..., n1, n2)``, for node-index rows ``x1`` ``(..., n1, 1)`` and ``x2``."""
    batch = batch_shape_of(x1, x2, hyper)
    rows, cols = graph.indices(x1), graph.indices(x2)
    cov, ntk = graph_kernels(net, graph, hyper, x1, track_ntk)

    def pick(k: Tensor) -> Tensor:
        n = k.shape[-1]
        k = k.expand(*batch, n, n)
        r = rows.expand(*batch, rows.shape[-1])
        c = cols.expand(*batch, cols.shape[-1])
        picked = torch.gather(k, -2, r.unsqueeze(-1).expand(*batch, r.shape[-1], n))
        return torch.gather(picked, -1, c.unsqueeze(-2).expand(*batch, r.shape[-1], c.shape[-1]))

    return pick(cov), (None if ntk is None else pick(ntk))


def node_kernel_diagonal(
    net: Layer, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], graph: NodeGraph, track_ntk: bool
) -> Tensor:
    """The diagonal :math:`k(x_{1,i}, x_{2,i})` ``(..., n)`` of the NNGP (or the NTK with ``track_ntk``)."""
    batch = batch_shape_of(x1, x2, hyper)
    rows, cols = graph.indices(x1), graph.indices(x2)
    cov, ntk = graph_kernels(net, graph, hyper, x1, track_ntk)
    k = ntk if ntk is not None else cov
    n = k.shape[-1]
    flat = (rows * n + cols).expand(*batch, rows.shape[-1])
    return torch.gather(k.expand(*batch, n, n).flatten(-2), -1, flat)
