"""Attention NTK vs CNTK vs MLP NTK on a UCR time-series classification task (ItalyPowerDemand).

    .venv/bin/python benchmarks/sequence_classification.py --output sequence_classification.json
    .venv/bin/python benchmarks/sequence_classification.py --repeats 1 --max-train 20 --max-test 50

Data: ItalyPowerDemand from the UCR time-series archive (Dau et al. 2019), shipped in
``benchmarks/data/italy_power_demand/`` (see its README): 24 hourly values of Italian electrical
power demand per day, 2 classes (October-March against April-September), the archive's split of
67 training and 1029 test series. The series are z-normalised in the archive (mean 0, standard
deviation 1 with the ``n - 1`` denominator); :func:`load_split` checks that and z-normalises any
series that is not.

Kernels (NTK parameterization, σw² = 2, σb² = 0.1, float64), each on the series as they are:

* ``attention``: ``Conv(3, same) → ReLU → GlobalSelfAttention(softmax) → ReLU → GlobalAvgPool →
  Dense`` on ``input_shape=(1, 24)``: a learned local embedding of each hour, self-attention over
  the 24 hours (Hron et al. 2020, "Infinite attention", ICML), pooling and a readout;
* ``cntk``: ``Conv(3, same) → ReLU → Conv(3, same) → ReLU → GlobalAvgPool → Dense`` on the same
  inputs (Arora et al. 2019, "On exact computation with an infinitely wide neural net");
* ``mlp``: ``L.mlp(2, "relu")``, two hidden layers on the 24 values as a vector;
* diagnostics, ``attention-flatten`` and ``cntk-flatten``: the two spatial networks with
  ``Flatten`` instead of ``GlobalAvgPool`` before the readout (added after the first run showed
  the pooled kernels behind the MLP: pooling makes a kernel invariant to shifts in time, while on
  this task the hour of a feature matters; they are not part of the three-way comparison).

Classifiers on each kernel (training set only for every choice):

* ``kernel regression``: the mean of the infinite ensemble of those networks trained to t = ∞ on
  the one-hot labels minus 1/2 (:class:`gpntk.TrainedEnsemble`'s t = ∞ mean, i.e. the solve
  ``K(x, X) (K(X, X) + r I)⁻¹ Y``) with ``r`` = ``--ridge`` (default 1e-4) times the mean of the
  training kernel's diagonal; the class is the arg-max;
* ``svm``: scikit-learn's ``SVC(kernel="precomputed", C)``, C ∈ {10⁻², …, 10⁴} chosen by 5-fold
  stratified cross-validation on the training set (the first best), then refitted on it.

Baselines computed by the script on the same split: 1-nearest-neighbour with the Euclidean
distance and with dynamic time warping (no warping window).

Timing: the kernel evaluation (the training kernel and the test-by-training kernel) is repeated
``--repeats`` times after one warm-up, with torch pinned to ``--threads`` threads (default 1); the
table shows the median. The script prints a table and writes everything as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import gpntk
from gpntk import layers as L

DATA = Path(__file__).resolve().parent / "data" / "italy_power_demand"
NAME = "ItalyPowerDemand"
C_GRID = tuple(10.0**k for k in range(-2, 5))
CV_FOLDS = 5
SEED = 0
DEFAULT_RIDGE = 1e-4
CLASSIFIERS = ("kernel regression", "svm")


# --- data ----------------------------------------------------------------------------------------
@dataclass
class TimeSeries:
    """A univariate equal-length ``.ts`` file: series ``x`` (n, length) and their class labels (strings)."""

    x: np.ndarray
    labels: list[str]
    class_labels: list[str]  # the header's ``@classLabel true ...`` values, in their order
    problem: str


def read_ts(path: Path) -> TimeSeries:
    """Read a univariate, equal-length ``.ts`` file (the sktime / aeon format of the UCR archive).

    ``#`` lines are comments; ``@key value`` lines the header (``@problemName``,
    ``@classLabel true 1 2``, ``@univariate``, ``@equalLength``, ...) up to ``@data``; then one
    series per line, its values separated by commas and its class label after the last ``:``.
    Multivariate, unequal-length or unlabelled files, and missing values (``?``), are refused.
    """
    header: dict[str, str] = {}
    class_labels: list[str] = []
    rows: list[list[float]] = []
    labels: list[str] = []
    in_data = False
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            key, _, value = line.partition(" ")
            if key.lower() == "@data":
                in_data, class_labels = True, _class_labels(path, header)
            elif key.startswith("@"):
                header[key[1:].lower()] = value.strip()
            else:
                raise ValueError(f"{path}:{number}: expected a header line (@...) before @data, got {line[:40]!r}")
            continue
        if ":" not in line:
            raise ValueError(f"{path}:{number}: a series needs a class label after ':'")
        values, label = line.rsplit(":", 1)
        if ":" in values or "?" in values:
            raise ValueError(f"{path}:{number}: only univariate series without missing values are supported")
        rows.append([float(v) for v in values.split(",")])
        labels.append(label.strip())
    if not rows:
        raise ValueError(f"{path}: no series after @data")
    lengths = {len(row) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"{path}: series of different lengths {sorted(lengths)}")
    unknown = sorted(set(labels) - set(class_labels))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} not declared in @classLabel")
    x = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: only univariate series without missing values are supported (found NaN or inf)")
    return TimeSeries(x, labels, class_labels, header.get("problemname", ""))


def _class_labels(path: Path, header: dict[str, str]) -> list[str]:
    """The class labels of a ``.ts`` header, after checking it describes univariate equal-length labelled series."""
    for key, wanted in (("univariate", "true"), ("equallength", "true")):
        if header.get(key, wanted).lower() != wanted:
            raise ValueError(f"{path}: only @{key} {wanted} files are supported")
    class_header = header.get("classlabel", "").split()
    if not class_header or class_header[0].lower() != "true":
        raise ValueError(f"{path}: needs '@classLabel true <labels>'")
    return class_header[1:]


def is_z_normalised(x: np.ndarray, atol: float = 1e-6) -> bool:
    """Every series has mean 0 and standard deviation 1 (``n - 1`` denominator, the archive's) to ``atol``."""
    return bool(np.allclose(x.mean(1), 0.0, atol=atol) and np.allclose(x.std(1, ddof=1), 1.0, atol=atol))


def z_normalise(x: np.ndarray) -> np.ndarray:
    """Each series minus its mean, over its standard deviation (``n - 1`` denominator)."""
    return (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)


@dataclass
class Split:
    """Train and test series (float64 tensors ``(n, length)``) and their classes ``0..classes-1``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_labels: list[str]
    was_z_normalised: bool

    @property
    def length(self) -> int:
        return self.train_x.shape[1]

    @property
    def classes(self) -> int:
        return len(self.class_labels)


def _first(n: int | None, labels: np.ndarray) -> np.ndarray:
    """Indices of the first ``n`` series, taken alternately from each class (all of them for ``None``)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    order = np.argsort([np.sum(labels[:i] == labels[i]) for i in range(len(labels))], kind="stable")
    return np.sort(order[:n])


def load_split(folder: Path = DATA, max_train: int | None = None, max_test: int | None = None) -> Split:
    """The archive's train/test split of ``folder/<name>_TRAIN.ts`` and ``_TEST.ts``, z-normalised.

    ``max_train`` / ``max_test`` keep only that many series (balanced over the classes: the first
    of each class in turn), for quick runs and tests.
    """
    train = read_ts(folder / f"{NAME}_TRAIN.ts")
    test = read_ts(folder / f"{NAME}_TEST.ts")
    if train.class_labels != test.class_labels or train.x.shape[1] != test.x.shape[1]:
        raise ValueError(f"{folder}: the train and test files disagree on the classes or the length")
    classes = {label: i for i, label in enumerate(train.class_labels)}
    train_y = np.array([classes[label] for label in train.labels])
    test_y = np.array([classes[label] for label in test.labels])
    keep_train, keep_test = _first(max_train, train_y), _first(max_test, test_y)
    normalised = is_z_normalised(train.x) and is_z_normalised(test.x)
    train_x, test_x = (train.x, test.x) if normalised else (z_normalise(train.x), z_normalise(test.x))
    return Split(
        torch.from_numpy(train_x[keep_train]), torch.from_numpy(train_y[keep_train]),
        torch.from_numpy(test_x[keep_test]), torch.from_numpy(test_y[keep_test]),
        train.class_labels, normalised,
    )


# --- kernels -------------------------------------------------------------------------------------
def attention_net(pool: bool = True) -> L.Layer:
    """Conv(3, same) → ReLU → GlobalSelfAttention(softmax) → ReLU → GlobalAvgPool (or Flatten) → Dense."""
    return L.serial(
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
        L.GlobalSelfAttention(4, "softmax", bias_variance=0.1), L.ReLU(),
        L.GlobalAvgPool() if pool else L.Flatten(), L.Dense(2.0, 0.1),
    )


def cnn_net(pool: bool = True) -> L.Layer:
    """Conv(3, same) → ReLU → Conv(3, same) → ReLU → GlobalAvgPool (or Flatten) → Dense."""
    return L.serial(
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
        L.GlobalAvgPool() if pool else L.Flatten(), L.Dense(2.0, 0.1),
    )


def mlp_net() -> L.Layer:
    """Two hidden ReLU layers and a readout on the series as a vector."""
    return L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1)


#: name -> (the network, whether it reads each series as a sequence ``(1, length)``)
NETWORKS: dict[str, tuple[Callable[[], L.Layer], bool]] = {
    "attention": (attention_net, True),
    "cntk": (cnn_net, True),
    "mlp": (mlp_net, False),
    "attention-flatten": (lambda: attention_net(pool=False), True),
    "cntk-flatten": (lambda: cnn_net(pool=False), True),
}
#: the three kernels of the comparison
KERNELS = ("attention", "cntk", "mlp")
#: the same spatial networks read out through Flatten instead of GlobalAvgPool (a diagnostic: the
#: pooled kernels are invariant to shifts in time, the flattened ones keep the positions)
DIAGNOSTIC_KERNELS = ("attention-flatten", "cntk-flatten")


def ntk(name: str, length: int) -> gpntk.NTKKernel:
    """The NTK of the network ``name`` (a key of :data:`NETWORKS`) on series of ``length`` values."""
    build, sequence = NETWORKS[name]
    return gpntk.NTKKernel(build(), input_shape=(1, length) if sequence else None)


def kernel_matrices(
    kernel: gpntk.NTKKernel, train_x: torch.Tensor, test_x: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """``K(X, X)`` (n, n) and ``K(x, X)`` (m, n) as numpy arrays."""
    with torch.no_grad():
        return kernel(train_x).to_dense().numpy(), kernel(test_x, train_x).to_dense().numpy()


def timed_kernels(
    kernel: gpntk.NTKKernel, train_x: torch.Tensor, test_x: torch.Tensor, repeats: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """:func:`kernel_matrices` after one untimed warm-up call, and the seconds of ``repeats`` timed calls."""
    kernel_matrices(kernel, train_x[:2], test_x[:2])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        k_train, k_cross = kernel_matrices(kernel, train_x, test_x)
        seconds.append(time.perf_counter() - start)
    return k_train, k_cross, seconds


# --- classifiers ---------------------------------------------------------------------------------
def one_hot_targets(labels: np.ndarray, classes: int) -> np.ndarray:
    """One-hot rows minus 1/classes: every row sums to zero (the arg-max is unchanged)."""
    return np.eye(classes)[labels] - 1.0 / classes


def kernel_regression(k_train: np.ndarray, k_cross: np.ndarray, train_y: np.ndarray, classes: int,
                      ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """Predicted classes: arg-max of ``K(x, X) (K(X, X) + r I)⁻¹ Y``, ``r`` = ``ridge`` · mean diag K(X, X).

    This is the t = ∞ mean of :class:`gpntk.TrainedEnsemble` with ``diag_reg = r`` (the
    infinite ensemble trained to convergence on ``Y``).
    """
    reg = ridge * float(np.mean(np.diag(k_train)))
    weights = np.linalg.solve(k_train + reg * np.eye(len(k_train)), one_hot_targets(train_y, classes))
    return np.argmax(k_cross @ weights, axis=-1)


def svm_cross_validation(k_train: np.ndarray, train_y: np.ndarray, folds: int = CV_FOLDS) -> tuple[float, list[float]]:
    """The C of :data:`C_GRID` with the best mean ``folds``-fold accuracy on the training set (the first best)."""
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=SEED).split(k_train, train_y))
    scores = []
    for c in C_GRID:
        correct = [
            SVC(kernel="precomputed", C=c).fit(k_train[np.ix_(tr, tr)], train_y[tr]).predict(k_train[np.ix_(va, tr)])
            == train_y[va]
            for tr, va in splits
        ]
        scores.append(float(np.mean([np.mean(c_) for c_ in correct])))
    return C_GRID[int(np.argmax(scores))], scores


def svm_predict(k_train: np.ndarray, k_cross: np.ndarray, train_y: np.ndarray, c: float) -> np.ndarray:
    from sklearn.svm import SVC

    return SVC(kernel="precomputed", C=c).fit(k_train, train_y).predict(k_cross)


# --- baselines -----------------------------------------------------------------------------------
def nearest_neighbour_euclidean(train_x: np.ndarray, test_x: np.ndarray, train_y: np.ndarray) -> np.ndarray:
    """Classes of the Euclidean 1-nearest neighbours (first on ties)."""
    distances = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
    return train_y[np.argmin(distances, axis=1)]


def dtw_distances(train_x: np.ndarray, test_x: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Dynamic time warping distances (squared pointwise costs, no window) of every (test, train) pair, (m, n).

    The usual recursion D[i, j] = c(i, j) + min(D[i-1, j], D[i, j-1], D[i-1, j-1]) over the two
    series' positions, run for ``chunk`` test series against all training series at once.
    """
    out = np.empty((len(test_x), len(train_x)))
    length = train_x.shape[1]
    for start in range(0, len(test_x), chunk):
        cost = (test_x[start:start + chunk, None, :, None] - train_x[None, :, None, :]) ** 2  # (c, n, L, L)
        acc = np.full(cost.shape[:2] + (length + 1, length + 1), np.inf)
        acc[..., 0, 0] = 0.0
        for i in range(1, length + 1):
            for j in range(1, length + 1):
                best = np.minimum(np.minimum(acc[..., i - 1, j], acc[..., i, j - 1]), acc[..., i - 1, j - 1])
                acc[..., i, j] = cost[..., i - 1, j - 1] + best
        out[start:start + chunk] = acc[..., length, length]
    return out


def baselines(split: Split) -> dict[str, float]:
    """Test accuracy of the 1-NN classifiers with the Euclidean and the DTW distance."""
    train_x, test_x, train_y, test_y = (t.numpy() for t in (split.train_x, split.test_x, split.train_y, split.test_y))
    dtw = train_y[np.argmin(dtw_distances(train_x, test_x), axis=1)]
    return {
        "1-NN Euclidean": float(np.mean(nearest_neighbour_euclidean(train_x, test_x, train_y) == test_y)),
        "1-NN DTW (no window)": float(np.mean(dtw == test_y)),
    }


# --- the run -------------------------------------------------------------------------------------
def evaluate_kernel(name: str, split: Split, repeats: int, ridge: float) -> dict[str, object]:
    """Kernel times and the test accuracy of both classifiers for the kernel ``name``."""
    k_train, k_cross, seconds = timed_kernels(ntk(name, split.length), split.train_x, split.test_x, repeats)
    train_y, test_y = split.train_y.numpy(), split.test_y.numpy()
    c, cv_scores = svm_cross_validation(k_train, train_y)
    pairs = len(k_train) * (len(k_train) + 1) // 2 + k_cross.size
    return {
        "kernel": name,
        "kernel_seconds": seconds,
        "kernel_seconds_median": statistics.median(seconds),
        "kernel_pairs": pairs,
        "accuracy": {
            "kernel regression": float(np.mean(kernel_regression(k_train, k_cross, train_y, split.classes, ridge)
                                               == test_y)),
            "svm": float(np.mean(svm_predict(k_train, k_cross, train_y, c) == test_y)),
        },
        "svm_C": c,
        "svm_cv_accuracy": dict(zip((f"{v:g}" for v in C_GRID), cv_scores)),
    }


def table(results: list[dict], base: dict[str, float]) -> str:
    """The printed table: test accuracy per (kernel, classifier) and the kernel time."""
    lines = [f"{'kernel':<18s} {'kernel regression':>17s} {'SVM':>7s} {'SVM C':>7s} {'kernel time (s)':>16s}"]
    for r in results:
        acc = r["accuracy"]
        lines.append(f"{r['kernel']:<18s} {acc['kernel regression']:17.4f} {acc['svm']:7.4f} {r['svm_C']:7g} "
                     f"{r['kernel_seconds_median']:16.3f}")
    lines += [f"{name:<36s} {value:.4f}" for name, value in base.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the two .ts files")
    parser.add_argument("--kernels", nargs="+", choices=list(NETWORKS), default=list(NETWORKS),
                        help="default: the three of the comparison and the two Flatten diagnostics")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help="kernel regression diag_reg relative to the mean training kernel diagonal")
    parser.add_argument("--repeats", type=int, default=3, help="timed kernel evaluations (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-train", type=int, default=None, help="only this many training series (balanced)")
    parser.add_argument("--max-test", type=int, default=None, help="only this many test series (balanced)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if not args.ridge >= 0 or not np.isfinite(args.ridge):
        parser.error("--ridge must be non-negative and finite")
    for option in ("max_train", "max_test"):
        if getattr(args, option) is not None and getattr(args, option) < 2:
            parser.error(f"--{option.replace('_', '-')} must be at least 2")
    torch.set_num_threads(args.threads)
    split = load_split(args.data, args.max_train, args.max_test)
    print(f"{NAME}: {len(split.train_x)} training and {len(split.test_x)} test series of length {split.length}, "
          f"{split.classes} classes (z-normalised in the files: {split.was_z_normalised}); {args.threads} thread(s)")
    results = [evaluate_kernel(name, split, args.repeats, args.ridge) for name in args.kernels]
    base = baselines(split)
    print(table(results, base))
    report = {
        "dataset": NAME, "n_train": len(split.train_x), "n_test": len(split.test_x), "length": split.length,
        "classes": split.class_labels, "z_normalised_in_files": split.was_z_normalised,
        "ridge": args.ridge, "repeats": args.repeats, "threads": args.threads, "cv_folds": CV_FOLDS,
        "results": results, "baselines": base,
        "versions": {"gpntk": gpntk.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
