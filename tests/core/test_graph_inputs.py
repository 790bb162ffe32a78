"""The graph input formats (``GraphInputs``, ``NodeGraph``) and ``normalized_adjacency``.

Layouts and normalisations are checked against dense formulas written here in NumPy: a row of
``GraphInputs`` is ``[features (N, C) node-major, adjacency (N, N) row-major, mask (N,)]``; an edge
``k`` of ``NodeGraph.from_edges`` goes from ``edges[0, k]`` to ``edges[1, k]``, so it is the entry
``A[edges[1, k], edges[0, k]]`` (row = receiver); the normalisations are ``D⁻¹A``, ``D^{-1/2}AD^{-1/2}``
(degrees = row sums) and ``A C⁻¹`` (C = column sums), with zero rows (columns) left zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gpntk
from gpntk import layers as L

DTYPE = torch.float64


def random_graphs(sizes, channels=3, seed=0):
    """Graphs with Gaussian features and weighted directed adjacencies (about half the entries nonzero)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, channels)), rng.uniform(0.2, 1.5, (n, n)) * (rng.random((n, n)) < 0.5))
        for n in sizes
    ]


# --------------------------------------------------------------------------------------------
# GraphInputs
# --------------------------------------------------------------------------------------------
def test_pack_layout_and_unpack_round_trip():
    n_graphs, nodes, channels = 4, 5, 3
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, n_graphs, nodes, channels, generator=g, dtype=DTYPE)  # a batch of 2 sets
    adjacency = torch.rand(2, n_graphs, nodes, nodes, generator=g, dtype=DTYPE)
    mask = torch.ones(2, n_graphs, nodes, dtype=DTYPE)
    mask[..., 3:] = 0  # the last two nodes are padding: no features, no edges
    features = features * mask[..., None]
    adjacency = adjacency * mask[..., None] * mask[..., None, :]
    fmt = gpntk.GraphInputs(nodes=nodes, channels=channels)
    x = fmt.pack(features, adjacency, mask)
    assert x.shape == (2, n_graphs, fmt.row_features) and fmt.row_features == nodes * channels + nodes**2 + nodes
    assert x.dtype == DTYPE
    # the documented layout, entry by entry
    u, c, v = 2, 1, 4
    assert x[1, 3, u * channels + c] == features[1, 3, u, c]
    assert x[1, 3, nodes * channels + u * nodes + v] == adjacency[1, 3, u, v]
    assert x[1, 3, nodes * channels + nodes**2 + u] == mask[1, 3, u]
    back = fmt.unpack(x)
    torch.testing.assert_close(back.features, features, rtol=0, atol=0)
    torch.testing.assert_close(back.adjacency, adjacency, rtol=0, atol=0)
    torch.testing.assert_close(back.mask, mask, rtol=0, atol=0)
    assert fmt.spatial == (nodes,)


def test_pack_default_mask_is_all_real_and_integers_become_float64():
    fmt = gpntk.GraphInputs(nodes=3, channels=2)
    x = fmt.pack(np.ones((1, 3, 2), dtype=np.int64), np.eye(3, dtype=np.int64)[None])
    assert x.dtype == torch.float64
    assert torch.equal(fmt.unpack(x).mask, torch.ones(1, 3, dtype=DTYPE))


def test_from_graphs_pads_with_masked_nodes():
    graphs = random_graphs([3, 5, 2])
    graphs[1] = (graphs[1][0], torch.as_tensor(graphs[1][1]).to_sparse())  # a sparse adjacency is accepted
    fmt, x = gpntk.GraphInputs.from_graphs(graphs, nodes=7)
    assert (fmt.nodes, fmt.channels) == (7, 3) and x.shape == (3, fmt.row_features) and x.dtype == DTYPE
    f, a, m = fmt.unpack(x)
    for g, (features, adjacency) in enumerate(graphs):
        k = features.shape[0]
        dense = adjacency.to_dense().numpy() if torch.is_tensor(adjacency) else adjacency
        np.testing.assert_array_equal(f[g, :k].numpy(), features)
        np.testing.assert_array_equal(a[g, :k, :k].numpy(), dense)
        assert torch.equal(m[g], (torch.arange(7) < k).to(DTYPE))
        assert not f[g, k:].any() and not a[g, k:].any() and not a[g, :, k:].any()
    # default: padded to the largest graph; dtype as asked
    fmt, x = gpntk.GraphInputs.from_graphs(graphs, dtype=torch.float32)
    assert fmt.nodes == 5 and x.dtype == torch.float32


def test_from_graphs_errors():
    graphs = random_graphs([3, 5])
    with pytest.raises(ValueError, match="smaller than the largest graph"):
        gpntk.GraphInputs.from_graphs(graphs, nodes=4)
    with pytest.raises(ValueError, match="one C"):
        gpntk.GraphInputs.from_graphs([graphs[0], (np.ones((5, 2)), graphs[1][1])])
    with pytest.raises(ValueError, match="one C"):  # features not (n_g, C)
        gpntk.GraphInputs.from_graphs([(np.ones(3), np.eye(3))])
    with pytest.raises(ValueError, match=r"graph 1 has 5 nodes but an adjacency of shape \(4, 4\)"):
        gpntk.GraphInputs.from_graphs([graphs[0], (graphs[1][0], np.eye(4))])
    with pytest.raises(ValueError, match="at least one graph"):
        gpntk.GraphInputs.from_graphs([])
    with pytest.raises(ValueError, match="nodes"):
        gpntk.GraphInputs(nodes=0, channels=2)
    with pytest.raises(ValueError, match="channels"):
        gpntk.GraphInputs(nodes=2, channels=0)


def padded(nodes=4, channels=2):
    """One graph of ``nodes`` nodes whose last node is padding: features, adjacency, mask (batch of one)."""
    features = torch.ones(1, nodes, channels, dtype=DTYPE)
    adjacency = torch.ones(1, nodes, nodes, dtype=DTYPE)
    mask = torch.ones(1, nodes, dtype=DTYPE)
    features[:, -1] = 0
    adjacency[:, -1], adjacency[:, :, -1] = 0, 0
    mask[:, -1] = 0
    return features, adjacency, mask


def test_pack_errors():
    fmt = gpntk.GraphInputs(nodes=4, channels=2)
    features, adjacency, mask = padded()
    fmt.pack(features, adjacency, mask)  # valid as built
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        fmt.pack(features, adjacency, mask * 0.5)
    bad = features.clone()
    bad[0, -1, 1] = 0.3
    with pytest.raises(ValueError, match="padding nodes \\(mask 0\\) must have zero features"):
        fmt.pack(bad, adjacency, mask)
    for receives in (True, False):  # an edge into the padding node, or out of it
        bad = adjacency.clone()
        if receives:
            bad[0, -1, 0] = 1.0
        else:
            bad[0, 0, -1] = -1.0
        with pytest.raises(ValueError, match="padding nodes \\(mask 0\\) must have no edges"):
            fmt.pack(features, bad, mask)
    with pytest.raises(ValueError, match=r"features of shape \(\.\.\., n, 4, 2\)"):
        fmt.pack(features[..., :1], adjacency, mask)
    with pytest.raises(ValueError, match="adjacency of shape"):
        fmt.pack(features, adjacency[..., :3], mask)
    with pytest.raises(ValueError, match="mask of shape"):
        fmt.pack(features, adjacency, mask[..., :3])


def test_check_rows_errors_and_kernels_refuse_bad_rows():
    fmt = gpntk.GraphInputs(nodes=4, channels=2)
    x = fmt.pack(*padded())
    with pytest.raises(ValueError, match=r"needs 28 numbers per row \(4·2 features, 4² adjacency, 4 mask\), got 27"):
        fmt.check_rows("x", x[:, :-1])
    net = L.serial(L.Aggregate(), L.Dense(1.0, 0.1), L.ReLU(), L.GlobalSumPool(), L.Dense(1.0))
    kernel = gpntk.NNGPKernel(net, input_shape=fmt)
    with pytest.raises(ValueError, match="numbers per row"):
        kernel(x[:, :-1]).to_dense()
    bad = x.clone()
    bad[0, -1] = 0.5  # the last mask entry
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        kernel(x, bad).to_dense()
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kernel(nan).to_dense()


# --------------------------------------------------------------------------------------------
# NodeGraph
# --------------------------------------------------------------------------------------------
def test_node_graph_keeps_a_coalesced_sparse_adjacency():
    a = np.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.5, 0.0, 3.0]])
    graph = gpntk.NodeGraph(np.ones((3, 2)), a)
    assert graph.adjacency.layout == torch.sparse_coo and graph.adjacency.is_coalesced()
    np.testing.assert_array_equal(graph.adjacency.to_dense().numpy(), a)
    assert (graph.nodes, graph.channels, graph.spatial, graph.row_features) == (3, 2, (3,), 1)
    assert graph.features.dtype == DTYPE and graph.adjacency.dtype == DTYPE
    sparse = gpntk.NodeGraph(torch.ones(3, 2, dtype=DTYPE), torch.as_tensor(a).to_sparse())
    assert torch.equal(sparse.adjacency.to_dense(), graph.adjacency.to_dense())
    # indices of any numeric dtype
    assert torch.equal(graph.indices(torch.tensor([[2.0], [0.0]])), torch.tensor([2, 0]))
    assert torch.equal(graph.indices(torch.tensor([[1], [1]])), torch.tensor([1, 1]))


def test_node_graph_errors():
    with pytest.raises(ValueError, match=r"must be \(N, C\)"):
        gpntk.NodeGraph(np.ones(3), np.eye(3))
    with pytest.raises(ValueError, match=r"must be \(N, C\)"):
        gpntk.NodeGraph(np.ones((0, 2)), np.eye(0))
    with pytest.raises(ValueError, match=r"adjacency must be \(3, 3\)"):
        gpntk.NodeGraph(np.ones((3, 2)), np.eye(4))
    nan = np.ones((3, 2))
    nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="features contain NaN"):
        gpntk.NodeGraph(nan, np.eye(3))
    inf = np.eye(3)
    inf[0, 2] = np.inf
    with pytest.raises(ValueError, match="adjacency contains NaN"):
        gpntk.NodeGraph(np.ones((3, 2)), inf)


def test_node_indices_are_checked():
    graph = gpntk.NodeGraph(np.ones((4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="whole numbers"):
        graph.indices(torch.tensor([[0.5]], dtype=DTYPE))
    for index in (4.0, -1.0):
        with pytest.raises(ValueError, match=r"in \[0, 4\)"):
            graph.indices(torch.tensor([[0.0], [index]], dtype=DTYPE))
    with pytest.raises(ValueError, match=r"rows of shape \(\.\.\., n, 1\)"):
        graph.indices(torch.zeros(3, 2, dtype=DTYPE))
    kernel = gpntk.NTKKernel(L.serial(L.Aggregate(), L.Dense(1.0, 0.1)), input_shape=graph)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        kernel(torch.tensor([[0.0], [4.0]], dtype=DTYPE)).to_dense()
    with pytest.raises(ValueError, match="whole numbers"):
        kernel(torch.tensor([[0.0]], dtype=DTYPE), torch.tensor([[1.25]], dtype=DTYPE)).to_dense()
    with pytest.raises(ValueError, match="NaN"):
        kernel(torch.tensor([[float("nan")]], dtype=DTYPE)).to_dense()


def test_from_edges_direction_weights_and_repeats():
    features = np.arange(8.0).reshape(4, 2)
    # edges 0→1 (weight 2), 2→1, 3→0, and 0→1 again (weight 0.5: repeated edges add)
    edges = np.array([[0, 2, 3, 0], [1, 1, 0, 1]])
    weights = np.array([2.0, 1.0, 4.0, 0.5])
    graph = gpntk.NodeGraph.from_edges(features, edges, weights=weights)
    expected = np.zeros((4, 4))
    for (sender, receiver), w in zip(edges.T, weights):
        expected[receiver, sender] += w  # row = the receiver
    assert expected[1, 0] == 2.5
    np.testing.assert_array_equal(graph.adjacency.to_dense().numpy(), expected)
    # default weight one; message passing h'_u = Σ_v A[u, v] h_v sends node 0's features to node 1
    unit = gpntk.NodeGraph.from_edges(features, torch.tensor([[0], [1]]))
    a = unit.adjacency.to_dense()
    assert a[1, 0] == 1 and a.sum() == 1
    np.testing.assert_array_equal((a @ unit.features).numpy()[1], features[0])
    # no edges at all
    empty = gpntk.NodeGraph.from_edges(features, np.zeros((2, 0), dtype=np.int64))
    assert empty.adjacency._nnz() == 0


def test_from_edges_normalization_matches_the_dense_adjacency():
    graphs = random_graphs([6], seed=3)
    features, a = graphs[0]
    a[4] = 0  # node 4 receives nothing (zero row)
    edges = np.stack(np.nonzero(a.T))  # (senders, receivers) = transpose's (rows, columns)
    weights = a.T[edges[0], edges[1]]
    for normalization in (None, "row", "symmetric", "column"):
        for loops in (False, True):
            graph = gpntk.NodeGraph.from_edges(features, edges, weights=weights, normalization=normalization,
                                               self_loops=loops)
            expected = dense_normalized(a, normalization, loops)
            np.testing.assert_allclose(graph.adjacency.to_dense().numpy(), expected, rtol=1e-15, atol=0)


def test_from_edges_errors():
    features = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2, E\)"):
        gpntk.NodeGraph.from_edges(features, np.array([[0.0], [1.0]]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2, E\)"):
        gpntk.NodeGraph.from_edges(features, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        gpntk.NodeGraph.from_edges(features, np.array([[0], [3]]))
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        gpntk.NodeGraph.from_edges(features, np.array([[-1], [0]]))
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        gpntk.NodeGraph.from_edges(features, np.array([[0, 1], [1, 2]]), weights=np.ones(3))
    with pytest.raises(ValueError, match="normalization must be one of"):
        gpntk.NodeGraph.from_edges(features, np.array([[0], [1]]), normalization="mean")


# --------------------------------------------------------------------------------------------
# normalized_adjacency
# --------------------------------------------------------------------------------------------
def dense_normalized(a: np.ndarray, normalization: str | None, self_loops: bool) -> np.ndarray:
    """The normalisation from its formula: D⁻¹A, D^{-1/2}AD^{-1/2} (D: row sums), A C⁻¹ (C: column sums); 1/0 → 0."""
    a = a + np.eye(len(a)) if self_loops else a.copy()
    rows, cols = a.sum(1), a.sum(0)

    def inv(d, p):
        out = np.zeros_like(d)
        out[d > 0] = d[d > 0] ** -p
        return out

    if normalization is None:
        return a
    if normalization == "row":
        return np.diag(inv(rows, 1)) @ a
    if normalization == "symmetric":
        return np.diag(inv(rows, 0.5)) @ a @ np.diag(inv(rows, 0.5))
    return a @ np.diag(inv(cols, 1))


def directed_with_empty_nodes() -> np.ndarray:
    """A weighted directed 7-node adjacency; node 2 receives nothing (zero row), node 5 sends nothing (zero column)."""
    rng = np.random.default_rng(7)
    a = rng.uniform(0.1, 2.0, (7, 7)) * (rng.random((7, 7)) < 0.45)
    a[2], a[:, 5] = 0, 0
    a[0, 1] = 1.0  # at least one edge in row 0
    return a


@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("normalization", [None, "row", "symmetric", "column"])
def test_normalized_adjacency_dense_and_sparse_match_the_formulas(normalization, self_loops):
    a = directed_with_empty_nodes()
    expected = dense_normalized(a, normalization, self_loops)
    dense = gpntk.normalized_adjacency(torch.as_tensor(a), normalization, self_loops=self_loops)
    sparse = gpntk.normalized_adjacency(torch.as_tensor(a).to_sparse(), normalization, self_loops=self_loops)
    assert dense.layout == torch.strided and sparse.layout == torch.sparse_coo
    assert torch.isfinite(dense).all() and torch.isfinite(sparse.to_dense()).all()
    # one division and at most two multiplications per entry: a few ulps
    np.testing.assert_allclose(dense.numpy(), expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(sparse.to_dense().numpy(), expected, rtol=1e-15, atol=0)
    if not self_loops and normalization in ("row", "symmetric"):
        assert not dense[2].any() and not sparse.to_dense()[2].any()  # zero degree: a zero row, no NaN
    if not self_loops and normalization == "column":
        assert not dense[:, 5].any()  # an empty column stays empty
    if normalization == "row":  # rows of receiving nodes are means
        sums = dense.sum(1)
        torch.testing.assert_close(sums[sums != 0], torch.ones_like(sums[sums != 0]))
    if normalization == "column":
        sums = dense.sum(0)
        torch.testing.assert_close(sums[sums != 0], torch.ones_like(sums[sums != 0]))


def test_normalized_adjacency_symmetric_of_an_undirected_graph_is_symmetric():
    a = directed_with_empty_nodes()
    a = a + a.T
    s = gpntk.normalized_adjacency(torch.as_tensor(a), "symmetric", self_loops=True)
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)
    d = a.sum(1) + 1
    np.testing.assert_allclose(s.numpy(), (a + np.eye(7)) / np.sqrt(np.outer(d, d)), rtol=1e-15, atol=0)


def test_normalized_adjacency_errors():
    with pytest.raises(ValueError, match="normalization must be one of"):
        gpntk.normalized_adjacency(torch.eye(3), "sym")
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        gpntk.normalized_adjacency(torch.ones(3, 4), "row")
    with pytest.raises(ValueError, match=r"square \(N, N\)"):
        gpntk.normalized_adjacency(torch.ones(2, 3, 3), "row")
