"""The graph neural tangent kernel (Du et al. 2019) classifying molecules: MUTAG with an SVM and a trained ensemble.

    python examples/graph_classification.py                 # quick: 1 and 2 blocks, about 10 s on one core
    python examples/graph_classification.py --full          # 1 to 5 blocks of two ReLU layers
    python examples/graph_classification.py --figure out.png

MUTAG (188 nitro compounds, mutagenic or not; the GIN copy with its ten published folds, read by
``benchmarks/graph_data.py`` from ``../shared/data/graphs/tu``): each node is an atom, one-hot by its
type, each edge a bond. The GNTK is the NTK of an infinitely wide graph network of ``blocks`` BLOCKs
(aggregation over the neighbours and the node itself, then ReLU layers) with a sum readout and jumping
knowledge (:func:`gpntk.layers.gntk`); the aggregation is in the adjacency we pass, here ``A + I``.

1. For each depth, :func:`gpntk.graph_kernel_matrices` computes the 188 × 188 NTK Gram matrix, and an
   SVM on the normalised Gram (``SVC(kernel="precomputed")``, C chosen by 3-fold cross-validation on
   each training fold, so nothing is tuned on the test fold) is scored on the ten folds.
2. The same network as a trained ensemble on padded graphs: :class:`gpntk.GraphInputs` packs every graph
   into one row (features, adjacency, node mask); :class:`gpntk.TrainedEnsemble` gives the mean of the
   infinite ensemble trained to t = ∞ on the one-hot labels (kernel regression) on fold 1, and
   :class:`gpntk.NTKKernel` is the same kernel as a GPyTorch kernel.

Prints the accuracies and saves a figure (accuracy against depth; the Gram matrix with the graphs sorted
by class). Du et al.'s full protocol on all six datasets is ``benchmarks/graph_classification.py``
(``docs/graph-classification.md``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch

import gpntk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIGURE = "graph-classification.png"
C_VALUES = [10.0**k for k in range(-2, 5)]


def load_benchmark():
    """``benchmarks/graph_classification.py`` as a module: the TU reader and the self-loop helpers."""
    path = ROOT / "benchmarks" / "graph_classification.py"
    spec = importlib.util.spec_from_file_location("graph_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["graph_classification"] = module
    spec.loader.exec_module(module)
    return module


def svm_accuracies(gram: np.ndarray, labels: np.ndarray, folds) -> np.ndarray:
    """Test accuracy on each fold of an SVM on the normalised Gram, C by 3-fold CV on the training graphs."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    d = np.sqrt(np.diag(gram))
    k = gram / np.outer(d, d)  # K_ij / sqrt(K_ii K_jj)
    scores = []
    for train, test in folds:
        search = GridSearchCV(SVC(kernel="precomputed"), {"C": C_VALUES}, cv=3)
        search.fit(k[np.ix_(train, train)], labels[train])
        scores.append(search.score(k[np.ix_(test, train)], labels[test]))
    return np.array(scores)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--full", action="store_true", help="1 to 5 blocks of two ReLU layers (about 2 minutes)")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help=f"where to save the figure (default {DEFAULT_FIGURE})")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    blocks, mlp_layers = ((1, 2, 3, 4, 5), 2) if args.full else ((1, 2), 1)
    torch.set_num_threads(1)

    bench = load_benchmark()
    if not (bench.DEFAULT_DATA / "MUTAG").is_dir():
        print(f"MUTAG is not at {bench.DEFAULT_DATA} (the benchmark data next to the repository): nothing to do")
        return {}
    data = bench.graph_data.load_tu("MUTAG", bench.DEFAULT_DATA)
    graphs = bench.with_self_loops(data.graphs, "sum")  # (features (n, 9), A + I)
    labels = data.labels
    print(f"MUTAG: {len(graphs)} graphs of {data.num_nodes.min()}-{data.num_nodes.max()} atoms, "
          f"{np.bincount(labels).tolist()} per class")

    # 1. Gram matrices and SVMs
    results, grams = {}, {}
    for depth in blocks:
        net = gpntk.layers.gntk(depth, mlp_layers)
        _, ntk = gpntk.graph_kernel_matrices(net, graphs)  # (188, 188) NNGP and NTK Gram matrices
        grams[depth] = ntk.numpy()
        results[depth] = svm_accuracies(grams[depth], labels, data.folds)
        print(f"GNTK, {depth} block(s) of {mlp_layers} ReLU layer(s): SVM accuracy "
              f"{results[depth].mean():.3f} ± {results[depth].std():.3f} over the 10 folds")

    # 2. the same network as GPyTorch kernel and trained ensemble, on graphs padded to 28 nodes
    depth = blocks[0]
    net = gpntk.layers.gntk(depth, mlp_layers)
    fmt, x = gpntk.GraphInputs.from_graphs(graphs)  # one row per graph: features, adjacency, node mask
    kernel = gpntk.NTKKernel(net, input_shape=fmt)
    with torch.no_grad():
        block = kernel(x[:4]).to_dense().numpy()
    print(f"NTKKernel on padded graphs = graph_kernel_matrices: largest relative difference "
          f"{np.max(np.abs(block - grams[depth][:4, :4]) / grams[depth][:4, :4]):.1e}")
    train, test = data.folds[0]
    targets = torch.from_numpy(np.eye(2)[labels[train]] - 0.5)
    ridge = 1e-4 * float(np.mean(np.diag(grams[depth])[train]))  # as in examples/sequence_classification.py
    post = gpntk.TrainedEnsemble(net, x[train], targets, learning_rate=1.0, diag_reg=ridge, input_shape=fmt)
    with torch.no_grad():
        mean = post.mean(x[test], math.inf)  # (19, 2): kernel regression on the one-hot labels
    ensemble = float((mean.argmax(-1).numpy() == labels[test]).mean())
    print(f"trained ensemble ({depth} blocks, t = inf) on fold 1: accuracy {ensemble:.3f} "
          f"(SVM on that fold: {results[depth][0]:.3f})")

    save_figure(results, grams[blocks[-1]], labels, data.num_nodes, mlp_layers, args.figure)
    print(f"figure saved to {args.figure}")
    return {"svm": {d: float(a.mean()) for d, a in results.items()}, "ensemble_fold_1": ensemble}


def save_figure(results: dict[int, np.ndarray], gram: np.ndarray, labels: np.ndarray, nodes: np.ndarray,
                mlp_layers: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    depths = list(results)
    means = [results[d].mean() for d in depths]
    stds = [results[d].std() for d in depths]
    left.errorbar(depths, means, yerr=stds, marker="o", capsize=4, label="GNTK + SVM (10 folds, mean ± std)")
    left.axhline(0.90, color="tab:gray", ls="--", label="Du et al. 2019 (best of their grid)")
    left.set(xlabel=f"blocks (each: aggregation + {mlp_layers} ReLU layer(s))", ylabel="test accuracy",
             ylim=(0.6, 1.0), xticks=depths, title="MUTAG: accuracy against depth")
    left.legend(fontsize=8, loc="lower right")
    order = np.lexsort((nodes, labels))  # by class, then by size
    d = np.sqrt(np.diag(gram))
    image = right.imshow((gram / np.outer(d, d))[np.ix_(order, order)], cmap="viridis")
    boundary = int(np.sum(labels == 0)) - 0.5
    right.axhline(boundary, color="white", lw=1)
    right.axvline(boundary, color="white", lw=1)
    for c, centre in enumerate((boundary / 2, (boundary + len(labels)) / 2)):
        right.text(centre, -3, f"class {c}", ha="center", va="bottom", fontsize=8)
    right.set(xlabel="graphs by class, then by size", ylabel="graph", xticks=[], yticks=[])
    right.set_title(f"normalised GNTK Gram, {depths[-1]} blocks", pad=16)
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
