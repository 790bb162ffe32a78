"""benchmarks/node_classification.py: its GCN kernels against dense recursions and finite networks, the Cora-40
reference rebuilt from the raw Cora data, the classifier, the subgraphs and a quick run of the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

import gpntk
from gpntk import layers as L
from gpntk.errors import ArchitectureError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"
PLANETOID = ROOT.parent / "shared" / "data" / "graphs" / "planetoid"  # benchmark data next to the repository
needs_planetoid = pytest.mark.skipif(not PLANETOID.is_dir(), reason=f"no Planetoid data at {PLANETOID}")

# Tolerances. The NNGP recursion below is evaluated in float64 with other roundings than gpntk's:
# a few ulps per layer, 1e-13 relative to the largest entry. The NTK needs the ReLU derivative
# Ė = (π − θ)/2π with θ = arccos(u): at a diagonal entry u is 1 up to one rounding δ ≈ 1e-16, and
# arccos(1 − δ) ≈ √(2δ) ≈ 1.5e-8, so this reference's Ė is off by up to 2.4e-9 per ReLU there
# (gpntk treats coincident pairs exactly); over three ReLUs, 1e-8 relative to the largest entry.
NNGP_RTOL = 1e-13
NTK_RTOL = 1e-8


bench = load_benchmark("node_classification.py", "node_classification")


# --- independent dense recursions ----------------------------------------------------------------
def relu_expectations(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[φ(u)φ(v)] and E[φ'(u)φ'(v)] for φ = ReLU, (u, v) ~ N(0, Σ) per pair (Cho & Saul 2009, degree 1 and 0)."""
    d = np.sqrt(np.diag(sigma))
    q = np.outer(d, d)
    u = np.clip(sigma / np.where(q > 0, q, 1.0), -1.0, 1.0)
    theta = np.arccos(u)
    return q * (np.sin(theta) + (np.pi - theta) * u) / (2 * np.pi), (np.pi - theta) / (2 * np.pi)


def dense_gcn(s: np.ndarray, x: np.ndarray, depth: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Σ, Θ) of the plain GCN and of its jumping-knowledge sum, from the recursion of docs/node-classification.md.

    Σ_1 = Θ_1 = S (XXᵀ/C) Sᵀ; Σ_{l+1} = 2 S E_l Sᵀ, Θ_{l+1} = Σ_{l+1} + 2 S (Ė_l ⊙ Θ_l) Sᵀ; the JK kernels
    are the sums of (Σ_{l+1}, Θ_{l+1}) over l = 1..depth.
    """
    sigma = s @ (x @ x.T / x.shape[1]) @ s.T
    theta = sigma.copy()
    jk_sigma, jk_theta = np.zeros_like(sigma), np.zeros_like(sigma)
    for _ in range(depth):
        e, e_dot = relu_expectations(sigma)
        sigma, theta = 2 * s @ e @ s.T, 2 * s @ e @ s.T + 2 * s @ (e_dot * theta) @ s.T
        jk_sigma, jk_theta = jk_sigma + sigma, jk_theta + theta
    return {"none": (sigma, theta), "jk": (jk_sigma, jk_theta)}


def dense_skip_pc(s: np.ndarray, x: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(Σ, Θ) of Skip-PC: Σ_0 = XXᵀ/C (H_0 frozen), Σ_1 = Θ_1 = S Σ_0 Sᵀ, Σ_{l+1} = S (2 E_l + Σ_0) Sᵀ,
    Θ_{l+1} = Σ_{l+1} + 2 S (Ė_l ⊙ Θ_l) Sᵀ."""
    sigma0 = x @ x.T / x.shape[1]
    sigma = s @ sigma0 @ s.T
    theta = sigma.copy()
    for _ in range(depth):
        e, e_dot = relu_expectations(sigma)
        sigma = s @ (2 * e + sigma0) @ s.T
        theta = sigma + 2 * s @ (e_dot * theta) @ s.T
    return sigma, theta


def assert_kernels(actual: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray],
                   nngp_rtol: float = NNGP_RTOL, ntk_rtol: float = NTK_RTOL) -> None:
    for got, want, rtol in zip(actual, expected, (nngp_rtol, ntk_rtol)):
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())


@pytest.fixture(scope="module")
def toy():
    """A 14-node random undirected graph with one isolated node (a zero row of S) and 6 Gaussian features."""
    rng = np.random.default_rng(3)
    n = 14
    a = np.triu((rng.random((n, n)) < 0.3).astype(float), 1)
    a = a + a.T
    a[13, :] = a[:, 13] = 0.0
    return np.array(np.nonzero(a)), rng.normal(size=(n, 6))


@pytest.mark.parametrize("normalization", bench.NORMALIZATIONS)
def test_gcn_and_jumping_knowledge_match_the_dense_recursion(toy, normalization):
    edges, x = toy
    graph = gpntk.NodeGraph.from_edges(x, edges, normalization=normalization)
    s = graph.adjacency.to_dense().numpy()
    assert np.all(s[13] == 0)  # the isolated node receives nothing
    for depth in (1, 2, 3):
        expected = dense_gcn(s, x, depth)
        for skip in ("none", "jk"):
            assert_kernels(bench.graph_kernels(bench.NETWORKS[skip](depth), graph), expected[skip])


@pytest.mark.parametrize("normalization", bench.NORMALIZATIONS)
def test_skip_pc_matches_the_dense_recursion(toy, normalization):
    """Depths 1-3: from depth 2 on, an Aggregate follows the FanInSum that adds S H_0 W' (the merged branches are
    still graph nodes)."""
    edges, x = toy
    graph = gpntk.NodeGraph.from_edges(x, edges, normalization=normalization)
    s = graph.adjacency.to_dense().numpy()
    for depth in (1, 2, 3):
        expected = dense_skip_pc(s, x, depth)
        assert_kernels(bench.graph_kernels(bench.skip_pc(depth), graph), expected)
    # not a near-miss: the input term S Σ_0 Sᵀ of every layer matters (the plain GCN is far from Skip-PC)
    plain, skip = dense_gcn(s, x, 3)["none"][0], dense_skip_pc(s, x, 3)[0]
    assert np.abs(plain - skip).max() > 0.05 * np.abs(skip).max()


def tied_skip_pc_ntk(s: torch.Tensor, x: torch.Tensor, width: int, generator: torch.Generator) -> np.ndarray:
    """The empirical NTK of one random network f = S(√2 φ(S H_0 W_1/√h) + H_0) W_2/√h, H_0 = X W_0/√C (W_0 frozen).

    Skip-PC as Sabanayagam et al. write it, with one W_2 for both summands; the gradients with respect
    to W_1 and W_2 written out: Θ = S M Sᵀ + z zᵀ with P = S H_0/√h, g = P W_1, z = S(√2 φ(g) + H_0)/√h
    and M = 2 (P Pᵀ) ⊙ (φ'(g) diag(W_2²) φ'(g)ᵀ)/h.
    """
    w0 = torch.randn(x.shape[1], width, generator=generator, dtype=torch.float64)
    w1 = torch.randn(width, width, generator=generator, dtype=torch.float64)
    w2 = torch.randn(width, generator=generator, dtype=torch.float64)
    h0 = x @ w0 / math.sqrt(x.shape[1])
    p = s @ h0 / math.sqrt(width)
    g = p @ w1
    z = s @ (math.sqrt(2.0) * torch.relu(g) + h0) / math.sqrt(width)
    d = (g > 0).double()
    m = 2.0 * (p @ p.T) * ((d * w2**2) @ d.T) / width
    return (s @ m @ s.T + z @ z.T).numpy()


def test_skip_pc_untied_is_the_limit_of_the_tied_network(toy):
    """Monte Carlo of the tied network (:func:`tied_skip_pc_ntk`) against the NTK of gpntk's untied skip_pc(1).

    The mean over initialisations tends to the infinite-width NTK with a bias of order 1/h. Its
    standard error is estimated from the means of 8 batches of 6 networks (batch means: robust to the
    heavy tails of single draws, which make the naive per-draw estimate too small).
    """
    edges, x = toy
    graph = gpntk.NodeGraph.from_edges(x, edges, normalization="row")
    s, xs = torch.from_numpy(graph.adjacency.to_dense().numpy()), torch.from_numpy(x)
    width, batches, per_batch = 1024, 8, 6
    generator = torch.Generator().manual_seed(0)
    means = np.stack([np.mean([tied_skip_pc_ntk(s, xs, width, generator) for _ in range(per_batch)], axis=0)
                      for _ in range(batches)])
    mean, se = means.mean(0), means.std(0, ddof=1) / math.sqrt(batches)
    _, ntk = bench.graph_kernels(bench.skip_pc(1), graph)
    scale = np.abs(ntk).max()
    # 5 standard errors (t with 7 degrees of freedom: a two-sided tail of 0.2 % per entry) plus a finite-width
    # bias of a few 1/h of the scale
    assert np.all(np.abs(mean - ntk) <= 5 * se + 4.0 / width * scale), np.max(np.abs(mean - ntk) / scale)
    # not a near-miss: the plain GCN's NTK (without the skip term S Σ_0 Sᵀ) is far outside that band
    _, plain = bench.graph_kernels(bench.gcn(1), graph)
    assert np.max(np.abs(mean - plain) - 5 * se) > 0.05 * scale


def test_tied_skip_pc_is_refused_or_equal_to_the_untied_form(toy):
    """gpntk cannot tell that √2 φ(g) and H_0 are uncorrelated and refuses their sum; should it accept it one day,
    the kernels must be those of the untied form."""
    edges, x = toy
    graph = gpntk.NodeGraph.from_edges(x, edges, normalization="row")
    for depth in (1, 2):
        try:
            tied = bench.skip_pc_tied(depth)
        except ArchitectureError as error:
            assert "FanInSum" in str(error)
            continue
        assert_kernels(bench.graph_kernels(tied, graph), bench.graph_kernels(bench.skip_pc(depth), graph))


def test_kernel_regression_is_the_trained_ensemble_mean_at_infinite_time(toy):
    edges, x = toy
    graph = gpntk.NodeGraph.from_edges(x, edges, normalization="symmetric")
    labels = np.arange(14) % 3
    train, test = np.arange(0, 14, 2), np.arange(1, 14, 2)
    net = bench.gcn(2)
    _, ntk = bench.graph_kernels(net, graph)
    ridge = 1e-3
    scores = bench.kernel_regression_scores(ntk, train, bench.one_hot(labels[train], 3), ridge)
    nodes = bench.node_indices(14)
    post = gpntk.TrainedEnsemble(net, nodes[train], torch.from_numpy(bench.one_hot(labels[train], 3)),
                                 diag_reg=ridge * ntk.max(), input_shape=graph)
    with torch.no_grad():
        mean = post.mean(nodes[test], math.inf).numpy()
    np.testing.assert_allclose(scores[test], mean, rtol=1e-9, atol=1e-12)
    assert bench.accuracy(scores, labels, test) == np.mean(mean.argmax(1) == labels[test])


def test_subgraph_relabels_nodes_edges_and_split():
    data = bench.NodeData("toy", np.arange(12.0).reshape(6, 2), np.array([[0, 1, 1, 2, 4, 5], [1, 0, 2, 1, 5, 4]]),
                          np.array([0, 1, 0, 1, 0, 1]), np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))
    small = bench.subgraph(data, np.array([2, 1, 5]))
    np.testing.assert_array_equal(small.features, data.features[[2, 1, 5]])
    assert sorted(map(tuple, small.edges.T.tolist())) == [(0, 1), (1, 0)]  # only the edge 1-2 survives
    np.testing.assert_array_equal(small.labels, [0, 1, 1])
    assert small.train_index.tolist() == [1] and small.val_index.tolist() == [0] and small.test_index.tolist() == [2]
    with pytest.raises(ValueError, match="distinct"):
        bench.subgraph(data, np.array([1, 1]))


# --- the real data -------------------------------------------------------------------------------
@needs_planetoid
@pytest.mark.parametrize("case, normalization, self_loops", [("rownorm", "row", False), ("sym", "symmetric", True)])
def test_cora40_reference_rebuilt_from_the_raw_data(case, normalization, self_loops):
    """The 40-node Cora neighbourhood of tests/reference (kernels from Neural Tangents): its adjacency is rebuilt
    from the raw edge list with the spec's nodes and NodeGraph.from_edges, and the kernels match."""
    with np.load(REFERENCE / f"a2_node_cora40_{case}.npz") as z:
        ref = {key: z[key] for key in z.files}
    spec = json.loads(str(ref["spec"]))
    assert spec["source"] == "cora"
    data = bench.load("cora", PLANETOID)
    small = bench.subgraph(data, np.array(spec["node_index"]))
    features = small.features[:, spec["feature_columns"]]
    np.testing.assert_array_equal(features, ref["nodes"])
    graph = gpntk.NodeGraph.from_edges(features, small.edges, normalization=normalization, self_loops=self_loops)
    # entries d_u^{-1/2} a d_v^{-1/2} ≤ 1 are rounded in another order than the reference's: a few ulps
    np.testing.assert_allclose(graph.adjacency.to_dense().numpy(), ref["adj"], rtol=0, atol=4 * np.finfo(float).eps)
    if case == "rownorm":  # exactly the benchmark's depth-1 GCN (σw² 2·1 there, 1·2 here: the same kernels)
        net = bench.gcn(1)
        np.testing.assert_array_equal(graph.adjacency.to_dense().numpy(), ref["adj"])
    else:
        net = L.serial(*[getattr(L, name)(**kwargs) for name, kwargs in spec["layers"]])
    nngp, ntk = bench.graph_kernels(net, graph)
    for got, key in ((nngp, "nngp"), (ntk, "ntk")):
        np.testing.assert_allclose(got, ref[key], rtol=0, atol=1e-10 * np.abs(ref[key]).max())


@needs_planetoid
def test_command_line_quick_run(tmp_path, capsys):
    """The smoke test: the quick subgraph of Cora, every skip, row normalisation, one GP step, one timing."""
    out = tmp_path / "nodes.json"
    report = bench.main(["--root", str(PLANETOID), "--quick", "--datasets", "cora", "--normalizations", "row",
                         "--timing-threads", "1", "--gp-steps", "1", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "quick subgraph" in printed and "81.5 %" in printed
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["depths"] == [1, 2] and saved["threads"] == 1
    info = saved["datasets"]["cora"]
    assert (info["train"], info["val"], info["test"], info["classes"]) == (140, bench.QUICK_NODES, bench.QUICK_NODES, 7)
    rows = {(r["skip"], r["depth"]): r for r in saved["sweep"]}
    assert set(rows) == {(skip, depth) for skip in bench.SKIPS for depth in (1, 2)}
    for row in rows.values():
        assert "error" not in row  # every architecture is built (Skip-PC's Aggregate after a FanInSum included)
        assert row["seconds"] > 0
        for kernel in bench.KERNELS:
            reading = row[kernel]
            assert all(0.0 <= reading[key] <= 1.0 for key in ("val", "test", "val_ridge_val", "val_ridge_test"))
            assert reading["val_ridge"] in bench.RIDGE_GRID
    assert {r["kernel"] for r in saved["depth_by_validation"]} == set(bench.KERNELS)
    (gp,) = saved["gp"]
    assert gp["kernel"] == "nngp" and gp["steps"] == 1 and len(gp["losses"]) == 1 and 0.0 <= gp["test"] <= 1.0
    assert set(gp["hyperparameters"]) == {"first.weight_variance", "first.bias_variance", "readout.weight_variance",
                                          "readout.bias_variance", "noise"}
    assert saved["timing"]["depth"] == bench.TIMING_DEPTH and saved["timing"]["seconds"]["1"]["median"] > 0
    assert report["sweep"] == saved["sweep"]


@pytest.mark.parametrize("argv, message", [
    (["--depths", "0"], "--depths"),
    (["--ridge", "0"], "--ridge"),
    (["--timing-repeats", "0"], "--timing-repeats"),
    (["--gp-lr", "-1"], "--gp-lr"),
    (["--skips", "residual"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
