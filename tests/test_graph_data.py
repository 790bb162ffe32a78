"""benchmarks/graph_data.py: the TU and Planetoid readers on the shared data, format checks, protocol constants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ROOT.parent / "shared" / "data" / "graphs"  # benchmark data next to the repository, not shipped


graph_data = load_benchmark("graph_data.py", "graph_data")

#: graph counts and classes of the README; node-count maxima and feature widths as read (see the module docstring)
TU_SIZES = {"MUTAG": (188, 2, 28, 9), "PTC": (344, 2, 109, 19), "PROTEINS": (1113, 2, 620, 3),
            "NCI1": (4110, 2, 111, 37), "IMDBBINARY": (1000, 2, 136, 65), "IMDBMULTI": (1500, 3, 89, 59)}
#: nodes, features, undirected edges, classes, train / val / test sizes (README of the shared data)
PLANETOID_SIZES = {"cora": (2708, 1433, 5278, 7, 140, 500, 1000), "citeseer": (3327, 3703, 4552, 6, 120, 500, 1000)}


@pytest.fixture(scope="module")
def tu():
    if not GRAPHS.is_dir():
        pytest.skip(f"no graph benchmark data at {GRAPHS}")
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = graph_data.load_tu(name, GRAPHS / "tu")
        return cache[name]

    return load


@pytest.fixture(scope="module")
def planetoid():
    if not GRAPHS.is_dir():
        pytest.skip(f"no graph benchmark data at {GRAPHS}")
    return lambda name: graph_data.load_planetoid(name, GRAPHS / "planetoid")


@pytest.mark.parametrize("name", graph_data.TU_DATASETS)
def test_tu_sizes_features_and_adjacency(tu, name):
    data = tu(name)
    graphs, classes, max_nodes, features = TU_SIZES[name]
    assert len(data) == len(data.graphs) == len(data.labels) == len(data.tags) == graphs
    assert data.labels.dtype == np.int64 and set(data.labels.tolist()) == set(range(classes))
    assert data.num_features == features and data.num_nodes.max() == max_nodes
    seen = np.zeros(features, dtype=bool)
    for x, a in data.graphs:
        n = x.shape[0]
        assert x.dtype == a.dtype == np.float64 and x.shape == (n, features) and a.shape == (n, n)
        assert np.array_equal(x.sum(axis=1), np.ones(n)) and set(np.unique(x)) <= {0.0, 1.0}
        assert np.array_equal(a, a.T) and not a.diagonal().any() and set(np.unique(a)) <= {0.0, 1.0}
        seen |= x.any(axis=0)
    assert seen.all()  # every one-hot column is some node's tag
    if name in graph_data.DEGREE_AS_TAG:  # the one-hot code is that of the degree
        for (x, a), tags in zip(data.graphs, data.tags):
            np.testing.assert_array_equal(a.sum(axis=1), tags)
            assert np.array_equal(x @ x.T, (tags[:, None] == tags[None, :]).astype(float))


@pytest.mark.parametrize("name", graph_data.TU_DATASETS)
def test_tu_folds_partition_the_dataset(tu, name):
    """Each fold splits all graphs in train and test; the test folds, of ⌊N/10⌋ graphs each, are disjoint and
    leave N mod 10 graphs untested (GIN's published files)."""
    data = tu(name)
    assert len(data.folds) == 10
    for train, test in data.folds:
        assert train.dtype == test.dtype == np.int64 and len(test) == len(data) // 10
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(data)))
    tests = np.concatenate([test for _, test in data.folds])
    assert len(np.unique(tests)) == len(tests) == len(data) - len(data) % 10


def test_tu_repairs_are_noted(tu):
    """MUTAG's first graph has one-directional and repeated neighbour entries (GIN symmetrises them); no others."""
    assert tu("MUTAG").notes == ["graph 0: 16 one-directional neighbour entries symmetrised, 1 repeated entries "
                                 "merged, 0 self-loops dropped"]
    assert all(not tu(name).notes for name in graph_data.TU_DATASETS if name != "MUTAG")
    assert graph_data.load_tu("IMDB-B", GRAPHS / "tu").name == "IMDBBINARY"


def test_tu_format_on_a_toy_file(tmp_path):
    folder = tmp_path / "TOY"
    (folder / "10fold_idx").mkdir(parents=True)
    # graph 0: the path 0-1-2 listed one way, with a repeat, a self-loop, an attribute column; graph 1: an edge
    (folder / "TOY.txt").write_text("2\n3 7\n5 2 1 1 0.5\n9 1 2\n5 1 2\n2 3\n9 1 1\n9 1 0\n")
    for k in range(1, 11):
        (folder / "10fold_idx" / f"train_idx-{k}.txt").write_text(f"{k % 2}\n")
        (folder / "10fold_idx" / f"test_idx-{k}.txt").write_text(f"{1 - k % 2}\n")
    data = graph_data.load_tu("TOY", tmp_path)
    (x0, a0), (x1, a1) = data.graphs
    np.testing.assert_array_equal(a0, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(x0, [[1, 0], [0, 1], [1, 0]])  # tags 5, 9 → columns 0, 1
    np.testing.assert_array_equal(a1, [[0, 1], [1, 0]])
    np.testing.assert_array_equal(x1, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(data.labels, [0, 1])  # labels 7, 3 in order of appearance
    assert len(data.notes) == 2 and "1 repeated" in data.notes[0] and "attribute" in data.notes[1]
    degrees = graph_data.load_tu("TOY", tmp_path, degree_as_tag=True)
    np.testing.assert_array_equal(degrees.graphs[0][0], [[1, 0], [0, 1], [1, 0]])  # degrees 1, 2 → columns 0, 1
    (folder / "10fold_idx" / "test_idx-3.txt").write_text("1\n")
    with pytest.raises(ValueError, match="fold 3"):
        graph_data.load_tu("TOY", tmp_path)
    (folder / "TOY.txt").write_text("1\n2 0\n0 1 2\n0 0\n")
    with pytest.raises(ValueError, match="outside graph 0"):
        graph_data.load_tu("TOY", tmp_path)


@pytest.mark.parametrize("name", graph_data.PLANETOID_DATASETS)
def test_planetoid_sizes_and_split(planetoid, name):
    data = planetoid(name)
    nodes, features, edges, classes, train, val, test = PLANETOID_SIZES[name]
    assert data.features.shape == (nodes, features) and data.features.dtype == np.float64
    assert set(np.unique(data.features)) == {0.0, 1.0}
    assert data.edges.shape == (2, 2 * edges) and data.edges.dtype == np.int64
    a = data.adjacency()
    assert a.sum() == 2 * edges and np.array_equal(a, a.T) and not a.diagonal().any()
    assert data.labels.shape == (nodes,) and data.num_classes == classes
    splits = [data.train_index, data.val_index, data.test_index]
    assert [len(s) for s in splits] == [train, val, test]
    everything = np.concatenate(splits)
    assert len(np.unique(everything)) == len(everything) and (data.labels[everything] >= 0).all()
    np.testing.assert_array_equal(np.bincount(data.labels[data.train_index]), np.full(classes, 20))
    unlabelled = np.flatnonzero(data.labels < 0)  # Citeseer's nodes missing from the raw test file: no features
    assert len(unlabelled) == (15 if name == "citeseer" else 0) and not data.features[unlabelled].any()


def test_protocol_constants():
    c = np.array(graph_data.SVM_C_GRID)
    assert len(c) == 120 and c[0] == pytest.approx(1e-2) and c[-1] == pytest.approx(1e4)
    np.testing.assert_allclose(np.diff(np.log10(c)), 6 / 119)
    assert set(graph_data.PUBLISHED) == set(graph_data.TU_DATASETS) | set(graph_data.PLANETOID_DATASETS)
    assert graph_data.PUBLISHED["MUTAG"][:2] == (90.0, 8.5) and graph_data.PUBLISHED["cora"].mean == 81.5
    assert set(graph_data.GNTK_GRID.num_blocks) == set(graph_data.TU_DATASETS)
    settings = list(graph_data.GNTK_GRID.kernels("NCI1"))
    assert len(settings) == 3 * 3 * 2 and all(s["jumping_knowledge"] for s in settings)
    assert len(list(graph_data.GNTK_GRID_FULL.kernels("IMDB-M"))) == 14 * 3 * 2 * 2
