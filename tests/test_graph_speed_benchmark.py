"""benchmarks/graph_kernel_speed.py: its data, floors, network, agreement masks and the gpntk side of the CLI (no NT).

Everything runs on the benchmark's small synthetic graphs (``--synthetic``), so no data files and
no Neural Tangents are needed.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

bench = load_benchmark("graph_kernel_speed.py", "graph_kernel_speed")


def numpy_gcn(features: np.ndarray, adjacency: np.ndarray, depth: int, perturb: float = 0.0):
    """(NNGP, NTK) of ``(Aggregate, Dense(2, 0), ReLU) x (depth - 1), Aggregate, Dense(1, 0)`` in dense NumPy.

    Written from the closed forms (NTK parameterization, input kernel X Xᵀ / C, input NTK 0;
    ``Dense(σw², 0)``: Σ ← σw² Σ, Θ ← σw² Θ + Σ_new; ReLU: the arc-cosine maps of Cho & Saul
    2009, Σ ← √(qq')(sin θ + (π - θ) cos θ)/2π, Θ ← Θ (π - θ)/2π; ``Aggregate``: A · Aᵀ on both).
    The diagonal angle is set to its exact value 0. ``perturb`` is added to the angle of every
    ReLU input with correlation 1 (diagonal included) in the tangent map only, to find the entries
    that depend on them: an arccos error δθ moves the tangent factor (π - θ)/2π by δθ/2π but the
    covariance map only by O(δθ²) (its slope at θ = 0 is 0), which is how NT's error behaves.
    """
    a = adjacency
    s = features @ features.T / features.shape[1]
    t = np.zeros_like(s)
    for _ in range(depth - 1):
        s, t = a @ s @ a.T, a @ t @ a.T
        s = 2.0 * s
        t = 2.0 * t + s
        d = np.sqrt(np.diag(s))
        norms = np.outer(d, d)
        rho = np.clip(s / norms, -1.0, 1.0)
        theta = np.arccos(rho)
        np.fill_diagonal(theta, 0.0)
        s = norms * (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / (2 * math.pi)
        theta = np.where(rho >= 1.0 - bench.DEGENERATE_GAP, theta + perturb, theta)
        t = t * (math.pi - theta) / (2 * math.pi)
    s, t = a @ s @ a.T, a @ t @ a.T
    return s, t + s


def test_synthetic_data_and_row_normalisation():
    data = bench.load_node_data(_args())
    n = data["features"].shape[0]
    a, edges = data["adjacency"], data["edges"]
    assert data["features"].shape == (60, 8) and a.shape == (n, n)
    assert (data["features"].sum(1) > 0).all()  # no node without features
    assert set(map(tuple, edges.T)) == set(map(tuple, edges[::-1].T))  # both directions listed
    # row i: 1/deg(i) at every sender of an edge into i
    binary = np.zeros((n, n))
    binary[edges[1], edges[0]] = 1.0
    np.testing.assert_allclose(a, binary / binary.sum(1, keepdims=True), rtol=1e-15)
    lonely = bench.row_normalised(np.array([[0, 1], [1, 0]]), 3)
    np.testing.assert_array_equal(lonely, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])  # an isolated node keeps a zero row

    graphs = bench.load_graph_data(_args())
    assert graphs["features"].shape[:2] == graphs["adjacency"].shape[:2] == (12, graphs["sizes"].max())
    for (f, a), k in zip(bench.unpadded(graphs), graphs["sizes"]):
        assert f.shape == (k, 3) and (f.sum(1) == 1).all()  # one-hot tags
        np.testing.assert_array_equal(np.diag(a), np.ones(k))  # A + I
        assert (a == a.T).all()
    assert not graphs["adjacency"][graphs["features"].sum(-1) == 0].any()  # padding nodes have no edges


def test_size_groups_partition_by_size():
    sizes = [10, 28, 12, 11, 17, 16, 13, 25, 20, 10, 12]
    groups = bench.size_groups(sizes, growth=1.25, chunk=3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(sizes)))
    for group in groups:
        g = np.asarray(sizes)[group]
        assert len(group) <= 3 and g.max() <= 1.25 * g.min()
    assert [np.asarray(sizes)[g].max() for g in groups] == sorted(np.asarray(sizes)[g].max() for g in groups)


def test_node_floor_is_depth_sandwiches():
    data = bench.load_node_data(_args())
    x, a = data["features"], data["adjacency"]
    s0 = x @ x.T / x.shape[1]
    for depth in (1, 3):
        fns = bench.floor_node_functions(data, depth)
        power = np.linalg.matrix_power(a, depth)
        expected = power @ s0 @ power.T
        for name in ("floor", "floor-agg"):
            sigma, theta = fns[name]()
            np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-12, atol=1e-14 * np.abs(expected).max())
            # Θ is aggregated at every aggregation but the first: depth - 1 sandwiches of the first Σ
            if depth == 1:
                assert theta is None
            else:
                np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-12, atol=1e-14 * np.abs(expected).max())


def test_graph_floor_aggregates_every_pair():
    rng = np.random.default_rng(1)
    n1, k1, n2, k2 = 3, 4, 2, 5
    s = torch.from_numpy(rng.standard_normal((n1 * k1, n2 * k2)))
    a1 = torch.from_numpy(rng.standard_normal((n1, k1, k1)))
    a2 = torch.from_numpy(rng.standard_normal((n2, k2, k2)))
    out = bench.aggregate_pairs(s, a1, a2)
    for g in range(n1):
        for h in range(n2):
            block = s[g * k1:(g + 1) * k1, h * k2:(h + 1) * k2]
            torch.testing.assert_close(out[g * k1:(g + 1) * k1, h * k2:(h + 1) * k2], a1[g] @ block @ a2[h].T,
                                       rtol=1e-13, atol=1e-13)
    data = bench.load_graph_data(_args())
    fns = bench.floor_graph_functions(data, blocks=2, chunk=5)
    assert all(math.isfinite(fn()) for fn in fns.values())


def test_benchmark_gcn_is_the_documented_network_and_the_mask_finds_the_correlation_one_entries():
    data = bench.load_node_data(_args())
    x, a = data["features"], data["adjacency"]
    for depth in (2, 3):
        fns = bench.gpntk_node_functions(data, depth)
        sigma, theta = fns["gpntk"]()
        cold_sigma, cold_theta = fns["gpntk-cold"]()
        ref_sigma, ref_theta = numpy_gcn(x, a, depth)
        irregular = bench.irregular_pairs(x, a, depth)
        np.fill_diagonal(irregular, True)
        # the same closed forms in another summation order: rounding only (1e-12, a thousand ulps), except where
        # a ReLU input has correlation 1 and the rounded ρ moves the arccos by ~1e-8 (the mask under test)
        scale = np.abs(ref_theta).max()
        assert bench.rel_error(sigma.numpy(), ref_sigma)[0] < 1e-12
        whole, regular = bench.rel_error(theta.numpy(), ref_theta, irregular)
        assert regular < 1e-12 and whole < 1e-7
        assert torch.equal(cold_sigma, sigma) and torch.equal(cold_theta, theta)
        # the entries that change when the angles at correlation 1 move are exactly the irregular ones (weights
        # and Θ are positive, so nothing cancels)
        _, moved = numpy_gcn(x, a, depth, perturb=1e-4)
        changed = np.abs(moved - ref_theta) > 1e-12 * scale
        assert changed.any() and not (changed & ~irregular).any()
        assert ((changed | np.eye(len(x), dtype=bool)) == irregular).all()


def test_rel_error_masks():
    b = np.arange(9.0).reshape(3, 3) + 1
    a = b.copy()
    a[0, 0] += 0.9  # diagonal
    a[1, 2] += 0.09
    assert bench.rel_error(a, b) == pytest.approx((0.1, 0.01))
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 2] = True
    assert bench.rel_error(a, b, mask) == pytest.approx((0.1, 0.0))


def test_cli_gpntk_side(tmp_path):
    """The whole script on tiny graphs without NT: workers, agreement checks, interleaved rounds, JSON."""
    path = tmp_path / "speed.json"
    result = bench.main(["--synthetic", "--peers", "gpntk", "floor", "--depths", "2", "--repeats", "2",
                         "--threads", "1", "--json", str(path)])
    saved = json.loads(path.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert len(saved["load_average_start"]) == len(saved["load_average_end"]) == 3
    names = {"node depth 2": {"gpntk", "gpntk-cold", "floor", "floor-agg"},
             "graph gntk(2, 2)": {"gpntk-buckets", "gpntk-padded", "floor-padded", "floor-buckets"}}
    assert set(saved["summary"]) == set(names)
    for tag, summary in saved["summary"].items():
        assert set(summary["median_s"]) == names[tag]
        assert all(v > 0 for v in summary["median_s"].values())
    for row in saved["rows"]:
        assert all(len(s["calls"]) == 2 for s in row["timed"].values())
        assert row["agreement"] and all(c["ok"] for c in row["agreement"].values())
        assert set(row["workers"]) == {"gpntk", "floor"}
    ratios = saved["summary"]["graph gntk(2, 2)"]["ratios"]
    assert ratios["gpntk-padded / floor-padded"] > 0 and ratios["NT / gpntk-padded"] is None  # no NT


def _args() -> argparse.Namespace:
    return argparse.Namespace(synthetic=True, seed=0)
