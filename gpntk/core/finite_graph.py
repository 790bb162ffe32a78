r"""Finite-width graph networks: message passing and the two graph input formats as torch modules.

A finite graph network runs the layers' modules on node features ``(n, C, N)`` (channels first,
nodes as positions). The modules that need the graph (:class:`AggregateNodes`, and pooling that
skips padding nodes) read it from a :class:`GraphBinding` that the network's wrapper
(:class:`PaddedGraphNetwork` or :class:`NodeGraphNetwork`) fills for the duration of one forward
pass, so the other layers' modules are the same as for grids and sequences.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .graph_inputs import GraphDataset, GraphInputs, NodeGraph

__all__ = [
    "GraphBinding", "AggregateNodes", "PaddedGraphNetwork", "NodeGraphNetwork", "GraphDatasetNetwork", "bind_graph",
]


class GraphBinding:
    """The graph of the forward pass under way: ``adjacency`` (dense ``(n, N, N)``, sparse ``(N, N)``), ``mask``."""

    def __init__(self) -> None:
        self.adjacency: Tensor | None = None
        self.mask: Tensor | None = None

    def require(self, who: str) -> Tensor:
        if self.adjacency is None:
            raise RuntimeError(f"{who} needs a graph: call the whole network (its first module unpacks the graphs)")
        return self.adjacency


class AggregateNodes(nn.Module):
    r"""Message passing :math:`h'_{c,u} = \sum_v A_{uv} h_{c,v}` on ``(n, C, N)`` node features."""

    def __init__(self) -> None:
        super().__init__()
        self.graph_binding: GraphBinding | None = None

    def forward(self, h: Tensor) -> Tensor:
        binding = self.graph_binding
        if binding is None:
            raise RuntimeError("AggregateNodes is used outside a graph network")
        a = binding.require("Aggregate")
        if a.layout == torch.sparse_coo:  # one graph, h (1, C, N): a sum over its edges (differentiable under vmap)
            (receivers, senders), weights = a.indices(), a.values().to(h)
            messages = h.index_select(-1, senders) * weights
            return torch.zeros_like(h).index_add(-1, receivers, messages)
        return h @ a.to(h).transpose(-1, -2)


def _graph_modules(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if hasattr(m, "graph_binding"))


def bind_graph(module: nn.Module, binding: GraphBinding) -> None:
    """Give every graph-aware submodule of ``module`` (those with a ``graph_binding`` slot) ``binding``."""
    for m in _graph_modules(module):
        m.graph_binding = binding  # type: ignore[assignment]  # a plain attribute, not a submodule


class PaddedGraphNetwork(nn.Module):
    """Rows ``(n, row_features)`` of padded graphs (:class:`GraphInputs`) through the graph network ``body``."""

    def __init__(self, fmt: GraphInputs, body: nn.Module):
        super().__init__()
        self.format = fmt
        self.body = body
        self.binding = GraphBinding()
        bind_graph(body, self.binding)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(self.format, x)

    def run(self, fmt: GraphInputs, x: Tensor) -> Tensor:
        """The network on rows ``x`` of padded graphs of format ``fmt``."""
        graphs = fmt.unpack(x)
        self.binding.adjacency, self.binding.mask = graphs.adjacency, graphs.mask
        try:
            return self.body(graphs.features.transpose(-1, -2))  # (n, C, N)
        finally:
            self.binding.adjacency = self.binding.mask = None

    def extra_repr(self) -> str:
        return repr(self.format)


class NodeGraphNetwork(nn.Module):
    """A graph network on one :class:`NodeGraph`: node indices ``(n, 1)`` to those nodes' outputs ``(n, out)``.

    Every call runs the network on the whole graph (a node's output depends on its neighbourhood)
    and returns the rows of the requested nodes.
    """

    def __init__(self, graph: NodeGraph, body: nn.Module):
        super().__init__()
        self.graph = graph
        self.body = body
        self.binding = GraphBinding()
        bind_graph(body, self.binding)

    def forward(self, x: Tensor) -> Tensor:
        index = self.graph.indices(x)
        features = self.graph.features.to(x if x.is_floating_point() else self.graph.features)
        self.binding.adjacency = self.graph.adjacency
        try:
            out = self.body(features.transpose(0, 1).unsqueeze(0))  # (1, out, N)
        finally:
            self.binding.adjacency = None
        return out[0].transpose(0, 1)[index]

    def extra_repr(self) -> str:
        return repr(self.graph)


class GraphDatasetNetwork(PaddedGraphNetwork):
    """A graph network on a :class:`GraphDataset`: graph indices ``(n, 1)`` to those graphs' outputs.

    The requested graphs are padded to the largest of them (padding changes no output) and run as
    rows of padded graphs.
    """

    def __init__(self, dataset: GraphDataset, body: nn.Module):
        super().__init__(GraphInputs(dataset.nodes, dataset.channels), body)
        self.dataset = dataset

    def forward(self, x: Tensor) -> Tensor:
        index = self.dataset.indices(x)
        nodes = int(self.dataset.sizes[index.cpu()].max())
        fmt, rows = self.dataset.rows(index, nodes, x if x.is_floating_point() else self.dataset.graphs[0][0])
        return self.run(fmt, rows)

    def extra_repr(self) -> str:
        return repr(self.dataset)
