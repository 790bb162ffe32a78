"""benchmarks/uci.py: the paper's kernels, its SVM protocol, the trained-ensemble classifier, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "uci"


uci = load_benchmark("uci.py", "uci_benchmark")


def arora_kernels(x: np.ndarray, max_depth: int) -> dict[tuple[int, int], np.ndarray]:
    """The NTK recursion as Arora et al. (2020) state it: arc-cosine maps with σw² = 1 from S = XXᵀ,
    H accumulating S at every layer at or above ``fix`` (an independent numpy implementation)."""
    kernels = {}
    for fix in range(max_depth):
        s = x @ x.T
        h = np.zeros_like(s)
        for depth in range(max_depth):
            if fix <= depth:
                h = h + s
            if fix <= depth:
                kernels[depth, fix] = h.copy()
            norms = np.sqrt(np.outer(np.diag(s), np.diag(s)))
            cos = np.clip(s / norms, -1.0, 1.0)
            angle = np.arccos(cos)
            s = (np.sin(angle) + (math.pi - angle) * cos) * norms / (2 * math.pi)
            h = h * (math.pi - angle) / (2 * math.pi)
    return kernels


def test_reads_the_collection_format():
    data = uci.read_dataset(DATA / "iris")
    assert data.x.shape == (150, 4) and data.x.dtype == torch.float64
    assert data.classes == 3 and set(data.y.tolist()) == {0, 1, 2}
    assert len(data.train) + len(data.validation) == 150 and not set(data.train) & set(data.validation)
    assert len(data.folds) == 4 and all(len(tr) + len(te) == 150 for tr, te in data.folds)
    assert [p.name for p in uci.dataset_folders(DATA)] == ["balloons", "fertility", "iris"]
    assert [p.name for p in uci.dataset_folders(DATA, max_points=100)] == ["balloons", "fertility"]


def test_paper_kernels_equal_the_papers_recursion():
    """gpntk's σw² = 2 NTK with frozen bottom layers, times d / 2^(depth+1), is the paper's kernel."""
    data = uci.read_dataset(DATA / "fertility")
    ours = uci.paper_kernels(data.x, 5)
    theirs = arora_kernels(data.x.numpy(), 5)
    assert sorted(ours) == sorted(theirs) and len(ours) == 15
    # arccos amplifies the rounding of cos ≈ 1 (near-duplicate points) from ε to √ε ≈ 1e-8, so
    # those pairs agree to √ε only; every other entry agrees to round-off
    x = data.x.numpy()
    norms = np.linalg.norm(x, axis=1)
    well_conditioned = np.abs(x @ x.T / np.outer(norms, norms)) < 0.999
    assert well_conditioned.mean() > 0.9
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-7, atol=1e-12, err_msg=str(key))
        np.testing.assert_allclose(ours[key][well_conditioned], theirs[key][well_conditioned], rtol=1e-12,
                                   atol=1e-12, err_msg=str(key))
    # frozen layers change the kernel: fix = 0 (all trained) differs from fix = depth (the NNGP)
    assert not np.allclose(ours[3, 0], ours[3, 3])


def test_svm_protocol_matches_an_independent_run():
    """Same (depth, fix, C) choice and the same accuracies as the protocol run on the numpy kernels."""
    from sklearn.svm import SVC

    data = uci.read_dataset(DATA / "iris")
    result = uci.svm_protocol(data, uci.paper_kernels(data.x, 5))
    kernels, y = arora_kernels(data.x.numpy(), 5), data.y.numpy()

    def accuracy(kernel, train, test, c):
        model = SVC(kernel="precomputed", C=c).fit(kernel[np.ix_(train, train)], y[train])
        return 100.0 * np.mean(model.predict(kernel[np.ix_(test, train)]) == y[test])

    best, choice = -1.0, None
    for depth in range(5):
        for fix in range(depth + 1):
            for c in [10.0**k for k in range(-2, 5)]:
                a = accuracy(kernels[depth, fix], data.train, data.validation, c)
                if a > best:
                    best, choice = a, (depth, fix, c)
    depth, fix, c = choice
    test = np.mean([accuracy(kernels[depth, fix], tr, te, c) for tr, te in data.folds])
    assert result.validation == pytest.approx(best) and result.test == pytest.approx(test)
    assert result.chosen == f"depth={depth} fix={fix} C={c:g}"
    assert result.test > 90.0  # iris is easy: a broken kernel or split would show


def test_ensemble_classifier_is_kernel_regression_at_infinite_time():
    """At t = ∞ the ensemble mean is kernel (ridge) regression on the one-hot labels, for every ridge."""
    data = uci.read_dataset(DATA / "iris")
    train, test = data.folds[0]
    depth, fix, ridges = 2, 1, (1e-3, 1e-1)
    accuracy, error = uci.ensemble_scores(data, depth, fix, 0.0, ridges, (10.0, math.inf), train, test)
    assert accuracy.shape == error.shape == (2, 2)
    k = arora_kernels(data.x.numpy(), 5)[depth, fix]  # proportional to gpntk's: the relative ridge absorbs it
    k_train = k[np.ix_(train, train)]
    targets = np.eye(3)[data.y.numpy()[train]]
    for i, ridge in enumerate(ridges):
        reg = ridge * np.mean(np.diag(k_train))
        mean = k[np.ix_(test, train)] @ np.linalg.solve(k_train + reg * np.eye(len(train)), targets)
        expected = 100.0 * np.mean(mean.argmax(-1) == data.y.numpy()[test])
        assert accuracy[i, 1].item() == pytest.approx(expected)
        squared_error = np.mean(np.sum((mean - np.eye(3)[data.y.numpy()[test]]) ** 2, axis=-1))
        assert error[i, 1].item() == pytest.approx(squared_error, rel=1e-6)


def test_ensemble_protocol_chooses_on_validation():
    data = uci.read_dataset(DATA / "iris")
    result = uci.ensemble_protocol(data, max_depth=3, ridges=(0.0, 1e-2), biases=(0.0, 0.1))
    assert result.method == "ensemble" and 0.0 <= result.test <= 100.0
    assert result.validation >= 90.0 and result.test >= 80.0
    # the reported validation accuracy is the best over the whole grid
    grid = {
        (depth, fix, bias): uci.ensemble_scores(data, depth, fix, bias, (0.0, 1e-2), uci.STEP_GRID, data.train,
                                                data.validation)
        for depth in range(3) for fix in range(depth + 1) for bias in (0.0, 0.1)
    }
    # the setting with the smallest validation squared error, and its validation accuracy
    key, (accuracy, error) = min(grid.items(), key=lambda item: item[1][1].min().item())
    r, t = divmod(int(error.flatten().argmin()), len(uci.STEP_GRID))
    assert result.chosen == str(uci.EnsembleChoice(*key, (0.0, 1e-2)[r], uci.STEP_GRID[t]))
    assert result.validation == pytest.approx(accuracy[r, t].item())
    assert "depth=" in result.chosen and "t=" in result.chosen and "ridge=" in result.chosen


def test_command_line(capsys, tmp_path):
    out_csv = tmp_path / "rows.csv"
    results = uci.main([str(DATA), "--datasets", "balloons", "fertility", "--max-depth", "2",
                        "--ridges", "0", "--bias-variances", "0", "0.1", "--csv", str(out_csv)])
    captured = capsys.readouterr()
    assert set(results) == {"balloons", "fertility"}
    assert "average test accuracy over 2 datasets" in captured.out
    assert "balloons" in captured.out and "fertility" in captured.out
    assert "2/2" in captured.err  # the progress bar
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("dataset,N,d,classes,method") and len(rows) == 1 + 2 * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown datasets.*nope"):
        uci.dataset_folders(DATA, ["iris", "nope"])
    with pytest.raises(FileNotFoundError, match="no UCI data folder"):
        uci.dataset_folders(DATA / "missing")
    with pytest.raises(ValueError, match="fix must be in"):
        uci.paper_network(2, 3)
    with pytest.raises(SystemExit):
        uci.main([str(DATA), "--ridges", "-1"])
    with pytest.raises(SystemExit):
        uci.main([str(DATA), "--bias-variances", "nan"])
