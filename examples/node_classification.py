"""Node classification on Cora with the neural tangent kernel of an infinitely wide graph convolutional network.

    python examples/node_classification.py                  # quick: a subgraph of Cora, seconds
    python examples/node_classification.py --full           # the whole graph (2708 nodes), a few minutes
    python examples/node_classification.py --figure docs/images/node_classification.png

Cora (the Planetoid split: 140 labelled nodes, 20 per class, 500 validation and 1000 test nodes;
read from ``../shared/data/graphs/planetoid`` by ``benchmarks/graph_data.py``) is a citation graph
of 2708 papers with a bag-of-words feature vector each and one of 7 topics. A GCN (Kipf & Welling
2017) of depth d aggregates the neighbours' features d + 1 times,
``f = S φ(... S φ(S X W_1) W_2 ...) W_{d+1}``, with ``S = D⁻¹A`` the row-normalised adjacency. Its
infinite-width kernels (Sabanayagam et al., TMLR 2023) are gpntk kernels on node indices:

1. kernel regression with the NTK at a few depths (the infinite ensemble trained to t = ∞);
2. a GPyTorch ExactGP on node indices whose GCN hyperparameters (σw², σb² of each Dense layer) are
   learned on the marginal likelihood of the training nodes;
3. the trained ensemble at finite training times t: the mean and the variance of the test nodes'
   outputs (:class:`gpntk.TrainedEnsemble`);
4. a figure of the test accuracy against depth, from ``benchmarks/results/node_classification.json``
   (``benchmarks/node_classification.py``, all normalisations and skips, Cora and Citeseer) when it
   exists, else from the depths computed here.

The quick mode works on a subgraph (the training nodes, 100 validation and 100 test nodes, and
their neighbours): its accuracies are not those of the whole graph. See docs/node-classification.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

import gpntk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FIGURE = "node_classification.png"
RESULTS = ROOT / "benchmarks" / "results" / "node_classification.json"


def load_benchmark():
    """``benchmarks/node_classification.py`` as a module: the data, the GCN architectures, the classifier."""
    if "node_classification" in sys.modules:
        return sys.modules["node_classification"]
    path = ROOT / "benchmarks" / "node_classification.py"
    spec = importlib.util.spec_from_file_location("node_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["node_classification"] = module
    spec.loader.exec_module(module)
    return module


def exact_gp_accuracy(bench, data, graph: gpntk.NodeGraph, depth: int, steps: int) -> float:
    """Test accuracy of one GP per class (shared NNGP kernel of a GCN with learned σw², σb²) on the one-hot labels."""
    import gpytorch

    nodes = torch.arange(data.num_nodes, dtype=torch.float64)[:, None]  # node indices: the kernel's inputs
    train_x = nodes[data.train_index]
    train_y = torch.nn.functional.one_hot(torch.from_numpy(data.labels[data.train_index]), data.num_classes).T.double()
    scale = float((data.features**2).sum(1).mean()) / data.features.shape[1]  # mean x·x/C of the input kernel
    net, dense = bench.gp_network(depth, first_variance=1.0 / scale)  # Dense layers with learnable σw², σb²

    class ClassGPs(gpytorch.models.ExactGP):  # a batch of 7 GPs, one per class, sharing the kernel
        def __init__(self):
            super().__init__(train_x, train_y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([data.num_classes]))
            self.covar_module = gpntk.NNGPKernel(net, input_shape=graph)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = ClassGPs().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):  # every step computes the kernel of the whole graph
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y).sum() / len(train_x)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        scores = model(nodes[data.test_index]).mean.T  # (1000, 7) posterior means
    first = dense["first"]
    print(f"  learned: first layer σw² {float(first.weight_variance):.3g}, σb² {float(first.bias_variance):.3g}; "
          f"noise {float(model.likelihood.noise):.3g}")
    return float((scores.argmax(1).numpy() == data.labels[data.test_index]).mean())


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--full", action="store_true", help="the whole graph (default: a subgraph, seconds)")
    parser.add_argument("--figure", default=DEFAULT_FIGURE, help=f"where to save the figure (default {DEFAULT_FIGURE})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="benchmark JSON for the figure, if it exists")
    # parse_known_args: the test suite runs this file with runpy, under pytest's own command line
    args, _ = parser.parse_known_args(argv)
    bench = load_benchmark()
    if not (bench.DEFAULT_ROOT / "cora.npz").is_file():
        print(f"no Cora data under {bench.DEFAULT_ROOT} (see benchmarks/graph_data.py): nothing to run")
        return {}
    data = bench.load("cora")
    if not args.full:
        data = bench.quick_subgraph(data)
    print(f"Cora{'' if args.full else ' (quick subgraph)'}: {data.num_nodes} nodes, {data.num_classes} classes, "
          f"{len(data.train_index)} training and {len(data.test_index)} test nodes")

    # the graph: features and edges, S = D⁻¹A (row normalisation, no self-loops)
    graph = gpntk.NodeGraph.from_edges(data.features, data.edges, normalization="row")
    nodes = torch.arange(graph.nodes, dtype=torch.float64)[:, None]
    train, test = data.train_index, data.test_index
    targets = np.eye(data.num_classes)[data.labels[train]]

    # 1. NTK kernel regression at a few depths
    depths = [1, 2, 4, 8] if args.full else [1, 2, 3]
    accuracies = {}
    for depth in depths:
        kernel = gpntk.NTKKernel(bench.gcn(depth), input_shape=graph)
        with torch.no_grad():
            k = kernel(nodes).to_dense().numpy()  # (N, N): one pass over the whole graph
        reg = 1e-6 * k.max()
        scores = k[:, train] @ np.linalg.solve(k[np.ix_(train, train)] + reg * np.eye(len(train)), targets)
        accuracies[depth] = float((scores[test].argmax(1) == data.labels[test]).mean())
        print(f"NTK kernel regression, depth {depth}: test accuracy {accuracies[depth]:.3f}")

    # 2. an ExactGP whose GCN hyperparameters are learned on the training nodes
    gp_accuracy = exact_gp_accuracy(bench, data, graph, depth=1, steps=30 if args.full else 5)
    print(f"ExactGP (GCN NNGP, depth 1, learned σw², σb², noise): test accuracy {gp_accuracy:.3f}")

    # 3. the ensemble of depth-2 GCNs trained by gradient descent for a finite time t
    net = bench.gcn(2)
    post = gpntk.TrainedEnsemble(net, nodes[train], torch.from_numpy(targets), learning_rate=1.0,
                                 diag_reg=0.0, input_shape=graph)
    with torch.no_grad():
        theta_train = gpntk.NTKKernel(net, input_shape=graph)(nodes[train]).to_dense()
        top = float(torch.linalg.eigvalsh(theta_train)[-1])
        # τ = η t / (n k) is the time of the gradient flow; the fastest mode settles once τ·λ_max ≈ 1
        times = torch.tensor([0.1, 1.0, 10.0, 100.0, 1e4]) * len(train) * data.num_classes / top
        mean, var = post.moments(nodes[test], times, regime="ntk", diag=True)  # (T, m, k), (T, m)
    ensemble = {}
    for t, m, v in zip(times.tolist(), mean, var):
        acc = float((m.argmax(1).numpy() == data.labels[test]).mean())
        ensemble[t] = acc
        print(f"trained ensemble at τ·λ_max = {t * top / (len(train) * data.num_classes):g}: test accuracy "
              f"{acc:.3f}, mean output variance {float(v.mean()):.3g}")

    save_figure(args.results, accuracies, args.figure)
    print(f"figure saved to {args.figure}")
    return {"kernel_regression": accuracies, "exact_gp": gp_accuracy, "ensemble": ensemble}


def save_figure(results: Path, quick: dict[int, float], path: str) -> None:
    """Test accuracy against depth: the benchmark's sweep if ``results`` exists, else this run's NTK accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(results).is_file():
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.plot(list(quick), [100 * a for a in quick.values()], "o-", label="NTK, S = D⁻¹A (this run)")
        ax.axhline(81.5, color="gray", ls=":", label="trained 2-layer GCN (81.5 %)")
        ax.set(xlabel="depth d", ylabel="test accuracy (%)", title="Cora (quick subgraph)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    report = json.loads(Path(results).read_text())
    names = list(report["datasets"])
    readings = {"test": f"ridge {report['ridge']:g}·max K", "val_ridge_test": "ridge chosen on the validation nodes"}
    fig, axes = plt.subplots(len(readings), len(names), figsize=(5.2 * len(names), 3.3 * len(readings)),
                             squeeze=False, sharex=True)
    colors = {"row": "tab:blue", "symmetric": "tab:orange", "column": "tab:green"}
    styles = {"none": "-", "jk": "--", "skip-pc": ":"}
    for row_axes, (reading, label) in zip(axes, readings.items()):
        for ax, name in zip(row_axes, names):
            for normalization, color in colors.items():
                for skip, style in styles.items():
                    rows = [r for r in report["sweep"] if (r["dataset"], r["normalization"], r["skip"])
                            == (name, normalization, skip) and "error" not in r]
                    if rows:
                        ax.plot([r["depth"] for r in rows], [100 * r["ntk"][reading] for r in rows], style,
                                marker="s" if len(rows) == 1 else "o", ms=4, color=color,
                                label=f"S {normalization}, {'no skip' if skip == 'none' else skip}")
            for gp in report.get("gp", []):
                if gp["dataset"] == name:
                    ax.plot([gp["depth"]], [100 * gp["test"]], "k*", ms=10,
                            label=f"ExactGP, learned hyperparameters ({gp['kernel'].upper()})")
            published = report["reference"]["gcn_trained"].get(name)
            if published is not None:
                ax.axhline(published, color="gray", ls=":", label="trained 2-layer GCN (Kipf & Welling)")
            ax.set(ylabel="test accuracy (%)", title=f"{name}, NTK kernel regression, {label}"
                   + (" (quick)" if report.get("quick") else ""))
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("depth d (hidden layers)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
