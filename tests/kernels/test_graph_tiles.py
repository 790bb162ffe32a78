r"""The tiled graph-level Gram matrices (``gpntk.kernels.graph_tiles``) against independent evaluations.

* random continuous graphs: against the dense NumPy reference of ``tests/_graph_reference.py``
  (the recursion written from the formulas on the disjoint union), to 1e-12 relative;
* real data (MUTAG, PTC, PROTEINS, NCI1 subsets, Du et al.'s ``A + I`` and ``D̃⁻¹(A + I)``
  aggregations, jumping knowledge or not, sum or mean readouts): against the padded-bucket path
  (``method="buckets"``, itself checked against the reference in ``test_graph_kernels.py``). The
  NNGP agrees to 1e-12. One-hot features make many nodes of different graphs exactly alike, so
  their correlation is one up to rounding, where the ReLU NTK's derivative ``(π - arccos ρ)/2π``
  turns a rounding difference δ of ρ into √(2δ)/2π: the two paths sum in different orders (as
  the padded path does for ``K(G, G')`` against ``K(G', G)``, see ``docs/graphs.md``). Measured:
  up to 6e-11 relative to the largest entry; the bound is :math:`\sqrt{\epsilon} \approx 1.5e-8`,
  the worst that one such entry can move, so a wrong formula or a missed term still fails.
* the multi-depth output against separate single-depth networks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark
from _graph_reference import reference_kernels
from test_graph_data import GRAPHS as SHARED_GRAPHS

import gpntk
from gpntk import layers as L
from gpntk.kernels.graph_gram import graph_kernel_matrices, graph_kernel_matrices_by_depth
from gpntk.kernels.graph_tiles import plan_of

RTOL = 1e-12
NTK_RTOL = 1.5e-8  # one-hot data only: √ε, see the module docstring
SMALL_TILES = 8 * 60 * 60  # tiles of about 60 nodes: several tiles, tiles of one graph, i < j and i == j

graph_data = load_benchmark("graph_data.py", "graph_data")
#: the shared benchmark data next to the repository (``GPNTK_GRAPH_DATA`` for a worktree elsewhere)
GRAPHS = Path(os.environ.get("GPNTK_GRAPH_DATA", SHARED_GRAPHS))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest entrywise difference relative to the largest entry of ``b``."""
    return float((a - b).abs().max() / b.abs().max())


def random_graph(n: int, rng: np.random.Generator, channels: int = 3):
    a = rng.uniform(0.2, 1.5, (n, n)) * (rng.random((n, n)) < 0.4)
    np.fill_diagonal(a, rng.uniform(0.5, 1.0, n))
    return rng.standard_normal((n, channels)), a


def build(ops) -> L.Serial:
    make = {
        "dense": lambda op: L.Dense(op[1], op[2]), "relu": lambda op: L.ReLU(), "erf": lambda op: L.Erf(),
        "aggregate": lambda op: L.Aggregate(), "sum_pool": lambda op: L.GlobalSumPool(),
        "avg_pool": lambda op: L.GlobalAvgPool(),
    }
    return L.serial(*(make[op[0]](op) for op in ops))


@pytest.mark.parametrize("pool", ["sum", "avg"])
def test_tiles_equal_the_dense_reference(pool):
    """Random weighted directed graphs, biases, ReLU and Erf, a readout with bias; symmetric and rectangular."""
    rng = np.random.default_rng(3)
    graphs = [random_graph(n, rng) for n in (3, 12, 4, 7, 9, 3, 5, 11, 6, 8)]
    others = [random_graph(n, rng) for n in (10, 4)] + [graphs[5]]
    ops = [("aggregate",), ("dense", 1.6, 0.3), ("relu",), ("aggregate",), ("dense", 1.3, 0.0), ("erf",),
           ("dense", 1.1, 0.2), ("relu",), (pool + "_pool",), ("dense", 0.8, 0.4)]
    net = build(ops)
    assert plan_of(net) is not None
    sigma, theta = graph_kernel_matrices(net, graphs, method="tiles", tile_bytes=8 * 20 * 20, progress=False)
    sigma_ref, theta_ref = reference_kernels(graphs, ops)
    assert relative(sigma, torch.as_tensor(sigma_ref)) < RTOL
    assert relative(theta, torch.as_tensor(theta_ref)) < RTOL
    torch.testing.assert_close(sigma, sigma.T, rtol=0, atol=0)
    cross_sigma, cross_theta = graph_kernel_matrices(net, graphs, others, method="tiles", tile_bytes=8 * 15 * 15,
                                                     progress=False)
    sigma_ref, theta_ref = reference_kernels(graphs + others[:2], ops)
    columns = [10, 11, 5]
    assert cross_sigma.shape == (10, 3)
    assert relative(cross_sigma, torch.as_tensor(sigma_ref[:10][:, columns])) < RTOL
    assert relative(cross_theta, torch.as_tensor(theta_ref[:10][:, columns])) < RTOL
    only, none = graph_kernel_matrices(net, graphs, method="tiles", track_ntk=False, progress=False)
    assert none is None and relative(only, sigma) < RTOL


@pytest.fixture(scope="module")
def tu():
    if not GRAPHS.is_dir():
        pytest.skip(f"no graph benchmark data at {GRAPHS}")
    cache = {}

    def load(name, count):
        if name not in cache:
            cache[name] = graph_data.load_tu(name, root=GRAPHS / "tu")
        return cache[name].graphs[:count]

    return load


def prepared(graphs, aggregation):
    if aggregation == "sum":
        return [(x, a + np.eye(len(a))) for x, a in graphs]
    return [(x, gpntk.normalized_adjacency(torch.from_numpy(a), "row", self_loops=True)) for x, a in graphs]


CASES = [  # dataset, graphs, BLOCKs, MLP layers, aggregation, jumping knowledge, readout
    ("MUTAG", 40, 3, 2, "sum", True, "sum"),
    ("MUTAG", 40, 2, 1, "degree", False, "mean"),
    ("PTC", 40, 2, 1, "sum", True, "mean"),
    ("PTC", 40, 4, 1, "degree", True, "sum"),
    ("PROTEINS", 10, 2, 2, "degree", True, "sum"),
    ("PROTEINS", 10, 1, 1, "sum", False, "sum"),
    ("NCI1", 60, 3, 1, "sum", True, "sum"),
    ("NCI1", 60, 2, 3, "degree", False, "mean"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_tiles_equal_buckets_on_real_data(tu, case):
    name, count, blocks, mlp, aggregation, jk, readout = case
    graphs = prepared(tu(name, count), aggregation)
    if name == "MUTAG":
        graphs.append(graphs[3])  # an identical pair: both paths take the graph's own values
    net = L.gntk(blocks, mlp, jumping_knowledge=jk, readout=readout)
    buckets = graph_kernel_matrices(net, graphs, method="buckets", progress=False)
    tiles = graph_kernel_matrices(net, graphs, tile_bytes=SMALL_TILES, progress=False)  # auto: tiles
    assert relative(tiles[0], buckets[0]) < RTOL
    assert relative(tiles[1], buckets[1]) < NTK_RTOL
    torch.testing.assert_close(tiles[1], tiles[1].T, rtol=0, atol=0)
    if name == "MUTAG":
        for k in tiles:  # the per-graph values, exactly, as for the graph with itself
            assert k[3, -1] == k[3, 3] == k[-1, -1]


def test_rectangular_tiles_equal_buckets(tu):
    graphs = prepared(tu("NCI1", 30), "sum")
    net = L.gntk(2, 1)
    buckets = graph_kernel_matrices(net, graphs[:18], graphs[18:] + graphs[:2], method="buckets", progress=False)
    tiles = graph_kernel_matrices(net, graphs[:18], graphs[18:] + graphs[:2], tile_bytes=SMALL_TILES,
                                  progress=False)
    assert tiles[0].shape == (18, 14)
    assert relative(tiles[0], buckets[0]) < RTOL
    assert relative(tiles[1], buckets[1]) < NTK_RTOL


@pytest.mark.parametrize("jk", [True, False])
def test_by_depth_equals_single_depth_networks(tu, jk):
    """One pass through gntk(4, R) gives gntk(D, R) for every D <= 4 (evaluated separately, padded path)."""
    graphs = prepared(tu("PTC", 24), "degree")
    deep = L.gntk(4, 2, jumping_knowledge=jk)
    by_depth = graph_kernel_matrices_by_depth(deep, graphs, (4, 1, 2, 0), tile_bytes=SMALL_TILES, progress=False)
    assert sorted(by_depth) == [0, 1, 2, 4]
    for depth, (sigma, theta) in by_depth.items():
        single = graph_kernel_matrices(L.gntk(depth, 2, jumping_knowledge=jk), graphs, method="buckets",
                                       progress=False) if depth > 0 else None
        if single is None:  # depth 0: the readout of the input features alone, Σ = Θ = Σ_g Σ_g' x·x'/C
            x = [torch.as_tensor(f) for f, _ in graphs]
            pooled = torch.stack([torch.stack([(a @ b.T).sum() / a.shape[1] for b in x]) for a in x])
            single = (pooled, pooled)
        assert relative(sigma, single[0]) < RTOL
        assert relative(theta, single[1]) < NTK_RTOL
    with pytest.raises(ValueError, match="depth must be in"):
        graph_kernel_matrices_by_depth(deep, graphs, (5,), progress=False)


def test_other_networks_take_the_padded_path():
    rng = np.random.default_rng(5)
    graphs = [random_graph(n, rng) for n in (4, 6, 5)]
    hidden_after_pool = L.serial(L.Aggregate(), L.Dense(1.5, 0.1), L.ReLU(), L.GlobalSumPool(), L.Dense(1.2, 0.1),
                                 L.ReLU(), L.Dense(1.0, 0.0))
    assert plan_of(hidden_after_pool) is None
    shared = L.Dense(1.0, 0.0)
    assert plan_of(L.serial(L.FanOut(2), L.parallel(L.serial(L.GlobalSumPool(), shared),
                                                    L.serial(L.GlobalAvgPool(), shared)), L.FanInSum())) is None
    assert plan_of(L.serial(L.FanOut(2), L.parallel(L.serial(L.GlobalSumPool(), L.Dense(1.0, 0.0)),
                                                    L.serial(L.GlobalAvgPool(), shared)), L.FanInSum())) is not None
    auto = graph_kernel_matrices(hidden_after_pool, graphs, progress=False)
    padded = graph_kernel_matrices(hidden_after_pool, graphs, method="buckets", progress=False)
    assert torch.equal(auto[0], padded[0]) and torch.equal(auto[1], padded[1])
    with pytest.raises(gpntk.ArchitectureError, match="not of gntk's form"):
        graph_kernel_matrices(hidden_after_pool, graphs, method="tiles", progress=False)
    with pytest.raises(gpntk.ArchitectureError, match="not of gntk's form"):
        graph_kernel_matrices_by_depth(hidden_after_pool, graphs, (1,), progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        graph_kernel_matrices(L.gntk(1, 1), graphs, method="padded", progress=False)


def test_compiled_activations_equal_eager(monkeypatch):
    """``gpntk.settings.fusion(True)``: the tiles' activations through torch.compile (traced, aot_eager backend)."""
    import gpntk.kernels.fusion as fusion_module

    monkeypatch.setattr(fusion_module, "COMPILE_BACKEND", "aot_eager")
    rng = np.random.default_rng(8)
    graphs = [random_graph(n, rng) for n in (3, 7, 5, 6)]
    ops = [("aggregate",), ("dense", 1.6, 0.3), ("relu",), ("aggregate",), ("dense", 1.3, 0.0), ("relu",),
           ("sum_pool",), ("dense", 0.8, 0.4)]
    net = build(ops)
    from torch._dynamo.utils import counters

    counters.clear()
    with gpntk.settings.fusion(True):
        sigma, theta = graph_kernel_matrices(net, graphs, tile_bytes=8 * 10 * 10, progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    sigma_ref, theta_ref = reference_kernels(graphs, ops)
    assert relative(sigma, torch.as_tensor(sigma_ref)) < RTOL
    assert relative(theta, torch.as_tensor(theta_ref)) < RTOL


def test_tiled_gram_records_no_autograd_graph(tu, monkeypatch):
    """The per-graph pass ran with autograd on: with learnable hyperparameters every intermediate of every
    graph stayed alive in the graph of the Gram diagonal (NCI1 at L = 13, R = 3: 12-17 GB; measured here
    on 400 of its graphs: peak 1.56 GB, now 0.39 GB). Nothing of the tiled path may record gradients."""
    from gpntk.kernels import graph_tiles

    recorded = []
    original = graph_tiles._self_pass

    def watched(*args, **kwargs):
        recorded.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(graph_tiles, "_self_pass", watched)
    graphs = prepared(tu("NCI1", 12), "sum")
    net = L.gntk(2, 2)
    assert any(p.requires_grad for p in net.parameters())
    cov, ntk = graph_kernel_matrices(net, graphs, tile_bytes=SMALL_TILES, progress=False)
    assert recorded == [False]
    assert not cov.requires_grad and ntk is not None and not ntk.requires_grad
