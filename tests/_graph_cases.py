"""Small random graphs and graph networks shared by the finite-width graph tests.

``tests/empirical/test_monte_carlo_graph.py``, ``tests/empirical/test_empirical_graph.py`` and
``tests/posterior/test_graph_ensemble.py`` draw their graphs here (seeded, float64):

* :func:`graphs`: undirected random graphs of given sizes with Gaussian node features, as
  ``(features (n_g, C), adjacency (n_g, n_g))`` with a 0/1 adjacency without self loops;
* :func:`node_graph`: one random undirected graph with Gaussian node features as a
  :class:`gpntk.NodeGraph` (symmetric normalisation with self loops by default);
* the architectures: :func:`gcn_mean` (graph-level GCN with biases and masked average pooling)
  and :func:`gcn_node` (node-level two-layer GCN).
"""

from __future__ import annotations

import torch

import gpntk
from gpntk import layers as L

DTYPE = torch.float64
SIZES = (4, 6, 8, 5)  # the Monte Carlo graphs: 6, 8, 22 and 6 directed edges with seed 0
CHANNELS = 3
NODES, NODE_CHANNELS = 15, 4  # the node-level graph: 38 directed edges with seed 0


def random_adjacency(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    """A symmetric 0/1 adjacency without self loops: each pair of nodes joined with probability ``p``."""
    a = torch.triu((torch.rand(n, n, generator=g) < p).to(DTYPE), 1)
    return a + a.T


def graphs(sizes: tuple[int, ...] = SIZES, seed: int = 0, p: float = 0.35) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Undirected random graphs of ``sizes`` nodes, ``CHANNELS`` Gaussian features per node."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, CHANNELS, generator=g, dtype=DTYPE), random_adjacency(n, p, g)) for n in sizes]


def plus_identity(a: torch.Tensor) -> torch.Tensor:
    """:math:`A + I`, the "sum" aggregation of Du et al. (2019)."""
    return a + torch.eye(a.shape[0], dtype=a.dtype)


def row_normalised(a: torch.Tensor) -> torch.Tensor:
    r""":math:`D^{-1}(A + I)`, the mean over a node and its neighbours (not symmetric)."""
    return gpntk.normalized_adjacency(a, "row", self_loops=True)


def graph_rows(
    graph_list: list[tuple[torch.Tensor, torch.Tensor]], adjacency_of, nodes: int | None = None,
    mask_padding: bool = True,
) -> tuple[gpntk.GraphInputs, torch.Tensor]:
    """The graphs with adjacencies ``adjacency_of(A)`` as padded rows (``GraphInputs.from_graphs``).

    ``mask_padding=False`` marks the padding nodes as real (isolated) nodes, as a pooling that
    counted them would see them.
    """
    fmt, x = gpntk.GraphInputs.from_graphs([(f, adjacency_of(a)) for f, a in graph_list], nodes=nodes)
    if not mask_padding:
        x = x.clone()
        x[:, -fmt.nodes :] = 1.0
    return fmt, x


def node_graph(
    normalization: str | None = "symmetric", self_loops: bool = True, nodes: int = NODES, seed: int = 0,
    p: float = 0.2,
) -> gpntk.NodeGraph:
    """One random undirected graph of ``nodes`` nodes, ``NODE_CHANNELS`` Gaussian features per node."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(nodes, NODE_CHANNELS, generator=g, dtype=DTYPE)
    edges = random_adjacency(nodes, p, g).nonzero().T
    return gpntk.NodeGraph.from_edges(features, edges, normalization=normalization, self_loops=self_loops)


def node_indices(nodes: int = NODES) -> torch.Tensor:
    """All node indices as kernel inputs ``(nodes, 1)``."""
    return torch.arange(nodes, dtype=DTYPE)[:, None]


def gcn_mean(weight_variance: float = 2.0, bias_variance: float = 0.1) -> L.Layer:
    """Graph-level GCN: two (Aggregate, Dense, ReLU) layers, the mean over the real nodes, a Dense readout."""
    return L.serial(
        L.Aggregate(), L.Dense(weight_variance, bias_variance), L.ReLU(),
        L.Aggregate(), L.Dense(weight_variance, bias_variance), L.ReLU(),
        L.GlobalAvgPool(), L.Dense(weight_variance, bias_variance),
    )


def gcn_node(weight_variance: float = 2.0, bias_variance: float = 0.1, trainable_hidden: bool = True) -> L.Layer:
    """Node-level two-layer GCN (Kipf & Welling 2017): ``Aggregate, Dense, ReLU, Aggregate, Dense``.

    ``trainable_hidden=False`` freezes the hidden ``Dense`` (readout-only training).
    """
    return L.serial(
        L.Aggregate(), L.Dense(weight_variance, bias_variance, trainable=trainable_hidden), L.ReLU(),
        L.Aggregate(), L.Dense(weight_variance, bias_variance),
    )
