"""benchmarks/sequence_classification.py: the .ts reader, the shipped split, its pieces on a tiny subset, the CLI."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import gpntk

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    """The benchmark as a module, through the example's loader (the example reuses its reader and networks)."""
    return runpy.run_path(str(ROOT / "examples" / "sequence_classification.py"))["load_benchmark"]()


bench = _load_benchmark()


def test_read_ts_shipped_files():
    train = bench.read_ts(bench.DATA / "ItalyPowerDemand_TRAIN.ts")
    test = bench.read_ts(bench.DATA / "ItalyPowerDemand_TEST.ts")
    assert train.problem == test.problem == "ItalyPowerDemand"
    assert train.x.shape == (67, 24) and test.x.shape == (1029, 24)
    assert train.class_labels == test.class_labels == ["1", "2"]
    assert [train.labels.count(c) for c in "12"] == [34, 33]
    assert [test.labels.count(c) for c in "12"] == [513, 516]
    assert train.x[0, 0] == -0.71051757 and train.labels[0] == "1"  # the first data line, as written
    assert bench.is_z_normalised(train.x) and bench.is_z_normalised(test.x)


def test_read_ts_format_and_refusals(tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text("# a comment\n@problemName toy\n@univariate true\n@classLabel true a b\n@data\n"
                    "1,2,3:a\n\n4,5,6:b\n")
    toy = bench.read_ts(path)
    np.testing.assert_array_equal(toy.x, [[1, 2, 3], [4, 5, 6]])
    assert toy.labels == ["a", "b"] and toy.class_labels == ["a", "b"] and toy.problem == "toy"
    bad = {
        "1,2:a\n1,2,3:b\n": "different lengths",
        "1,2:c\n": r"labels \['c'\] not declared",
        "1,?:a\n": "without missing values",
        "1,NaN:a\n": "without missing values",
        "1,2\n": "class label",
        "1,2:3,4:a\n": "only univariate",
        "": "no series",
    }
    for data, message in bad.items():
        path.write_text("@classLabel true a b\n@data\n" + data)
        with pytest.raises(ValueError, match=message):
            bench.read_ts(path)
    path.write_text("@univariate false\n@classLabel true a\n@data\n1:a\n")
    with pytest.raises(ValueError, match="@univariate true"):
        bench.read_ts(path)
    path.write_text("@classLabel false\n@data\n1,2\n")
    with pytest.raises(ValueError, match="@classLabel true"):
        bench.read_ts(path)


def test_z_normalise():
    x = np.random.default_rng(0).normal(3.0, 2.0, (5, 24))
    assert not bench.is_z_normalised(x)
    z = bench.z_normalise(x)
    assert bench.is_z_normalised(z)
    np.testing.assert_allclose(bench.z_normalise(z), z, atol=1e-14)


def test_load_split_subset_is_balanced():
    split = bench.load_split(max_train=10, max_test=7)
    assert split.train_x.shape == (10, 24) and split.test_x.shape == (7, 24)
    assert split.train_x.dtype == torch.float64 and split.length == 24 and split.classes == 2
    assert split.was_z_normalised
    assert sorted(np.bincount(split.train_y.numpy()).tolist()) == [5, 5]
    assert sorted(np.bincount(split.test_y.numpy()).tolist()) == [3, 4]
    full = bench.load_split()
    assert len(full.train_x) == 67 and len(full.test_x) == 1029
    # the subset is rows of the full split, in the file's order
    rows = [int(np.flatnonzero((full.train_x == row).all(1))[0]) for row in split.train_x]
    assert rows == sorted(rows)


@pytest.fixture(scope="module")
def tiny():
    return bench.load_split(max_train=12, max_test=10)


@pytest.mark.parametrize("name", list(bench.NETWORKS))
def test_kernel_regression_is_the_ensemble_mean_at_infinite_time(tiny, name):
    """The benchmark's solve on the precomputed kernels equals TrainedEnsemble's t = ∞ mean."""
    kernel = bench.ntk(name, tiny.length)
    k_train, k_cross = bench.kernel_matrices(kernel, tiny.train_x, tiny.test_x)
    assert k_train.shape == (12, 12) and k_cross.shape == (10, 12)
    np.testing.assert_allclose(k_train, k_train.T, rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(k_train) > 0)
    ridge = 1e-3
    predicted = bench.kernel_regression(k_train, k_cross, tiny.train_y.numpy(), tiny.classes, ridge)
    targets = torch.from_numpy(bench.one_hot_targets(tiny.train_y.numpy(), tiny.classes))
    assert targets.sum(-1).abs().max() < 1e-15
    post = gpntk.TrainedEnsemble(kernel.net, tiny.train_x, targets, learning_rate=1.0,
                                 diag_reg=ridge * float(np.mean(np.diag(k_train))), input_shape=kernel.input_shape)
    with torch.no_grad():
        mean = post.mean(tiny.test_x, math.inf)
    reg = ridge * np.mean(np.diag(k_train)) * np.eye(12)
    expected = k_cross @ np.linalg.solve(k_train + reg, targets.numpy())
    np.testing.assert_allclose(mean.numpy(), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(predicted, mean.argmax(-1).numpy())


def test_networks_are_the_documented_ones():
    attention, cnn = bench.attention_net(), bench.cnn_net()
    assert any(isinstance(layer, gpntk.layers.GlobalSelfAttention) for layer in attention.layers)
    assert isinstance(cnn.layers[-2], gpntk.layers.GlobalAvgPool)
    assert isinstance(bench.cnn_net(pool=False).layers[-2], gpntk.layers.Flatten)
    assert isinstance(bench.attention_net(pool=False).layers[-2], gpntk.layers.Flatten)
    assert set(bench.KERNELS) | set(bench.DIAGNOSTIC_KERNELS) == set(bench.NETWORKS)
    assert bench.ntk("mlp", 24).input_shape is None and bench.ntk("cntk", 24).input_shape == (1, 24)


def test_svm_cross_validation_uses_the_training_set_only(tiny):
    k_train, k_cross = bench.kernel_matrices(bench.ntk("mlp", tiny.length), tiny.train_x, tiny.test_x)
    y = tiny.train_y.numpy()
    c, scores = bench.svm_cross_validation(k_train, y, folds=3)
    assert c in bench.C_GRID and len(scores) == len(bench.C_GRID)
    assert scores[bench.C_GRID.index(c)] == max(scores) and all(0.0 <= s <= 1.0 for s in scores)
    predicted = bench.svm_predict(k_train, k_cross, y, c)
    assert predicted.shape == (10,) and set(predicted) <= {0, 1}


def test_baselines_against_direct_loops(tiny):
    train_x, test_x = tiny.train_x.numpy()[:4, :6], tiny.test_x.numpy()[:3, :6]

    def dtw(a, b):
        d = np.full((7, 7), np.inf)
        d[0, 0] = 0.0
        for i in range(1, 7):
            for j in range(1, 7):
                d[i, j] = (a[i - 1] - b[j - 1]) ** 2 + min(d[i - 1, j], d[i, j - 1], d[i - 1, j - 1])
        return d[6, 6]

    expected = np.array([[dtw(a, b) for b in train_x] for a in test_x])
    np.testing.assert_allclose(bench.dtw_distances(train_x, test_x, chunk=2), expected, rtol=1e-13)
    assert np.all(expected <= ((test_x[:, None] - train_x[None]) ** 2).sum(-1) + 1e-12)  # the diagonal path
    base = bench.baselines(tiny)
    assert set(base) == {"1-NN Euclidean", "1-NN DTW (no window)"} and all(0 <= v <= 1 for v in base.values())


def test_command_line_on_a_subset(tmp_path, capsys):
    out = tmp_path / "result.json"
    report = bench.main(["--max-train", "10", "--max-test", "8", "--repeats", "2", "--kernels", "attention", "mlp",
                         "--output", str(out)])
    printed = capsys.readouterr().out
    assert "attention" in printed and "mlp" in printed and "1-NN Euclidean" in printed
    saved = json.loads(out.read_text())
    assert saved["n_train"] == 10 and saved["n_test"] == 8 and saved["threads"] == 1
    assert [r["kernel"] for r in saved["results"]] == ["attention", "mlp"] == [r["kernel"] for r in report["results"]]
    for row in saved["results"]:
        assert len(row["kernel_seconds"]) == 2 and row["kernel_seconds_median"] > 0
        assert set(row["accuracy"]) == set(bench.CLASSIFIERS)
        assert row["kernel_pairs"] == 10 * 11 // 2 + 8 * 10


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats"),
    (["--ridge", "-1"], "--ridge"),
    (["--ridge", "nan"], "--ridge"),
    (["--max-train", "1"], "--max-train"),
    (["--kernels", "rbf"], "invalid choice"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
