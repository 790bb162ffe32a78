"""benchmarks/graph_classification.py: the GNTK Gram against an independent NumPy GNTK, the protocol's pieces, the CLI.

The reference :func:`gntk_reference` is written from the formulas of Du et al. (2019), "Graph Neural
Tangent Kernel", Section 4, one pair of graphs at a time; it shares no code with gpntk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

import gpntk

ROOT = Path(__file__).resolve().parents[1]


bench = load_benchmark("graph_classification.py", "graph_classification")


def _require_data() -> None:
    if not (bench.DEFAULT_DATA / "MUTAG" / "MUTAG.txt").is_file():
        pytest.skip(f"no TU benchmark data at {bench.DEFAULT_DATA}")  # data next to the repository, not shipped


# --- an independent GNTK -------------------------------------------------------------------------
def relu_maps(cov: np.ndarray, var_rows: np.ndarray, var_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Du et al.'s ReLU layer with :math:`c_\sigma = 2` on a covariance ``cov`` (n, n') between the nodes of
    two graphs whose node variances are ``var_rows`` (n,) and ``var_cols`` (n',):

    :math:`\Sigma' = \sqrt{ab}\,(\sin\theta + (\pi - \theta)\cos\theta)/\pi` (the NNGP map, :math:`c_\sigma
    E[\sigma(u)\sigma(v)]`) and :math:`\dot\Sigma = (\pi - \theta)/\pi` (:math:`c_\sigma E[\sigma'(u)\sigma'(v)]`),
    with :math:`\cos\theta = \Sigma_{uu'}/\sqrt{ab}` (Cho & Saul 2009's arc-cosine kernels)."""
    scale = np.sqrt(np.outer(var_rows, var_cols))
    theta = np.arccos(np.clip(cov / scale, -1.0, 1.0))
    return scale * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / np.pi, (np.pi - theta) / np.pi


def gntk_reference(x1: np.ndarray, s1: np.ndarray, x2: np.ndarray, s2: np.ndarray, blocks: int, mlp_layers: int,
                   input_scale: float = 1.0) -> tuple[float, float]:
    r"""(NNGP, NTK) of Du et al.'s GNTK with jumping knowledge between two graphs.

    ``x``: node features (n, C); ``s``: the aggregation matrix, :math:`c_u [A + I]_{uv}` (n, n). Σ⁽⁰⁾ = Θ⁽⁰⁾ =
    ``input_scale`` · X X'ᵀ; a BLOCK aggregates Σ ← S Σ S'ᵀ and Θ ← S Θ S'ᵀ (also the two graphs' own
    covariances, whose diagonals the ReLU layers need), then ``mlp_layers`` times Σ ← ReLU map of Σ,
    Θ ← Θ ⊙ Σ̇ + Σ (the new Σ). Readout: the sum over all node pairs; jumping knowledge: the sum of the
    readouts of the depths 0..``blocks``.
    """
    c11, c22, c12 = (input_scale * a @ b.T for a, b in ((x1, x1), (x2, x2), (x1, x2)))
    t12 = c12.copy()
    nngp, ntk = c12.sum(), t12.sum()
    for _ in range(blocks):
        c11, c22, c12, t12 = s1 @ c11 @ s1.T, s2 @ c22 @ s2.T, s1 @ c12 @ s2.T, s1 @ t12 @ s2.T
        for _ in range(mlp_layers):
            v1, v2 = np.diag(c11).copy(), np.diag(c22).copy()
            c12, derivative = relu_maps(c12, v1, v2)
            c11, c22 = relu_maps(c11, v1, v1)[0], relu_maps(c22, v2, v2)[0]
            t12 = t12 * derivative + c12
        nngp, ntk = nngp + c12.sum(), ntk + t12.sum()
    return float(nngp), float(ntk)


def aggregation_matrix(a: np.ndarray, aggregation: str) -> np.ndarray:
    """``A + I`` (sum) or ``(A + I)`` with row u divided by :math:`|N(u)| + 1` (degree), from Du et al.'s c_u."""
    closed = a + np.eye(len(a))
    return closed if aggregation == "sum" else closed / (a.sum(axis=1) + 1.0)[:, None]


def reference_grams(graphs, blocks: int, mlp_layers: int, aggregation: str) -> tuple[np.ndarray, np.ndarray]:
    # gpntk's input kernel is the NTK parameterization's X Xᵀ / C (a mean over the C input channels);
    # Du et al.'s is X Xᵀ. The GNTK is homogeneous of degree one in Σ⁽⁰⁾ (aggregations are linear, the
    # ReLU maps scale with √(ab) and keep θ), so Du et al.'s Gram is C times gpntk's: the reference
    # runs with input_scale 1/C to meet gpntk's convention.
    scale = 1.0 / graphs[0][0].shape[1]
    n = len(graphs)
    nngp, ntk = np.empty((n, n)), np.empty((n, n))
    for i, (x1, a1) in enumerate(graphs):
        for j, (x2, a2) in enumerate(graphs):
            nngp[i, j], ntk[i, j] = gntk_reference(x1, aggregation_matrix(a1, aggregation), x2,
                                                   aggregation_matrix(a2, aggregation), blocks, mlp_layers, scale)
    return nngp, ntk


def _random_graphs(count: int, channels: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random undirected graphs of 2-9 nodes without self loops (some isolated nodes), one-hot features."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(2, 10))
        a = np.triu((rng.random((n, n)) < 0.35).astype(float), 1)
        out.append((np.eye(channels)[rng.integers(0, channels, n)], a + a.T))
    return out


def _mutag(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    _require_data()
    return bench.graph_data.load_tu("MUTAG", bench.DEFAULT_DATA).graphs[:count]


# NNGP at 1e-10: every map of the NNGP is well conditioned (sin θ + (π − θ) cos θ = π − θ³/3 + ... is flat
# at θ = 0); the two sides differ by summation order only. NTK at 1e-8: where two nodes have correlation
# exactly one in exact arithmetic (a node with itself, or two nodes with the same neighbourhood tags), each
# implementation computes ρ = 1 − ε with ε a few 1e-16 or exactly 1, so θ = arccos ρ ≈ √(2ε) ≈ 2e-8 and
# Σ̇ = 1 − θ/π differ by up to ~1e-8 (relative) per ReLU layer at those entries; summed with the
# well-conditioned entries the Gram entries differ by less. Measured on these cases: NNGP ≤ 6e-16,
# NTK ≤ 9e-10 (MUTAG, sum, L = R = 2).
NNGP_RTOL, NTK_RTOL = 1e-10, 1e-8


@pytest.mark.parametrize("blocks, mlp_layers", [(1, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("aggregation", bench.AGGREGATIONS)
@pytest.mark.parametrize("source", ["MUTAG", "random"])
def test_gram_matches_du_et_al_gntk(source, aggregation, blocks, mlp_layers):
    graphs = _mutag(10) if source == "MUTAG" else _random_graphs(8, 3, seed=blocks + 10 * mlp_layers)
    nngp, ntk = gpntk.graph_kernel_matrices(bench.KernelSetting(blocks, mlp_layers, aggregation).network(),
                                            bench.with_self_loops(graphs, aggregation), track_ntk=True)
    expected_nngp, expected_ntk = reference_grams(graphs, blocks, mlp_layers, aggregation)
    np.testing.assert_allclose(nngp.numpy(), expected_nngp, rtol=NNGP_RTOL, atol=0)
    np.testing.assert_allclose(ntk.numpy(), expected_ntk, rtol=NTK_RTOL, atol=0)
    assert np.all(expected_ntk > expected_nngp)  # Θ = Σ + (trained lower layers' terms ≥ 0): a test that can fail


def test_benchmark_gram_is_the_reference_ntk():
    """ntk_gram (the benchmark's Gram: symmetrised Θ, timed) on 10 MUTAG graphs with degree aggregation."""
    graphs = _mutag(10)
    gram, seconds = bench.ntk_gram(bench.KernelSetting(2, 1, "degree"), graphs, progress=False)
    np.testing.assert_allclose(gram, reference_grams(graphs, 2, 1, "degree")[1], rtol=NTK_RTOL, atol=0)
    assert np.array_equal(gram, gram.T) and seconds > 0


def test_benchmark_grams_by_depth_are_the_reference_ntks():
    """ntk_grams: L = 1, 2, 3 from one pass through gntk(3, 1) (graph_kernel_matrices_by_depth), each the reference."""
    graphs = _mutag(10)
    settings = [bench.KernelSetting(b, 1, "sum") for b in (3, 1, 2)]
    grams, seconds = bench.ntk_grams(settings, graphs, progress=False)
    for setting, gram in zip(settings, grams):
        np.testing.assert_allclose(gram, reference_grams(graphs, setting.blocks, 1, "sum")[1], rtol=NTK_RTOL, atol=0)
    assert seconds > 0
    with pytest.raises(ValueError, match="one mlp_layers and aggregation"):
        bench.ntk_grams([bench.KernelSetting(1, 1, "sum"), bench.KernelSetting(1, 2, "sum")], graphs)


def test_self_loops_and_degree_scaling():
    graphs = _random_graphs(4, 2, seed=1)
    for (x, a), (x_sum, s_sum), (x_deg, s_deg) in zip(graphs, bench.with_self_loops(graphs, "sum"),
                                                      bench.with_self_loops(graphs, "degree")):
        assert x_sum is x and x_deg is x
        np.testing.assert_array_equal(s_sum, a + np.eye(len(a)))
        expected = (a + np.eye(len(a))) / (a.sum(1) + 1)[:, None]
        np.testing.assert_allclose(np.asarray(s_deg), expected, rtol=1e-15)
        np.testing.assert_allclose(np.asarray(s_deg).sum(1), 1.0, rtol=1e-15)
    with pytest.raises(ValueError, match="aggregation"):
        bench.with_self_loops(graphs, "mean")


# --- protocol pieces -----------------------------------------------------------------------------
def test_grids():
    assert [s.label for s in bench.QUICK_GRID] == ["L=1 R=1 sum", "L=1 R=1 degree"]
    nci1 = bench.paper_grid("NCI1")
    assert len(nci1) == 18 and {s.blocks for s in nci1} == {9, 11, 13} and {s.mlp_layers for s in nci1} == {1, 2, 3}
    assert {s.aggregation for s in nci1} == set(bench.AGGREGATIONS)
    assert len(bench.paper_grid("MUTAG")) == 12 and bench.BUDGET_GRID["MUTAG"] == bench.paper_grid("MUTAG")
    assert set(bench.BUDGET_GRID) == set(bench.graph_data.TU_DATASETS)
    c = np.array(bench.THIN_C_GRID)
    assert len(c) == 25 and c[0] == pytest.approx(1e-2) and c[-1] == pytest.approx(1e4)
    reductions = bench.reductions("MUTAG", bench.QUICK_GRID, bench.THIN_C_GRID, None)
    assert len(reductions) == 2 and "kernel grid" in reductions[0] and "C grid" in reductions[1]
    assert bench.reductions("MUTAG", bench.paper_grid("MUTAG"), bench.graph_data.SVM_C_GRID, None) == []


def test_gram_symmetry_is_checked_to_the_accuracy_of_the_relu_layers():
    """About 1e-8 relative per ReLU layer (the NTK's arccos at correlation one); averaged once checked."""
    gram = np.array([[4.0, 2.0], [2.0 * (1 + 2e-8), 5.0]])
    deep, shallow = bench.KernelSetting(3, 3, "sum"), bench.KernelSetting(1, 1, "sum")
    out = bench.symmetric_gram(gram, deep)  # nine ReLU layers: 9e-8 allowed
    assert np.array_equal(out, out.T) and out[0, 1] == pytest.approx(2.0 * (1 + 1e-8), rel=1e-15)
    with pytest.raises(RuntimeError, match="L=1 R=1 sum.*symmetric to 1e-08.*largest relative difference 2e-08"):
        bench.symmetric_gram(gram, shallow)
    with pytest.raises(RuntimeError, match="not finite"):
        bench.symmetric_gram(np.array([[1.0, np.nan], [np.nan, 1.0]]), deep)


def test_stratified_subset_and_restricted_folds():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    subset = bench.stratified_subset(labels, 50)
    assert len(subset) == 50 and np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(np.bincount(labels[subset]), [30, 15, 5])
    np.testing.assert_array_equal(bench.stratified_subset(labels, 500), np.arange(100))
    folds = [(np.setdiff1d(np.arange(100), np.arange(k, 100, 10)), np.arange(k, 100, 10)) for k in range(10)]
    restricted = bench.restrict_folds(folds, subset, labels[subset])
    for (train, test), (tr, te) in zip(folds, restricted):
        np.testing.assert_array_equal(subset[te], np.intersect1d(test, subset))
        np.testing.assert_array_equal(subset[tr], np.intersect1d(train, subset))
    with pytest.raises(ValueError, match="one class only"):
        bench.restrict_folds(folds, np.arange(60), labels[:60])


def test_gram_scalings():
    gram = np.array([[4.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 16.0]])
    np.testing.assert_allclose(bench.scaled_raw(gram), gram)  # smallest entry 1
    np.testing.assert_allclose(bench.scaled_raw(gram, np.array([0, 2])), gram / 2)
    np.testing.assert_allclose(bench.normalised(gram), gram / np.sqrt(np.outer([4, 9, 16], [4, 9, 16])))
    np.testing.assert_allclose(bench.scaled_raw(-gram), -gram / 16)  # no positive smallest entry: over max |K|


# --- the command line ----------------------------------------------------------------------------
def test_command_line_on_a_few_mutag_graphs(tmp_path, capsys):
    _require_data()
    out = tmp_path / "result.json"
    # an earlier part of a run, with another dataset: --append keeps it
    earlier = {"dataset": "PTC", "graphs": 344, "kernels": ["L=1 R=1 sum"], "best": {"accuracy_mean": 0.6,
               "accuracy_std": 0.1}, "published": {"accuracy_mean": 0.679, "accuracy_std": 0.069},
               "difference_in_published_std": 1.1, "nested": None, "gram_seconds_total": 1.0}
    out.write_text(json.dumps({"command": "earlier", "machine": {}, "results": [earlier, {"dataset": "MUTAG"}],
                               "wall_seconds": 5.0}))
    report = bench.main(["--datasets", "MUTAG", "--grid", "quick", "--max-graphs", "40", "--c-grid", "decades",
                         "--inner-folds", "2", "--max-iter", "10000", "--no-progress", "--append",
                         "--output", str(out)])
    assert "MUTAG" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["machine"]["threads"] == 1 and saved["machine"]["versions"]["torch"] == torch.__version__
    assert [r["dataset"] for r in saved["results"]] == ["PTC", "MUTAG"] and saved["results"][0] == earlier
    assert [p["command"] for p in saved["parts"]][0] == "earlier" and saved["parts"][0]["datasets"] == ["PTC", "MUTAG"]
    assert saved["wall_seconds"] == pytest.approx(5.0 + saved["parts"][1]["wall_seconds"])
    record = saved["results"][1]
    assert record == json.loads(json.dumps(report["results"][1]))
    assert record["svm_max_iter"] == 10000 and 0 <= record["svm_fits_at_max_iter"] <= record["svm_fits"]
    assert 0 <= record["best"]["fits_at_max_iter"] <= min(10, record["svm_fits_at_max_iter"])
    for key in ("best", "published", "difference_in_published_std", "nested", "per_kernel_best", "grams",
                "graphs", "pairs", "reductions", "c_grid", "kernels"):
        assert key in record
    assert record["graphs"] == 40 and record["pairs"] == 40 * 41 // 2 and record["graphs_in_dataset"] == 188
    assert sum(record["test_graphs_per_fold"]) <= 40 and record["subset"] and len(record["reductions"]) == 4
    best = record["best"]
    for result in (best, record["nested"]):
        assert 0.0 <= result["accuracy_mean"] <= 1.0 and 0.0 <= result["accuracy_std"] <= 0.5
        assert len(result["fold_accuracies"]) == 10
        assert result["accuracy_mean"] == pytest.approx(np.mean(result["fold_accuracies"]), rel=1e-12)
    # the best setting is the best of the per-kernel bests (the nested one may differ either way: it can pick a
    # different setting in each fold)
    assert best["accuracy_mean"] == max(k["accuracy_mean"] for k in record["per_kernel_best"])
    assert len(record["nested"]["chosen"]) == 10
    assert best["setting"]["label"] in record["kernels"] and best["setting"]["C"] in record["c_grid"]
    assert record["published"]["accuracy_mean"] == 0.90 and record["published"]["accuracy_std"] == 0.085
    assert record["difference_in_published_std"] == pytest.approx(abs(best["accuracy_mean"] - 0.90) / 0.085)
    for gram in record["grams"]:
        assert gram["seconds"] > 0 and gram["pairs_per_second"] == pytest.approx(gram["pairs"] / gram["seconds"])


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "COLLAB"], "unknown"),
    (["--threads", "0"], "--threads"),
    (["--inner-folds", "1"], "--inner-folds"),
    (["--max-graphs", "5"], "at least 20"),
    (["--max-graphs", "FOO=100"], "unknown dataset"),
    (["--grid", "huge"], "invalid choice"),
    (["--max-iter", "0"], "--max-iter"),
    (["--append"], "--append needs"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
