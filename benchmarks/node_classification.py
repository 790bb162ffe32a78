"""GCN-NTK and GCN-NNGP node classification on Cora and Citeseer (the public Planetoid split).

    .venv/bin/python benchmarks/node_classification.py --output node_classification.json
    .venv/bin/python benchmarks/node_classification.py --quick --datasets cora      # seconds

Data: Cora and Citeseer with the public Planetoid split (Yang, Cohen & Salakhutdinov 2016; 20
labelled nodes per class, 500 validation and 1000 test nodes), read by
``benchmarks/graph_data.py`` (:func:`load_planetoid`) from ``../shared/data/graphs/planetoid``.
Node features are the binary bag-of-words rows as they are (``--features row`` divides each row by
its sum, as Kipf & Welling's and Sabanayagam et al.'s code do); the graph is the undirected
citation graph without self-loops (``--self-loops`` adds them).

Kernels: the infinite-width GCN of Sabanayagam, Esser & Ghoshdastidar ("Analysis of convolutions,
non-linearity and depth in graph neural networks using neural tangent kernel", TMLR 2023), with
``S`` the normalised adjacency (``row`` D⁻¹A, ``symmetric`` D^{-1/2}AD^{-1/2}, ``column`` AD⁻¹), no
biases, ReLU with c_σ = 2 (He scaling), NTK parameterization. Depth d has d hidden layers:

* ``none`` (the plain GCN): ``g_1 = S X W_1``, ``g_l = S φ(g_{l-1}) W_l`` (l = 2..d+1), output
  ``f = g_{d+1}``, i.e. ``(Aggregate → Dense → ReLU) × d → Aggregate → Dense``; depth 1 has the
  two aggregations of Kipf & Welling's 2-layer GCN;
* ``jk`` (jumping knowledge, Xu et al. 2018, as a sum of readouts like Du et al.'s GNTK): the same
  hidden layers, read out after every one of them, ``f = Σ_{l=1..d} S φ(g_l) W'_l``;
* ``skip-pc`` (Sabanayagam et al.'s Skip-PC): ``H_0 = X W_0`` with a fixed random ``W_0`` (not
  trained), and ``g_l = S (√2 φ(g_{l-1}) + H_0) W_l`` for l ≥ 2, so every layer sees the input
  again. At infinite width the two summands are uncorrelated, so ``S(√2 φ(g) + H_0) W`` has the
  NNGP and NTK of ``S √2 φ(g) W + S H_0 W'`` with an independent ``W'``. gpntk refuses the first
  form (:func:`skip_pc_tied`: a ``FanInSum`` of two branches without an affine layer at their
  end), so :func:`skip_pc` builds the second. (Until gpntk's ``FanInSum`` kept the "graph nodes"
  flag of its branches, an ``Aggregate`` after it was refused and Skip-PC ran only at depth 1; the
  sweep still records any ``ArchitectureError`` instead of a result.)

Both the NTK Θ and the NNGP Σ of the whole graph (N × N) come from one pass of
:func:`gpntk.kernels.dense.nngp_and_ntk` with the node indices of all nodes.

Classifiers (nothing is chosen on the test nodes):

* kernel regression: ``K(·, X) (K(X, X) + r I)⁻¹ Y`` on the one-hot labels ``Y`` of the training
  nodes (the t = ∞ mean of the trained ensemble), class = arg-max, with ``r = --ridge`` (default
  1e-6) times the largest entry of K (the protocol of the shared data's README). As a second
  reading the ridge is also chosen on the 500 validation nodes from :data:`RIDGE_GRID` (times
  max K; the first best) and the depth on the validation nodes (the first best);
* a GPyTorch ``ExactGP`` on node indices (``--gp-kernels``, ``--gp-depths``, row normalisation):
  one GP per class on the one-hot targets with a shared GCN kernel (a batch of ``k`` GPs with a
  constant mean each and one Gaussian noise), whose Dense layers' σw² and σb² (biases on here),
  the noise and the means are learned by Adam (``--gp-steps``, ``--gp-lr``) on the exact marginal
  likelihood of the training nodes; every step recomputes the kernel of the whole graph. The
  prediction is the arg-max of the posterior means.

Reference points: a trained 2-layer GCN, 81.5 % (Cora) / 70.3 % (Citeseer) (Kipf & Welling 2017,
``graph_data.PUBLISHED``), and 79 % for the depth-1 GCN-NTK with row normalisation (the shared
data's README).

Timing: each kernel of the sweep is timed once (``--threads`` torch threads, default 1); then the
Cora depth-4 plain GCN kernel (NTK and NNGP, row normalisation) is timed ``--timing-repeats``
times with each of ``--timing-threads`` (default 1 and 2), median reported. ``--quick`` runs a small
subgraph (the training nodes, 100 validation and 100 test nodes and their neighbours), depths 1-2
and 2 GP steps: a smoke test, its accuracies are not those of the full graphs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import gpntk
from gpntk import layers as L
from gpntk.errors import ArchitectureError
from gpntk.kernels.dense import nngp_and_ntk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = ROOT.parent / "shared" / "data" / "graphs" / "planetoid"
NORMALIZATIONS = ("row", "symmetric", "column")
SKIPS = ("none", "jk", "skip-pc")
KERNELS = ("ntk", "nngp")
DEFAULT_RIDGE = 1e-6
#: ridges relative to max K for the validation-selected reading
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: c_σ of ReLU (He scaling): the weight variance of every Dense layer fed by a ReLU
C_SIGMA = 2.0
#: the quick mode's validation and test nodes (with the training nodes and all their neighbours)
QUICK_NODES = 100
#: the depth-4 Cora timing of the issue
TIMING_DEPTH = 4


def _graph_data():
    """``benchmarks/graph_data.py`` as a module (the Planetoid reader and the published numbers)."""
    if "graph_data" in sys.modules:
        return sys.modules["graph_data"]
    spec = importlib.util.spec_from_file_location("graph_data", Path(__file__).resolve().parent / "graph_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["graph_data"] = module
    spec.loader.exec_module(module)
    return module


# --- data ----------------------------------------------------------------------------------------
@dataclass
class NodeData:
    """One citation graph: features (N, F), edges (2, E) both directions, labels (N,) (-1 unlabelled), the split."""

    name: str
    features: np.ndarray
    edges: np.ndarray
    labels: np.ndarray
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def load(name: str, root: Path = DEFAULT_ROOT, features: str = "raw") -> NodeData:
    """Cora or Citeseer with the public split; ``features="row"`` divides each feature row by its sum."""
    data = _graph_data().load_planetoid(name, root)
    x = data.features
    if features == "row":
        x = x / np.maximum(x.sum(1, keepdims=True), 1.0)
    elif features != "raw":
        raise ValueError(f"features must be 'raw' or 'row', got {features!r}")
    return NodeData(data.name, x, data.edges, data.labels, data.train_index, data.val_index, data.test_index)


def subgraph(data: NodeData, keep: np.ndarray) -> NodeData:
    """The subgraph induced by the distinct nodes ``keep``, node ``keep[i]`` becoming node ``i``.

    The split is restricted to those nodes (in its own order).
    """
    keep = np.asarray(keep, dtype=np.int64)
    if len(np.unique(keep)) != len(keep):
        raise ValueError("subgraph: the nodes to keep must be distinct")
    new = np.full(data.num_nodes, -1)
    new[keep] = np.arange(len(keep))
    inside = (new[data.edges[0]] >= 0) & (new[data.edges[1]] >= 0)

    def kept(index: np.ndarray) -> np.ndarray:
        return new[index[new[index] >= 0]]

    return NodeData(data.name, data.features[keep], new[data.edges[:, inside]], data.labels[keep],
                    kept(data.train_index), kept(data.val_index), kept(data.test_index))


def quick_subgraph(data: NodeData, nodes: int = QUICK_NODES) -> NodeData:
    """The training nodes, the first ``nodes`` validation and test nodes, and all their neighbours (smoke tests).

    Only those seeds keep their roles in the split (the neighbours are there as context).
    """
    seeds = np.concatenate([data.train_index, data.val_index[:nodes], data.test_index[:nodes]])
    keep = np.unique(np.concatenate([seeds, data.edges[1][np.isin(data.edges[0], seeds)]]))
    small = subgraph(data, keep)
    return replace(small, train_index=np.searchsorted(keep, data.train_index),
                   val_index=np.searchsorted(keep, data.val_index[:nodes]),
                   test_index=np.searchsorted(keep, data.test_index[:nodes]))


def node_graph(data: NodeData, normalization: str, self_loops: bool = False) -> gpntk.NodeGraph:
    """The :class:`gpntk.NodeGraph` of ``data`` with the propagation matrix ``S`` of ``normalization``."""
    return gpntk.NodeGraph.from_edges(data.features, data.edges, normalization=normalization, self_loops=self_loops)


def node_indices(n: int) -> torch.Tensor:
    """Rows ``(n, 1)`` of node indices 0..n-1, float64: what node-level kernels take."""
    return torch.arange(n, dtype=torch.float64)[:, None]


# --- architectures -------------------------------------------------------------------------------
def gcn(depth: int) -> L.Layer:
    """The plain GCN of depth ``depth``: ``(Aggregate → Dense → ReLU) × depth → Aggregate → Dense``, no biases.

    The first Dense (on the features) has σw² = 1, every later one σw² = c_σ = 2. Without biases the
    kernels are homogeneous in every σw², so these values only scale them.
    """
    layers: list[L.Layer] = [L.Aggregate(), L.Dense(1.0, 0.0), L.ReLU()]
    for _ in range(depth - 1):
        layers += [L.Aggregate(), L.Dense(C_SIGMA, 0.0), L.ReLU()]
    return L.serial(*layers, L.Aggregate(), L.Dense(C_SIGMA, 0.0))


def jumping_knowledge(depth: int) -> L.Layer:
    """The GCN of :func:`gcn` read out from every hidden layer: ``f = Σ_{l=1..depth} S φ(g_l) W_l'``.

    Jumping knowledge (Xu et al. 2018) with a sum of independent readouts (as in Du et al.'s
    GNTK): the NNGP and the NTK are the sums of those of the plain GCNs of depths 1..depth (whose
    hidden layers it shares). Every readout has σw² = c_σ = 2.
    """
    def readout() -> L.Layer:
        return L.serial(L.Aggregate(), L.Dense(C_SIGMA, 0.0))

    rest = readout()
    for _ in range(depth - 1):
        rest = L.serial(L.FanOut(2), L.parallel(readout(), L.serial(L.Aggregate(), L.Dense(C_SIGMA, 0.0), L.ReLU(), rest)),
                        L.FanInSum())
    return L.serial(L.Aggregate(), L.Dense(1.0, 0.0), L.ReLU(), rest)


def skip_pc(depth: int) -> L.Layer:
    r"""Skip-PC of depth ``depth`` at infinite width: every layer after the first also aggregates ``H_0 = X W_0``.

    ``H_0``: a frozen ``Dense(1)`` (its weights are not trained, so it adds nothing to the NTK).
    ``T_1 = φ(S H_0 W_1)``; ``T_l = φ(S T_{l-1} W_l + S H_0 W_l')``; output ``S T_d W + S H_0 W'``.
    ``W`` has σw² = c_σ = 2 and ``W'`` σw² = 1, so that with the ReLU scaled by √c_σ the sum is
    Sabanayagam et al.'s ``S(√c_σ φ(g) + H_0) W``: Σ_l = S (2 E_{l-1} + Σ_0) Sᵀ,
    Θ_l = Σ_l + 2 S (Ė_{l-1} ⊙ Θ_{l-1}) Sᵀ, with E, Ė the ReLU expectations under Σ_{l-1}.
    """
    def from_h0() -> L.Layer:  # S H_0 W' (its own weights: a fresh function, independent of the other branch)
        return L.serial(L.Aggregate(), L.Dense(1.0, 0.0))

    block: L.Layer = L.serial(L.Aggregate(), L.Dense(1.0, 0.0), L.ReLU())
    for _ in range(depth - 1):
        block = L.serial(L.FanOut(2), L.parallel(L.serial(block, L.Aggregate(), L.Dense(C_SIGMA, 0.0)), from_h0()),
                         L.FanInSum(), L.ReLU())
    return L.serial(L.Dense(1.0, 0.0, trainable=False), L.FanOut(2),
                    L.parallel(L.serial(block, L.Aggregate(), L.Dense(C_SIGMA, 0.0)), from_h0()), L.FanInSum())


def skip_pc_tied(depth: int) -> L.Layer:
    """Skip-PC as written, ``S(√2 φ(g) + H_0) W`` with one ``W``: gpntk refuses it (``ArchitectureError``).

    The branches ``H_0`` (an ``Identity``) and ``√2 φ(g)`` both end without an affine layer; gpntk
    cannot know that their cross-covariance vanishes at infinite width and refuses the sum.
    """
    def scaled_relu() -> L.Layer:  # √c_σ φ
        return L.ABReLU(0.0, C_SIGMA**0.5)

    block: L.Layer = L.serial(L.Aggregate(), L.Dense(1.0, 0.0), scaled_relu())
    for _ in range(depth - 1):
        block = L.serial(L.FanOut(2), L.parallel(block, L.Identity()), L.FanInSum(), L.Aggregate(), L.Dense(1.0, 0.0),
                         scaled_relu())
    return L.serial(L.Dense(1.0, 0.0, trainable=False), L.FanOut(2), L.parallel(block, L.Identity()), L.FanInSum(),
                    L.Aggregate(), L.Dense(1.0, 0.0))


NETWORKS: dict[str, Callable[[int], L.Layer]] = {"none": gcn, "jk": jumping_knowledge, "skip-pc": skip_pc}


def gp_network(
    depth: int, first_variance: float = 1.0, bias_variance: float = 0.1
) -> tuple[L.Layer, dict[str, L.Dense]]:
    """The GCN of :func:`gcn` with biases and learnable hyperparameters, for the ExactGP, and its Dense layers.

    Three Dense objects: ``"first"`` (on the features), ``"hidden"`` (shared by the hidden layers;
    absent at depth 1) and ``"readout"``; each has its own σw² and σb² (GPyTorch parameters).
    ``first_variance`` is the first layer's initial σw² (:func:`run_gp` starts it at C / mean ‖x‖²,
    unit pre-activation variance); every σb² starts at ``bias_variance``.
    """
    dense = {"first": L.Dense(first_variance, bias_variance), "hidden": L.Dense(C_SIGMA, bias_variance),
             "readout": L.Dense(C_SIGMA, bias_variance)}
    layers: list[L.Layer] = [L.Aggregate(), dense["first"], L.ReLU()]
    for _ in range(depth - 1):
        layers += [L.Aggregate(), dense["hidden"], L.ReLU()]
    if depth == 1:
        del dense["hidden"]
    return L.serial(*layers, L.Aggregate(), dense["readout"]), dense


# --- kernels and classifiers ---------------------------------------------------------------------
def graph_kernels(net: L.Layer, graph: gpntk.NodeGraph) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ, Θ)``, the NNGP and the NTK between all N nodes (N × N each), from one pass of the recursion."""
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(net, node_indices(graph.nodes), input_shape=graph)
    assert ntk is not None
    return nngp.numpy(), ntk.numpy()


def timed_graph_kernels(net: L.Layer, graph: gpntk.NodeGraph) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`graph_kernels` and its wall-clock seconds."""
    start = time.perf_counter()
    nngp, ntk = graph_kernels(net, graph)
    return nngp, ntk, time.perf_counter() - start


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[labels]


def kernel_regression_scores(kernel: np.ndarray, train: np.ndarray, targets: np.ndarray, ridge: float) -> np.ndarray:
    """Scores of every node, ``K(·, X) (K(X, X) + r I)⁻¹ Y`` (N, k), with ``r = ridge · max K``.

    The t = ∞ mean of :class:`gpntk.TrainedEnsemble` with ``diag_reg = r`` (the infinite ensemble
    trained to convergence on ``Y``).
    """
    k_train = kernel[np.ix_(train, train)]
    reg = ridge * float(kernel.max())
    weights = np.linalg.solve(k_train + reg * np.eye(len(train)), targets)
    return kernel[:, train] @ weights


def accuracy(scores: np.ndarray, labels: np.ndarray, index: np.ndarray) -> float:
    """Fraction of the nodes ``index`` whose arg-max score is their label."""
    return float(np.mean(np.argmax(scores[index], axis=1) == labels[index]))


def classify(kernel: np.ndarray, data: NodeData, ridge: float) -> dict[str, object]:
    """Validation and test accuracy at ``ridge``, and at the ridge of :data:`RIDGE_GRID` best on validation."""
    targets = one_hot(data.labels[data.train_index], data.num_classes)
    readings = []
    for r in RIDGE_GRID:
        scores = kernel_regression_scores(kernel, data.train_index, targets, r)
        readings.append((accuracy(scores, data.labels, data.val_index), accuracy(scores, data.labels, data.test_index)))
    fixed = kernel_regression_scores(kernel, data.train_index, targets, ridge)
    best = int(np.argmax([val for val, _ in readings]))
    return {
        "val": accuracy(fixed, data.labels, data.val_index),
        "test": accuracy(fixed, data.labels, data.test_index),
        "val_ridge": RIDGE_GRID[best],
        "val_ridge_val": readings[best][0],
        "val_ridge_test": readings[best][1],
    }


def sweep(data: NodeData, normalizations: list[str], skips: list[str], depths: list[int], ridge: float,
          self_loops: bool, log: Callable[[str], None] = print) -> list[dict[str, object]]:
    """Kernel regression with the NTK and the NNGP for every normalisation, skip and depth."""
    rows = []
    for normalization in normalizations:
        graph = node_graph(data, normalization, self_loops)
        for skip in skips:
            for depth in depths:
                row: dict[str, object] = {"dataset": data.name, "normalization": normalization, "skip": skip,
                                          "depth": depth}
                try:
                    net = NETWORKS[skip](depth)
                except ArchitectureError as error:  # recorded, not worked around (see skip_pc)
                    rows.append({**row, "error": f"ArchitectureError: {error}"})
                    log(f"{data.name:<9s} {normalization:<9s} {skip:<8s} depth {depth}: refused by gpntk: {error}")
                    continue
                nngp, ntk, seconds = timed_graph_kernels(net, graph)
                row["seconds"] = seconds
                for name, kernel in (("ntk", ntk), ("nngp", nngp)):
                    row[name] = classify(kernel, data, ridge)
                rows.append(row)
                log(f"{data.name:<9s} {normalization:<9s} {skip:<8s} depth {depth}: NTK {row['ntk']['test']:.3f} "
                    f"NNGP {row['nngp']['test']:.3f} (val-ridge NTK {row['ntk']['val_ridge_test']:.3f}) "
                    f"{seconds:6.2f} s")
    return rows


def depth_by_validation(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (dataset, normalisation, skip, kernel): the depth with the best validation accuracy (fixed ridge)."""
    out = []
    keys = sorted({(r["dataset"], r["normalization"], r["skip"]) for r in rows}, key=str)
    for dataset, normalization, skip in keys:
        group = [r for r in rows if (r["dataset"], r["normalization"], r["skip"]) == (dataset, normalization, skip)
                 and "error" not in r]
        if not group:
            continue
        for kernel in KERNELS:
            best = max(group, key=lambda r: (r[kernel]["val"], -r["depth"]))  # the shallowest of the best
            out.append({"dataset": dataset, "normalization": normalization, "skip": skip, "kernel": kernel,
                        "depth": best["depth"], "val": best[kernel]["val"], "test": best[kernel]["test"]})
    return out


def time_kernel(data: NodeData, depth: int, threads: list[int], repeats: int) -> dict[str, object]:
    """Seconds of the plain GCN's NTK + NNGP (row normalisation, one pass) at ``depth``, per thread count."""
    graph = node_graph(data, "row")
    net = gcn(depth)
    before = torch.get_num_threads()
    out: dict[str, object] = {"dataset": data.name, "nodes": data.num_nodes, "depth": depth, "normalization": "row",
                              "repeats": repeats, "seconds": {}}
    try:
        for n in threads:
            torch.set_num_threads(n)
            seconds = [timed_graph_kernels(net, graph)[2] for _ in range(repeats)]
            out["seconds"][str(n)] = {"all": seconds, "median": statistics.median(seconds)}
    finally:
        torch.set_num_threads(before)
    return out


# --- the ExactGP ---------------------------------------------------------------------------------
def run_gp(data: NodeData, kind: str, depth: int, steps: int, lr: float, normalization: str = "row",
           self_loops: bool = False, log: Callable[[str], None] = print) -> dict[str, object]:
    """A batch of one-vs-rest ExactGPs on node indices with a shared, learned GCN kernel; test accuracy.

    ``kind``: ``"nngp"`` or ``"ntk"``. The targets are the one-hot labels of the training nodes
    (``k`` GPs, one constant mean each, one shared Gaussian noise); Adam maximises the sum of the
    ``k`` exact marginal log-likelihoods (divided by the number of training nodes) for ``steps``
    steps. Nothing is chosen on the validation or test nodes.
    """
    import gpytorch

    graph = node_graph(data, normalization, self_loops)
    classes = data.num_classes
    train_x = node_indices(data.num_nodes)[data.train_index]
    train_y = torch.from_numpy(one_hot(data.labels[data.train_index], classes).T.copy())  # (k, n)
    mean_square = float((data.features**2).sum(1).mean()) / data.features.shape[1]  # mean of x·x/C
    net, dense = gp_network(depth, first_variance=1.0 / mean_square)
    kernel_class = gpntk.NTKKernel if kind == "ntk" else gpntk.NNGPKernel

    class ClassGPs(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(train_x, train_y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([classes]))
            self.covar_module = kernel_class(net, input_shape=graph)

        def forward(self, x: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))

    model = ClassGPs().double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses, seconds = [], []
    model.train()
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y).sum() / len(train_x)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    model.eval()
    start = time.perf_counter()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        scores = model(node_indices(data.num_nodes)).mean.T.numpy()  # (N, k)
    predict_seconds = time.perf_counter() - start
    hyper = {f"{name}.{what}": float(getattr(layer, what)) for name, layer in dense.items()
             for what in ("weight_variance", "bias_variance")}
    hyper["noise"] = float(model.likelihood.noise)
    result = {
        "dataset": data.name, "kernel": kind, "depth": depth, "normalization": normalization, "steps": steps,
        "lr": lr, "val": accuracy(scores, data.labels, data.val_index),
        "test": accuracy(scores, data.labels, data.test_index), "losses": losses,
        "seconds_per_step_median": statistics.median(seconds) if seconds else None,
        "train_seconds": sum(seconds), "predict_seconds": predict_seconds, "hyperparameters": hyper,
    }
    log(f"{data.name:<9s} ExactGP {kind} depth {depth} ({steps} Adam steps): test {result['test']:.3f} "
        f"val {result['val']:.3f}, {sum(seconds):.0f} s training")
    return result


# --- the run -------------------------------------------------------------------------------------
def table(rows: list[dict[str, object]], kernel: str, reading: str = "test") -> str:
    """Test accuracy (%) per depth (columns) and (dataset, normalisation, skip) (rows); ``ref``: refused by gpntk."""
    depths = sorted({r["depth"] for r in rows})
    lines = [f"{kernel.upper():<5s} {'dataset':<9s} {'S':<9s} {'skip':<8s} "
             + " ".join(f"{d:>5d}" for d in depths)]
    keys = list(dict.fromkeys((r["dataset"], r["normalization"], r["skip"]) for r in rows))
    for key in keys:
        values = {r["depth"]: r[kernel][reading] if "error" not in r else None
                  for r in rows if (r["dataset"], r["normalization"], r["skip"]) == key}
        lines.append(f"{'':<5s} {key[0]:<9s} {key[1]:<9s} {key[2]:<8s} "
                     + " ".join("    -" if d not in values else "  ref" if values[d] is None
                                else f"{100 * values[d]:5.1f}" for d in depths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of cora.npz and citeseer.npz")
    parser.add_argument("--datasets", nargs="+", choices=("cora", "citeseer"), default=["cora", "citeseer"])
    parser.add_argument("--normalizations", nargs="+", choices=NORMALIZATIONS, default=list(NORMALIZATIONS))
    parser.add_argument("--skips", nargs="+", choices=SKIPS, default=list(SKIPS))
    parser.add_argument("--depths", nargs="+", type=int, default=None, help="default 1..8 (1 2 with --quick)")
    parser.add_argument("--features", choices=("raw", "row"), default="raw",
                        help="raw binary bag-of-words, or each row divided by its sum")
    parser.add_argument("--self-loops", action="store_true", help="A + I before the normalisation")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="kernel regression ridge relative to max K")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sweep and the GP")
    parser.add_argument("--timing-threads", nargs="*", type=int, default=[1, 2],
                        help="thread counts of the depth-4 timing (none: no timing)")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--gp-kernels", nargs="*", choices=KERNELS, default=["nngp"], help="none: no ExactGP")
    parser.add_argument("--gp-depths", nargs="+", type=int, default=[1])
    parser.add_argument("--gp-steps", type=int, default=None, help="Adam steps (default 30, 2 with --quick)")
    parser.add_argument("--gp-lr", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true",
                        help="a small subgraph, depths 1 2, 2 GP steps, 1 timing repeat: a smoke test")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    depths = args.depths or ([1, 2] if args.quick else list(range(1, 9)))
    gp_steps = args.gp_steps if args.gp_steps is not None else (2 if args.quick else 30)
    timing_repeats = 1 if args.quick else args.timing_repeats
    if min(depths + args.gp_depths) < 1:
        parser.error("--depths and --gp-depths must be at least 1")
    if args.threads < 1 or timing_repeats < 1 or any(n < 1 for n in args.timing_threads):
        parser.error("--threads, --timing-threads and --timing-repeats must be at least 1")
    if gp_steps < 0 or not args.gp_lr > 0:
        parser.error("--gp-steps must be non-negative and --gp-lr positive")
    if not (args.ridge > 0 and np.isfinite(args.ridge)):
        parser.error("--ridge must be positive and finite")
    torch.set_num_threads(args.threads)
    published = _graph_data().PUBLISHED
    report: dict[str, object] = {
        "quick": args.quick, "features": args.features, "self_loops": args.self_loops, "ridge": args.ridge,
        "ridge_grid": list(RIDGE_GRID), "threads": args.threads, "depths": depths, "datasets": {}, "sweep": [],
        "gp": [], "timing": None,
        "reference": {"gcn_trained": {name: published[name].mean for name in args.datasets},
                      "gcn_trained_citation": published["cora"].citation,
                      "gcn_ntk_depth1_row_readme": {"cora": 79.0}},
    }
    report["load_average_at_start"] = list(os.getloadavg())
    start = time.perf_counter()
    loaded = {}
    for name in args.datasets:
        data = load(name, args.root, args.features)
        if args.quick:
            data = quick_subgraph(data)
        loaded[name] = data
        report["datasets"][name] = {"nodes": data.num_nodes, "features": int(data.features.shape[1]),
                                    "edges": int(data.edges.shape[1]), "classes": data.num_classes,
                                    "train": len(data.train_index), "val": len(data.val_index),
                                    "test": len(data.test_index)}
        print(f"{name}: {data.num_nodes} nodes, {data.edges.shape[1]} directed edges, {data.num_classes} classes, "
              f"{len(data.train_index)}/{len(data.val_index)}/{len(data.test_index)} train/val/test"
              + (" (quick subgraph)" if args.quick else ""), flush=True)
        report["sweep"] += sweep(data, args.normalizations, args.skips, depths, args.ridge, args.self_loops,
                                 log=lambda line: print(line, flush=True))
    report["depth_by_validation"] = depth_by_validation(report["sweep"])
    if args.timing_threads:
        data = loaded["cora"] if "cora" in loaded else next(iter(loaded.values()))
        report["timing"] = time_kernel(data, TIMING_DEPTH, args.timing_threads, timing_repeats)
        torch.set_num_threads(args.threads)
        print(f"{data.name} depth-{TIMING_DEPTH} GCN NTK + NNGP of {data.num_nodes} nodes: "
              + ", ".join(f"{v['median']:.2f} s on {n} thread(s)" for n, v in report["timing"]["seconds"].items()),
              flush=True)
    for name, data in loaded.items():
        for kind in args.gp_kernels:
            for depth in args.gp_depths:
                report["gp"].append(run_gp(data, kind, depth, gp_steps, args.gp_lr, self_loops=args.self_loops,
                                           log=lambda line: print(line, flush=True)))
    report["total_seconds"] = time.perf_counter() - start
    report["load_average_at_end"] = list(os.getloadavg())  # other jobs on the machine slow every timing
    for kernel in KERNELS:
        print(table(report["sweep"], kernel))
    for name in args.datasets:
        print(f"trained 2-layer GCN (Kipf & Welling 2017) on {name}: {published[name].mean} %")
    report["versions"] = {"gpntk": gpntk.__version__, "torch": torch.__version__, "numpy": np.__version__,
                          "python": platform.python_version(), "machine": platform.machine()}
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
