"""The UCI table of Arora et al. (2020): infinitely wide ReLU networks on 90 small datasets.

    .venv/bin/python benchmarks/uci.py ../shared/data/uci                   # both classifiers, all 90
    .venv/bin/python benchmarks/uci.py ../shared/data/uci --methods svm     # the paper's protocol only
    .venv/bin/python benchmarks/uci.py ../shared/data/uci --datasets iris wine --csv uci.csv

The datasets are the 90 classification sets of Fernández-Delgado et al. (JMLR 2014) with at most
5000 points (one folder per dataset: ``NAME.txt``, ``NAME_R.dat``, ``conxuntos.dat``,
``conxuntos_kfold.dat``; see the collection's README). The protocol is that of Arora, Du, Li,
Salakhutdinov, Wang and Yu, "Harnessing the Power of Infinitely Wide Deep Nets on Small-data
Tasks" (ICLR 2020, Table 1):

* kernels: the NTK of a fully-connected ReLU network with ``depth`` = 0..4 hidden layers, no
  bias, σw² = 2, whose bottom ``fix`` = 0..depth ``Dense`` layers are not trained
  (``Dense(trainable=False)``: they add nothing to the NTK; ``fix = depth`` leaves only the
  readout, i.e. the NNGP), times d / 2^(depth+1), which is the paper's normalisation (its
  arc-cosine recursion starts from XXᵀ with σw² = 1); 15 kernels, computed by gpntk on all points
  of the dataset at once;
* **svm** (the paper's classifier): scikit-learn's ``SVC(kernel="precomputed", C)``, C ∈ {10⁻², …,
  10⁴}; (depth, fix, C) chosen by accuracy on the validation split of ``conxuntos.dat`` (the first
  best in the order depth, fix, C), then the mean test accuracy over the four (train, test) pairs
  of ``conxuntos_kfold.dat``;
* **ensemble** (gpntk's own classifier): the mean output of an infinite ensemble of such networks
  trained by gradient descent on the one-hot labels for time t (:class:`gpntk.TrainedEnsemble`,
  squared loss; the prediction is the arg-max class). ``fix < depth`` is the ``"ntk"`` regime
  with frozen bottom layers, ``fix = depth`` the ``"nngp"`` regime (only the readout trained).
  t counts gradient steps at the largest stable learning rate
  (:meth:`~gpntk.TrainedEnsemble.max_learning_rate`), t ∈ {10⁰, 10^0.5, …, 10⁶, ∞};
  ``diag_reg`` is a ridge relative to the mean of the training kernel's diagonal (``--ridges``,
  default 0, 10⁻³, 10⁻², 10⁻¹). (depth, fix, diag_reg, t) are chosen on the validation split by
  the squared error of the mean against the one-hot labels (the training loss: accuracy on a
  validation split of a few dozen points ties between many settings and jumps by whole points),
  then tested on the four pairs as above. One eigendecomposition of the training kernel serves
  every ridge (:meth:`~gpntk.TrainedEnsemble.with_diag_reg`) and every t.

For every dataset the script prints the validation and test accuracy (%) of each classifier and
the chosen hyperparameters; at the end the average test accuracy over the datasets next to the
published numbers (NTK 81.95 %, random forest 81.56 %). A progress bar goes to stderr. Everything
runs in float64 on the CPU; ``--threads`` sets torch's threads (default: torch's choice).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import gpntk
from gpntk import layers as L

PUBLISHED = {"NTK (Arora et al. 2020)": 81.95, "random forest": 81.56, "Gaussian-kernel SVM": 81.03}
C_GRID = tuple(10.0**k for k in range(-2, 5))
STEP_GRID = tuple(10.0 ** (k / 2) for k in range(13)) + (math.inf,)  # gradient steps at the max rate
DEFAULT_RIDGES = (0.0, 1e-3, 1e-2, 1e-1)
DEFAULT_BIASES = (0.0,)
METHODS = ("svm", "ensemble")


# --- data ----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """One UCI dataset: standardized features ``x`` (N, d), labels ``y`` (N,) in 0..classes-1, splits."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: int
    train: list[int]
    validation: list[int]
    folds: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return self.x.shape[0]

    @property
    def num_features(self) -> int:
        return self.x.shape[1]


def _index_lines(path: Path) -> list[list[int]]:
    return [[int(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()]


def read_info(folder: Path) -> dict[str, str]:
    """The ``key= value`` lines of ``folder/NAME.txt`` (``n_entradas``, ``n_clases``, ``n_patrons1``, ``fich1``, ...)."""
    info = {}
    for line in (folder / f"{folder.name}.txt").read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            info[key.strip()] = value.strip()
    return info


def read_dataset(folder: Path) -> Dataset:
    """Read ``folder/NAME.txt``, its data file and its two split files (see the module docstring)."""
    name = folder.name
    info = read_info(folder)
    rows = [line.split() for line in (folder / info["fich1"]).read_text().splitlines()[1:] if line.strip()]
    x = torch.tensor([[float(v) for v in row[1:-1]] for row in rows], dtype=torch.float64)
    y = torch.tensor([int(row[-1]) for row in rows])
    if x.shape != (int(info["n_patrons1"]), int(info["n_entradas"])):
        raise ValueError(f"{name}: data shape {tuple(x.shape)} does not match {name}.txt")
    split = _index_lines(folder / "conxuntos.dat")
    kfold = _index_lines(folder / "conxuntos_kfold.dat")
    folds = [(kfold[2 * i], kfold[2 * i + 1]) for i in range(len(kfold) // 2)]
    return Dataset(name, x, y, int(info["n_clases"]), split[0], split[1], folds)


def dataset_folders(root: Path, names: list[str] | None = None, max_points: int = 5000) -> list[Path]:
    """The dataset folders under ``root`` (sorted; only ``names`` if given) with at most ``max_points`` points."""
    if not root.is_dir():
        raise FileNotFoundError(f"no UCI data folder at {root}")
    folders = sorted(p for p in root.iterdir() if (p / f"{p.name}.txt").is_file())
    if names:
        unknown = sorted(set(names) - {p.name for p in folders})
        if unknown:
            raise ValueError(f"unknown datasets under {root}: {', '.join(unknown)}")
        folders = [p for p in folders if p.name in names]
    def usable(info: dict[str, str]) -> bool:  # small enough, and no separate test file
        return int(info["n_patrons1"]) <= max_points and "n_patrons2" not in info

    return [folder for folder in folders if usable(read_info(folder))]


# --- kernels -------------------------------------------------------------------------------------
def paper_network(depth: int, fix: int, bias_variance: float = 0.0) -> L.Serial:
    """ReLU MLP with ``depth`` hidden layers, σw² = 2, σb² = ``bias_variance`` (paper: 0), the bottom ``fix`` Dense layers frozen."""
    if not 0 <= fix <= depth:
        raise ValueError(f"fix must be in 0..depth={depth}, got {fix}")
    layers: list[L.Layer] = []
    for i in range(depth):
        layers += [L.Dense(weight_variance=2.0, bias_variance=bias_variance, trainable=i >= fix), L.ReLU()]
    layers.append(L.Dense(weight_variance=2.0, bias_variance=bias_variance, trainable=depth >= fix))
    return L.serial(*layers)


def paper_scale(depth: int, num_features: int) -> float:
    """d / 2^(depth+1): the paper's kernel is gpntk's (Neural Tangents') σw² = 2 NTK times this."""
    return num_features / 2.0 ** (depth + 1)


def paper_kernels(x: torch.Tensor, max_depth: int) -> dict[tuple[int, int], np.ndarray]:
    """``{(depth, fix): K}`` for depth < ``max_depth``, fix ≤ depth: the paper's 15 kernels (N, N) on ``x``."""
    kernels = {}
    with torch.no_grad():
        for depth in range(max_depth):
            scale = paper_scale(depth, x.shape[1])
            for fix in range(depth + 1):
                kernel = gpntk.NTKKernel(paper_network(depth, fix))
                kernels[depth, fix] = (kernel(x).to_dense() * scale).numpy()
    return kernels


# --- the SVM protocol ----------------------------------------------------------------------------
SVM_MAX_ITER = 10**7
SVM_STOPPED = {"fits": 0, "stopped": 0}  # SVM fits so far, and those stopped at the iteration cap


def svm_accuracy(
    kernel: np.ndarray, y: np.ndarray, train: list[int], test: list[int], c: float, max_iter: int = SVM_MAX_ITER
) -> float:
    """Test accuracy (%) of ``SVC(kernel="precomputed", C=c)`` fitted on ``train``.

    libsvm's solver is stopped after ``max_iter`` iterations (-1: never; the original libsvm caps
    at 10⁷ too). Only nearly hard-margin fits of the linear kernel (depth 0) at C ≥ 10³ on larger
    datasets get there, where an uncapped solve can take hours; they are counted in
    ``SVM_STOPPED``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import SVC

    model = SVC(kernel="precomputed", C=c, cache_size=2000, max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(kernel[np.ix_(train, train)], y[train])
    SVM_STOPPED["fits"] += 1
    SVM_STOPPED["stopped"] += any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return 100.0 * float(np.mean(model.predict(kernel[np.ix_(test, train)]) == y[test]))


@dataclass
class Result:
    method: str
    validation: float  # accuracy (%) of the chosen hyperparameters on the validation split
    test: float  # mean test accuracy (%) over the k-fold pairs
    chosen: str


def svm_protocol(data: Dataset, kernels: dict[tuple[int, int], np.ndarray]) -> Result:
    """Choose (depth, fix, C) on the validation split, report the mean k-fold test accuracy."""
    y = data.y.numpy()
    best = (-1.0, None)
    for key, kernel in kernels.items():  # insertion order: depth, then fix
        for c in C_GRID:
            accuracy = svm_accuracy(kernel, y, data.train, data.validation, c)
            if accuracy > best[0]:
                best = (accuracy, (key, c))
    (depth, fix), c = best[1]
    tests = [svm_accuracy(kernels[depth, fix], y, train, test, c) for train, test in data.folds]
    return Result("svm", best[0], statistics.fmean(tests), f"depth={depth} fix={fix} C={c:g}")


# --- gpntk's trained-ensemble classifier ---------------------------------------------------------
@dataclass(frozen=True)
class EnsembleChoice:
    """One setting of the trained-ensemble classifier."""

    depth: int
    fix: int  # frozen bottom Dense layers; fix = depth: only the readout is trained (the "nngp" regime)
    bias: float  # σb² of every Dense layer
    ridge: float  # diag_reg relative to the mean diagonal of the training kernel
    steps: float  # gradient steps at the largest stable learning rate (math.inf: converged)

    @property
    def regime(self) -> str:
        return "nngp" if self.fix == self.depth else "ntk"

    def __str__(self) -> str:
        return (f"depth={self.depth} fix={self.fix} ({self.regime}) σb²={self.bias:g} t={self.steps:.3g} "
                f"ridge={self.ridge:g}")


def ensemble_scores(
    data: Dataset, depth: int, fix: int, bias: float, ridges: tuple[float, ...], steps: tuple[float, ...],
    train: list[int], test: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy (%) and mean squared error of the ensemble mean on ``test``, ``(R, T)`` each.

    The ensemble is trained on ``train`` (one-hot targets) and evaluated for each ridge and time.
    One :class:`gpntk.TrainedEnsemble` (one eigendecomposition of the training kernel) serves
    every ridge (:meth:`~gpntk.TrainedEnsemble.with_diag_reg`) and every time.
    """
    regime = "nngp" if fix == depth else "ntk"
    net = paper_network(depth, fix if regime == "ntk" else 0, bias)
    x_train, x_test, y_test = data.x[train], data.x[test], data.y[test]
    targets = torch.nn.functional.one_hot(data.y[train], data.classes).to(torch.float64)
    test_targets = torch.nn.functional.one_hot(y_test, data.classes).to(torch.float64)
    kernel = (gpntk.NNGPKernel if regime == "nngp" else gpntk.NTKKernel)(net)
    with torch.no_grad():
        scale = kernel(x_train, diag=True).mean().item()
    base = gpntk.TrainedEnsemble(net, x_train, targets, learning_rate=1.0, diag_reg=0.0)
    accuracies, errors = [], []
    for ridge in ridges:
        post = base.with_diag_reg(ridge * scale)
        times = torch.tensor(steps, dtype=torch.float64) * post.max_learning_rate(regime)
        with warnings.catch_warnings():  # ridgeless at t = ∞ is the pseudo-inverse, one of the choices
            warnings.filterwarnings("ignore", "the training kernel is numerically singular", RuntimeWarning)
            mean = post.mean(x_test, times, regime=regime)  # (T, m, classes)
        accuracies.append(100.0 * (mean.argmax(-1) == y_test).double().mean(-1))
        errors.append((mean - test_targets).square().sum(-1).mean(-1))
    return torch.stack(accuracies), torch.stack(errors)


def ensemble_protocol(
    data: Dataset, max_depth: int, ridges: tuple[float, ...] = DEFAULT_RIDGES,
    biases: tuple[float, ...] = DEFAULT_BIASES, steps: tuple[float, ...] = STEP_GRID,
) -> Result:
    """Choose (depth, fix, σb², diag_reg, t) on the validation split, report the mean k-fold test accuracy.

    The choice minimises the validation squared error of the ensemble mean against the one-hot
    labels (the loss the networks are trained on; the first minimum in the order depth, fix, σb²,
    ridge, t). Accuracy on a validation split of a few dozen points ties between many settings
    and jumps by whole points; the squared error ranks them smoothly.
    """
    best: tuple[float, float, EnsembleChoice | None] = (-1.0, math.inf, None)
    for depth in range(max_depth):
        for fix in range(depth + 1):
            for bias in biases:
                accuracy, error = ensemble_scores(data, depth, fix, bias, ridges, steps, data.train, data.validation)
                accuracy, error = accuracy.flatten(), error.flatten()
                i = int(error.argmin())
                if error[i] < best[1]:
                    r, t = divmod(i, len(steps))
                    choice = EnsembleChoice(depth, fix, bias, ridges[r], steps[t])
                    best = (accuracy[i].item(), error[i].item(), choice)
    choice = best[2]
    tests = [
        ensemble_scores(data, choice.depth, choice.fix, choice.bias, (choice.ridge,), (choice.steps,), tr, te)[0]
        .item()
        for tr, te in data.folds
    ]
    return Result("ensemble", best[0], statistics.fmean(tests), str(choice))


# --- the run -------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar on stderr: done/total, elapsed time, the current item."""

    def __init__(self, total: int, enabled: bool = True, width: int = 28):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()

    def show(self, done: int, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} {elapsed:6.0f} s  {label:<32.32s}")
        sys.stderr.flush()

    def print(self, line: str) -> None:
        """Print ``line`` to stdout, starting the bar afresh below it."""
        if self.enabled:
            sys.stderr.write("\r" + " " * (self.width + 64) + "\r")
            sys.stderr.flush()
        print(line, flush=True)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run(
    root: Path,
    names: list[str] | None = None,
    methods: tuple[str, ...] = METHODS,
    max_depth: int = 5,
    ridges: tuple[float, ...] = DEFAULT_RIDGES,
    biases: tuple[float, ...] = DEFAULT_BIASES,
    max_points: int = 5000,
    progress: bool = True,
    csv_path: Path | None = None,
) -> dict[str, dict[str, Result]]:
    """Run the protocol on every dataset; print the table and averages; return ``{dataset: {method: Result}}``."""
    folders = dataset_folders(root, names, max_points)
    header = f"{'dataset':<28s} {'N':>5s} {'d':>4s} {'c':>3s}"
    for method in methods:
        header += f" {method + ' val':>13s} {method + ' test':>14s}"
    print(header + "  chosen")
    results: dict[str, dict[str, Result]] = {}
    rows = []
    bar = ProgressBar(len(folders), progress)
    for i, folder in enumerate(folders):
        bar.show(i, folder.name)
        started = time.perf_counter()
        data = read_dataset(folder)
        results[data.name] = {}
        if "svm" in methods:
            results[data.name]["svm"] = svm_protocol(data, paper_kernels(data.x, max_depth))
        if "ensemble" in methods:
            results[data.name]["ensemble"] = ensemble_protocol(data, max_depth, ridges, biases)
        seconds = time.perf_counter() - started
        line = f"{data.name:<28s} {data.num_points:>5d} {data.num_features:>4d} {data.classes:>3d}"
        for method in methods:
            r = results[data.name][method]
            line += f" {r.validation:13.2f} {r.test:14.2f}"
            rows.append([data.name, data.num_points, data.num_features, data.classes, method,
                         f"{r.validation:.4f}", f"{r.test:.4f}", r.chosen, f"{seconds:.1f}"])
        line += "  " + " | ".join(f"{m}: {results[data.name][m].chosen}" for m in methods)
        bar.print(line)
        bar.show(i + 1, folder.name)
    bar.close()
    print()
    print(f"average test accuracy over {len(results)} datasets:")
    for method in methods:
        tests = [r[method].test for r in results.values()]
        spread = statistics.pstdev(tests) if len(tests) > 1 else 0.0
        print(f"  gpntk {method:<10s} {statistics.fmean(tests):6.2f} %  (± {spread:.2f} over datasets)")
    if "svm" in methods and SVM_STOPPED["stopped"]:
        print(f"  ({SVM_STOPPED['stopped']} of {SVM_STOPPED['fits']} SVM fits stopped at {SVM_MAX_ITER:.0e} iterations)")
    if len(results) == 90:
        for name, value in PUBLISHED.items():
            print(f"  published {name:<24s} {value:6.2f} %")
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["dataset", "N", "d", "classes", "method", "validation", "test", "chosen", "seconds"])
            writer.writerows(rows)
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, Result]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("data", type=Path, help="folder holding the 90 dataset folders (e.g. ../shared/data/uci)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--datasets", nargs="+", default=None, help="only these dataset names")
    parser.add_argument("--max-depth", type=int, default=5, help="hidden layers 0..max-depth-1 (paper: 5)")
    parser.add_argument("--ridges", type=float, nargs="+", default=list(DEFAULT_RIDGES),
                        help="ensemble diag_reg grid, relative to the mean kernel diagonal")
    parser.add_argument("--bias-variances", type=float, nargs="+", default=list(DEFAULT_BIASES),
                        help="ensemble σb² grid (the paper's networks have no bias: 0)")
    parser.add_argument("--max-points", type=int, default=5000, help="skip larger datasets (paper: 5000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-dataset rows here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.max_depth < 1:
        parser.error("--max-depth must be at least 1")
    if any(r < 0 or not math.isfinite(r) for r in args.ridges):
        parser.error("--ridges must be non-negative and finite")
    if any(b < 0 or not math.isfinite(b) for b in args.bias_variances):
        parser.error("--bias-variances must be non-negative and finite")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args.data, args.datasets, tuple(args.methods), args.max_depth, tuple(args.ridges),
               tuple(args.bias_variances), args.max_points, not args.no_progress, args.csv)


if __name__ == "__main__":
    main()
