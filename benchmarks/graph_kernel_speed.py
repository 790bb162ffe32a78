"""Speed and memory of gpntk's graph kernels against Neural Tangents and the dense-work floor.

Two cases, float64, NNGP and NTK together (one pass):

* **node level** (``--depths``, default 2 and 4): the GCN kernel between all nodes of Cora
  (2708 nodes, 1433 features; row-normalised adjacency D⁻¹A without self-loops). ``depth`` counts
  the aggregations: ``depth - 1`` blocks ``Aggregate, Dense(2, 0), ReLU`` and the readout
  ``Aggregate, Dense(1, 0)`` (depth 2 is Kipf & Welling's two-layer GCN). Measurements:

  - ``gpntk``:      ``nngp_and_ntk(net, nodes, input_shape=graph)`` on one :class:`gpntk.NodeGraph`
    (aggregations as sparse products), all 2708 node indices: the steady state of a kernel on a
    fixed graph, where the input kernel X Xᵀ / C is cached by the ``NodeGraph`` after its first
    evaluation;
  - ``gpntk-cold``: the same on a new ``NodeGraph`` every call (its input kernel computed again):
    the like-for-like comparison with NT, which computes X Xᵀ on every call;
  - ``nt``:         Neural Tangents' ``jax.jit(kernel_fn)`` of the same network with
    ``stax.Aggregate()`` on one "graph" of 2708 nodes, ``x`` ``(1, N, C)`` and the dense pattern
    ``(1, N, N)`` = Aᵀ (NT's ``pattern[b, j, i]`` is our ``A[i, j]``); its kernel ``(1, 1, N, N)``
    is the kernel between the nodes;
  - ``floor``:      X Xᵀ / C and the sparse products A M Aᵀ (CSR, two products and one transposed
    copy each) of every aggregation: Σ at each of the ``depth`` aggregations, Θ at each but the
    first (Θ = 0 before the first ``Dense``): ``2·depth - 1`` of them;
  - ``floor-agg``:  the aggregations alone (the floor of ``gpntk`` with its cached input kernel).

* **graph level** (``--graph-blocks``, default 2): Du et al.'s graph NTK ``gpntk.layers.gntk(2, 2)``
  (jumping knowledge, sum readout, adjacency A + I: their "sum" aggregation) on all 188 MUTAG
  graphs (10-28 nodes, 9 one-hot features), the 188 x 188 Gram matrices:

  - ``gpntk-buckets``: ``gpntk.graph_kernel_matrices(net, graphs)`` (graphs bucketed by size, each
    pair of buckets padded to the larger one);
  - ``gpntk-padded``:  ``nngp_and_ntk(net, x, input_shape=fmt)`` on ``GraphInputs`` rows of all
    graphs padded to 28 nodes (rows built before timing);
  - ``nt-padded``:     NT on the same padded batch, ``x`` ``(188, 28, 9)``, pattern ``(188, 28, 28)``
    = Aᵀ, the network ``stax.serial(Aggregate, (Dense(1, √2), Relu) x 2, ..., GlobalSumPool,
    Dense(1, 1))`` with jumping knowledge written as ``FanOut(2)`` / ``parallel(readout, rest)`` /
    ``FanInSum`` around every depth (the readouts have independent weights, so the kernels of the
    depths add up, as in gpntk's ``gntk``). Padding nodes have no features and no edges, and
    without biases their state stays 0, so sum pooling over all 28 "nodes" is exact;
  - ``floor-padded``:  the input kernel of all node pairs and the batched matmuls A_g M A_hᵀ of
    the aggregations (Σ at each, Θ at each but the first) over the pairs of graphs (g, h) padded to
    28 nodes, in chunks of ``--floor-chunk`` graphs, only chunk pairs on and above the diagonal
    (the Gram matrix is symmetric);
  - ``floor-buckets``: the same with graphs grouped by size (sizes within a factor 1.25, as
    gpntk's buckets) and each group padded to its own largest graph, pairs of groups rectangular.

The floors are the dense work no implementation of these kernels avoids (the elementwise
activation maps come on top); they are timed in torch with the same threads.

Method. One worker process per library (gpntk, NT, floor), all started before the timing: each
loads the data, builds its network and makes one untimed warm-up call per measurement (reported as
"first call"; for NT the jit compile), and saves the kernels. Before any timing the kernels are
compared (``max|a - b| / max|b|``) and the script stops if they disagree (``CHECKS``). At node
level gpntk and NT must agree to 1e-10 on the regular entries and to 1e-7 on all: the irregular
entries are the diagonal and the pairs whose value depends on a ReLU input of correlation 1,
where NT takes the arccos of a rounded correlation (about 1e-8 off, ``../shared/reference/README.md``)
and every later aggregation carries that error to the neighbouring pairs (``irregular_pairs``).
At graph level the limit is 1e-8 on all entries (identical atoms of different molecules are such
pairs too). Then ``--repeats`` rounds, each calling every measurement once in turn (gpntk, NT,
floor), so that all peers see the same load on this shared machine; the tables give medians,
quartiles and the ratios of medians. The workers wait (blocked on a pipe) while another runs.

Threads: ``--threads k`` pins every worker to the first k CPUs (sched_setaffinity), sets
OMP/MKL/OPENBLAS_NUM_THREADS = k and ``torch.set_num_threads(k)``; NT gets
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=k"`` (which keeps
XLA's Eigen matmuls on one thread; ``--nt-multithread-eigen`` leaves XLA_FLAGS alone for k > 1,
with the affinity only: on this loaded 2-core machine NT was then slower, 20 s against 15 s at
node depth 2, using 0.8 CPU seconds per second). The workers inherit the environment: with
another process on one of the cores, torch's OpenMP threads wait for their descheduled sibling at
every parallel region, which made gpntk's graph-level kernel 6-9x slower on 2 threads than on 1
(``docs/performance.md``, "Graph kernels"); ``OMP_WAIT_POLICY=PASSIVE`` softens that.

Memory: per call, the peak resident set (VmHWM, reset before the call) minus the resident set at
the start of the call; the tables give the largest over the timed calls (``_memory.py``).

    .venv/bin/python benchmarks/graph_kernel_speed.py --threads 1 --json graph-speed-1.json
    .venv/bin/python benchmarks/graph_kernel_speed.py --threads 2 --cases graph --repeats 9
    .venv/bin/python benchmarks/graph_kernel_speed.py --synthetic --peers gpntk floor   # tiny, no NT

``--synthetic`` replaces Cora and MUTAG by small random graphs (60 nodes; 12 graphs of 4-10
nodes), for a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # _memory and graph_data live next to this script (also under the NT venv)
    sys.path.insert(0, str(HERE))

from _memory import peak_rss_kib, reset_peak_rss, status_kib  # noqa: E402

DEFAULT_NT_PYTHON = "/work/main/.venv-nt/bin/python"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "graphs"
PEERS = ("gpntk", "nt", "floor")
#: the measurements of each worker, per case, in the order they run within a round
MEASUREMENTS = {
    "node": {"gpntk": ("gpntk", "gpntk-cold"), "nt": ("nt",), "floor": ("floor", "floor-agg")},
    "graph": {"gpntk": ("gpntk-buckets", "gpntk-padded"), "nt": ("nt-padded",),
              "floor": ("floor-padded", "floor-buckets")},
}
#: (a, b, limit on all entries, limit on the regular entries) of the agreement checks, before timing. At node
#: level the irregular entries are the diagonal and the pairs whose value depends on a ReLU input of correlation
#: 1 (``irregular_pairs``: the diagonal, e.g. two leaves of one hub, and whatever the next aggregations mix
#: them into); there the ReLU tangent (π - arccos ρ)/π has an infinite slope and NT takes the arccos of a
#: rounded ρ, accurate to about 1e-8 (``../shared/reference/README.md``).
#: At graph level the regular entries are the off-diagonal ones, and the limit is 1e-8 on all: identical atoms of
#: different molecules have correlation 1 there too (docs/graphs.md, "Numerics").
CHECKS = {
    "node": [("gpntk", "nt", 1e-7, 1e-10), ("gpntk-cold", "gpntk", 1e-14, 1e-14)],
    "graph": [("gpntk-padded", "nt-padded", 1e-8, 1e-8), ("gpntk-buckets", "gpntk-padded", 1e-8, 1e-8)],
}
#: pairs whose ReLU input has 1 - ρ below this are degenerate (above it, a rounding of 1e-16 in ρ moves the
#: arccos by at most 1e-16 / √(2·1e-10) ≈ 7e-12)
DEGENERATE_GAP = 1e-10
WEIGHT_VARIANCE = 2.0  # every hidden Dense: σw² = 2, no bias (c_σ = 2 of the graph NTK)


# ---------------------------------------------------------------------------------------------
# data (NumPy only: read by the orchestrator, saved to a temporary .npz for the workers)
def row_normalised(edges: np.ndarray, n: int) -> np.ndarray:
    """The dense ``(n, n)`` adjacency D⁻¹A of an edge list ``(2, E)`` (edge k: ``edges[0, k]`` → ``edges[1, k]``).

    Row ``i`` lists what node ``i`` receives, divided by their number; rows without edges stay 0.
    """
    a = np.zeros((n, n))
    np.add.at(a, (edges[1], edges[0]), 1.0)
    degree = a.sum(1, keepdims=True)
    return np.divide(a, degree, out=np.zeros_like(a), where=degree > 0)


def synthetic_node_data(nodes: int = 60, channels: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A small random connected graph: 0/1 features ``(nodes, channels)``, symmetric edges ``(2, E)``."""
    rng = np.random.default_rng(seed)
    features = (rng.random((nodes, channels)) < 0.3).astype(np.float64)
    features[np.arange(nodes), rng.integers(0, channels, nodes)] = 1.0  # no all-zero node
    tree = {(int(rng.integers(0, v)), v) for v in range(1, nodes)}  # connected: no node without edges
    pairs = tree | {(int(i), int(j)) for i, j in rng.integers(0, nodes, (nodes, 2)) if i != j}  # degree ~4, as Cora
    edges = np.array(sorted(pairs | {(j, i) for i, j in pairs}), dtype=np.int64).T
    return {"features": features, "edges": edges}


def synthetic_graphs(count: int = 12, channels: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` random connected graphs of 4-10 nodes, one-hot tags ``(n_g, channels)``, 0/1 symmetric adjacency."""
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(count):
        n = int(rng.integers(4, 11))
        a = np.zeros((n, n))
        for v in range(1, n):  # a random tree, then a few more edges
            u = int(rng.integers(0, v))
            a[u, v] = a[v, u] = 1.0
        for u, v in rng.integers(0, n, (n // 2, 2)):
            if u != v:
                a[u, v] = a[v, u] = 1.0
        graphs.append((np.eye(channels)[rng.integers(0, channels, n)], a))
    return graphs


def load_node_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Features ``(N, C)``, edges ``(2, E)`` and the dense row-normalised adjacency ``(N, N)``."""
    if args.synthetic:
        data = synthetic_node_data(seed=args.seed)
    else:
        from graph_data import load_planetoid

        cora = load_planetoid("cora", Path(args.data) / "planetoid")
        data = {"features": cora.features, "edges": cora.edges}
    data["adjacency"] = row_normalised(data["edges"], data["features"].shape[0])
    return data


def load_graph_data(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """MUTAG (or synthetic graphs) with adjacency A + I, padded: features ``(n, N, C)``, adjacency ``(n, N, N)``.

    Also ``sizes`` ``(n,)``, the numbers of real nodes.
    """
    if args.synthetic:
        graphs = synthetic_graphs(seed=args.seed)
    else:
        from graph_data import load_tu

        graphs = load_tu("MUTAG", Path(args.data) / "tu").graphs
    sizes = np.array([f.shape[0] for f, _ in graphs])
    n_max, channels = int(sizes.max()), graphs[0][0].shape[1]
    features = np.zeros((len(graphs), n_max, channels))
    adjacency = np.zeros((len(graphs), n_max, n_max))
    for g, (f, a) in enumerate(graphs):
        k = f.shape[0]
        features[g, :k] = f
        adjacency[g, :k, :k] = a + np.eye(k)  # Du et al.'s sum aggregation: A + I
    return {"features": features, "adjacency": adjacency, "sizes": sizes}


def unpadded(data: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The graphs of a padded batch as ``(features (n_g, C), adjacency (n_g, n_g))`` pairs."""
    return [(f[:k], a[:k, :k]) for f, a, k in zip(data["features"], data["adjacency"], data["sizes"])]


def size_groups(sizes: Sequence[int], growth: float = 1.25, chunk: int = 32) -> list[np.ndarray]:
    """Indices of graphs grouped by size (within a factor ``growth`` of the group's smallest), at most ``chunk`` each.

    Groups are in increasing size; every index appears exactly once.
    """
    order = np.argsort(np.asarray(sizes), kind="stable")
    groups: list[list[int]] = []
    smallest = None
    for g in order.tolist():
        if groups and sizes[g] <= growth * smallest and len(groups[-1]) < chunk:
            groups[-1].append(g)
        else:
            groups.append([g])
            smallest = sizes[g]
    return [np.array(group, dtype=np.int64) for group in groups]


# ---------------------------------------------------------------------------------------------
# the measured functions, torch side (gpntk and the floors); each builder returns name -> callable
def gcn(depth: int):
    """gpntk's GCN of ``depth`` aggregations: ``(Aggregate, Dense(2, 0), ReLU) x (depth-1), Aggregate, Dense(1, 0)``."""
    from gpntk import layers as L

    layers = []
    for _ in range(depth - 1):
        layers += [L.Aggregate(), L.Dense(WEIGHT_VARIANCE, 0.0), L.ReLU()]
    return L.serial(*layers, L.Aggregate(), L.Dense(1.0, 0.0))


def gpntk_node_functions(data: dict[str, np.ndarray], depth: int) -> dict[str, Callable[[], tuple]]:
    """``gpntk`` (one NodeGraph, cached input kernel) and ``gpntk-cold`` (a new NodeGraph per call)."""
    import torch

    import gpntk
    from gpntk.kernels.dense import nngp_and_ntk

    features = torch.from_numpy(data["features"])
    adjacency = torch.from_numpy(data["adjacency"]).to_sparse_coo().coalesce()
    graph = gpntk.NodeGraph(features, adjacency)
    nodes = torch.arange(graph.nodes, dtype=torch.float64)[:, None]
    net = gcn(depth).double()

    def steady() -> tuple:
        with torch.no_grad():
            return nngp_and_ntk(net, nodes, input_shape=graph)

    def cold() -> tuple:
        with torch.no_grad():
            return nngp_and_ntk(net, nodes, input_shape=gpntk.NodeGraph(features, adjacency))

    return {"gpntk": steady, "gpntk-cold": cold}


def gpntk_graph_functions(data: dict[str, np.ndarray], blocks: int, mlp_layers: int,
                          jumping_knowledge: bool) -> dict[str, Callable[[], tuple]]:
    """``gpntk-buckets`` (graph_kernel_matrices) and ``gpntk-padded`` (GraphInputs rows padded to the largest graph)."""
    import torch

    import gpntk
    from gpntk.kernels.dense import nngp_and_ntk

    net = gpntk.layers.gntk(blocks, mlp_layers, jumping_knowledge=jumping_knowledge).double()
    graphs = [(torch.from_numpy(f), torch.from_numpy(a)) for f, a in unpadded(data)]
    fmt = gpntk.GraphInputs(nodes=data["features"].shape[1], channels=data["features"].shape[2])
    mask = (np.arange(fmt.nodes)[None, :] < data["sizes"][:, None]).astype(np.float64)
    x = fmt.pack(data["features"], data["adjacency"], mask)

    def buckets() -> tuple:
        return gpntk.graph_kernel_matrices(net, graphs)

    def padded() -> tuple:
        with torch.no_grad():
            return nngp_and_ntk(net, x, input_shape=fmt)

    return {"gpntk-buckets": buckets, "gpntk-padded": padded}


def floor_node_functions(data: dict[str, np.ndarray], depth: int) -> dict[str, Callable[[], tuple]]:
    """``floor``: X Xᵀ / C and ``2·depth - 1`` sparse sandwiches A M Aᵀ; ``floor-agg``: the sandwiches alone."""
    import warnings

    import torch

    x = torch.from_numpy(data["features"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta"
        a = torch.from_numpy(data["adjacency"]).to_sparse_csr()

    def sandwich(m):  # A m Aᵀ = (A (A m)ᵀ)ᵀ: two CSR products with contiguous dense operands
        return (a @ (a @ m).T.contiguous()).T

    def aggregations(s0):
        sigma, theta = sandwich(s0), None
        for _ in range(depth - 1):
            sigma, theta = sandwich(sigma), sandwich(sigma if theta is None else theta)
        return sigma, theta

    s0 = x @ x.T / x.shape[1]
    return {"floor": lambda: aggregations(x @ x.T / x.shape[1]), "floor-agg": lambda: aggregations(s0)}


def aggregate_pairs(s, a1, a2):
    """``A1_g S_gh A2_hᵀ`` for every pair of graphs ``(g, h)`` of two chunks, as one ``(n1·N1, n2·N2)`` matrix.

    ``s`` ``(n1·N1, n2·N2)`` holds the node pairs, graph-major (row ``g·N1 + u``: node ``u`` of graph
    ``g``); ``a1`` ``(n1, N1, N1)``, ``a2`` ``(n2, N2, N2)``. Two batched matmuls, left
    ``(n1, N1, N1) @ (n1, N1, n2·N2)`` and right ``(n2, n1·N1, N2) @ (n2, N2, N2)``, and two copies
    that bring the second chunk's graphs to the batch axis and back.
    """
    import torch

    n1, k1, n2, k2 = a1.shape[0], a1.shape[1], a2.shape[0], a2.shape[1]
    left = torch.bmm(a1, s.reshape(n1, k1, n2 * k2))  # (n1, N1, n2·N2)
    right = left.reshape(n1 * k1, n2, k2).permute(1, 0, 2).contiguous()  # (n2, n1·N1, N2)
    return torch.bmm(right, a2.transpose(1, 2)).permute(1, 0, 2).reshape(n1 * k1, n2 * k2)


def floor_graph(features, adjacency, sizes, groups, blocks: int) -> float:
    """The dense work of a graph-level kernel over the pairs of chunks ``(i <= j)`` of ``groups``; returns a checksum.

    Each chunk's graphs are padded to its largest; per pair of chunks, the input kernel
    ``S = X_i X_jᵀ / C`` of all their node pairs, then :func:`aggregate_pairs` ``2·blocks - 1``
    times (Σ at each aggregation, Θ at each but the first).
    """
    channels = features.shape[-1]
    parts = []
    for group in groups:
        n = int(sizes[group].max())
        parts.append((features[group, :n].reshape(-1, channels), adjacency[group, :n, :n]))
    total = 0.0
    for i, (x1, a1) in enumerate(parts):
        for x2, a2 in parts[i:]:
            s = x1 @ x2.T / channels
            for _ in range(2 * blocks - 1):
                s = aggregate_pairs(s, a1, a2)
            total += float(s[0, 0])
    return total


def floor_graph_functions(data: dict[str, np.ndarray], blocks: int, chunk: int) -> dict[str, Callable[[], float]]:
    """``floor-padded`` (all graphs padded to the largest) and ``floor-buckets`` (size groups, own padding)."""
    import torch

    features, adjacency = torch.from_numpy(data["features"]), torch.from_numpy(data["adjacency"])
    sizes = torch.from_numpy(data["sizes"])
    count = len(sizes)
    padded = [np.arange(start, min(start + chunk, count)) for start in range(0, count, chunk)]
    padded_sizes = torch.full_like(sizes, int(sizes.max()))
    grouped = size_groups(data["sizes"].tolist(), chunk=chunk)
    return {
        "floor-padded": lambda: floor_graph(features, adjacency, padded_sizes, padded, blocks),
        "floor-buckets": lambda: floor_graph(features, adjacency, sizes, grouped, blocks),
    }


# ---------------------------------------------------------------------------------------------
# the NT side (run under the NT venv: jax and neural_tangents, no torch)
def nt_functions(spec: dict, data: dict[str, np.ndarray]) -> tuple[dict[str, Callable[[], Any]], str]:
    """NT's jitted kernel functions of the case, and its versions."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    w_std = math.sqrt(WEIGHT_VARIANCE)
    get = ("nngp", "ntk")
    versions = f"neural-tangents {nt.__version__}, jax {jax.__version__}"
    if spec["case"] == "node":
        layers = []
        for _ in range(spec["depth"] - 1):
            layers += [stax.Aggregate(), stax.Dense(1, W_std=w_std), stax.Relu()]
        _, _, kernel_fn = stax.serial(*layers, stax.Aggregate(), stax.Dense(1, W_std=1.0))
        x = jnp.asarray(data["features"][None])  # one graph: (1, N, C)
        pattern = jnp.asarray(data["adjacency"].T[None])  # NT's pattern is Aᵀ: (1, N, N)
        name = "nt"
    else:
        def block():
            layers = [stax.Aggregate()]
            for _ in range(spec["mlp_layers"]):
                layers += [stax.Dense(1, W_std=w_std), stax.Relu()]
            return stax.serial(*layers)

        def readout():
            return stax.serial(stax.GlobalSumPool(), stax.Dense(1, W_std=1.0))

        if not spec["jumping_knowledge"]:
            net = stax.serial(*[block() for _ in range(spec["blocks"])], readout())
        else:  # as gpntk.layers.gntk: every depth read out by its own readout, the outputs summed
            net = stax.serial(block(), readout())
            for _ in range(spec["blocks"] - 1):
                net = stax.serial(block(), stax.FanOut(2), stax.parallel(readout(), net), stax.FanInSum())
            net = stax.serial(stax.FanOut(2), stax.parallel(readout(), net), stax.FanInSum())
        _, _, kernel_fn = net
        x = jnp.asarray(data["features"])  # (n, N, C), padded
        pattern = jnp.asarray(np.swapaxes(data["adjacency"], 1, 2))
        name = "nt-padded"
    kfn = jax.jit(kernel_fn, static_argnames="get")

    def call():
        out = kfn(x, None, get, pattern=(pattern, pattern))
        return tuple(o.block_until_ready() for o in out)

    return {name: call}, versions


# ---------------------------------------------------------------------------------------------
# worker process: warm-up, save the kernels, then timed calls on request
def _as_matrices(out: Any) -> dict[str, np.ndarray]:
    """The (NNGP, NTK) pair of a kernel call as square NumPy matrices (NT's node kernels are (1, 1, N, N))."""
    if not isinstance(out, tuple) or len(out) != 2:
        return {}
    result = {}
    for key, value in zip(("nngp", "ntk"), out):
        if value is None:
            continue
        m = np.asarray(value, dtype=np.float64)
        if m.ndim == 4:
            m = m.reshape(m.shape[-2], m.shape[-1])
        result[key] = m
    return result


def timed_call(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """One call of ``fn``: wall and CPU seconds, and its peak resident memory above the start (KiB)."""
    reset_ok = reset_peak_rss()
    base = status_kib("VmRSS") or 0
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {"wall": wall, "cpu": cpu, "peak_kib": peak_rss_kib(reset_ok) - base, "reset_ok": reset_ok}


def build_functions(role: str, spec: dict) -> tuple[dict[str, Callable[[], Any]], str, str]:
    """The measured functions of one worker, its versions and threads (the data from ``spec['data']``)."""
    with np.load(spec["data"]) as z:
        data = {k: z[k] for k in z.files}
    threads = spec["threads"]
    if role == "nt":
        fns, versions = nt_functions(spec, data)
        return fns, versions, f"XLA CPU, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    if str(ROOT) not in sys.path:  # the gpntk of this checkout
        sys.path.insert(0, str(ROOT))
    import torch

    if threads:
        torch.set_num_threads(threads)
    versions = f"torch {torch.__version__}"
    if role == "gpntk":
        import gpntk

        versions = f"gpntk {gpntk.__version__}, " + versions
        if spec["case"] == "node":
            fns = gpntk_node_functions(data, spec["depth"])
        else:
            fns = gpntk_graph_functions(data, spec["blocks"], spec["mlp_layers"], spec["jumping_knowledge"])
    elif spec["case"] == "node":
        fns = floor_node_functions(data, spec["depth"])
    else:
        fns = floor_graph_functions(data, spec["blocks"], spec["floor_chunk"])
    return fns, versions, f"torch {torch.get_num_threads()} intra-op threads"


def worker_main(role: str, spec_path: str) -> None:
    """Serve one worker: JSON lines on stdin (``{"run": name}`` or ``{"quit": true}``), replies on stdout."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(spec_path).parent
    fns, versions, threads = build_functions(role, spec)
    first = {}
    for name in spec["measurements"]:
        out, stats = timed_call(fns[name])
        first[name] = stats
        for key, matrix in _as_matrices(out).items():
            np.save(out_dir / f"{name}_{key}.npy", matrix)
        del out
    reply = {"ready": True, "first": first, "versions": versions, "threads": threads, "pid": os.getpid()}
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        out, stats = timed_call(fns[request["run"]])
        del out
        protocol.write(json.dumps(stats) + "\n")
        protocol.flush()


# ---------------------------------------------------------------------------------------------
# orchestration
class Worker:
    """A worker process pinned to the benchmark's CPUs, driven through a pipe."""

    def __init__(self, role: str, spec: dict, tmp: Path, args: argparse.Namespace):
        self.role = role
        spec_path = tmp / f"{role}_spec.json"
        spec_path.write_text(json.dumps(spec))
        python = args.nt_python if role == "nt" else args.gpntk_python
        cmd = [python, str(Path(__file__).resolve()), "--worker", role, "--spec", str(spec_path)]
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cpus = None
        if args.threads:
            k = str(args.threads)
            env.update(OMP_NUM_THREADS=k, MKL_NUM_THREADS=k, OPENBLAS_NUM_THREADS=k)
            if role == "nt" and (args.threads == 1 or not args.nt_multithread_eigen):
                env["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={k}"
            cpus = sorted(os.sched_getaffinity(0))[: args.threads]

        def pin() -> None:  # in the child before exec: its threads inherit the affinity
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.stderr = open(tmp / f"{role}.stderr", "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env, preexec_fn=pin)
        self.cmd = cmd

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            sys.stderr.write(self.stderr.read()[-5000:])
            raise SystemExit(f"the {self.role} worker died (exit {self.proc.returncode}): {' '.join(self.cmd)}")
        return json.loads(line)

    def run(self, name: str) -> dict:
        self.proc.stdin.write(json.dumps({"run": name}) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)
        self.stderr.close()


def rel_error(a: np.ndarray, b: np.ndarray, irregular: np.ndarray | None = None) -> tuple[float, float]:
    """``(max|a - b|, max |a - b| over the regular entries) / max|b|``.

    The irregular entries are the diagonal and those where ``irregular`` (a boolean matrix) is true.
    """
    if a.shape != b.shape:
        raise SystemExit(f"kernel shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    scale = max(float(np.abs(b).max()), 1e-300)
    whole = float(d.max()) / scale
    np.fill_diagonal(d, 0.0)
    if irregular is not None:
        d[irregular] = 0.0
    return whole, float(d.max()) / scale


def irregular_pairs(features: np.ndarray, adjacency: np.ndarray, depth: int) -> np.ndarray:
    """Pairs of nodes whose kernel value depends on a ReLU input of correlation 1 (boolean ``(N, N)``).

    A ReLU's tangent (π - arccos ρ)/π has an infinite slope at ρ = 1, where NT takes the arccos of
    a rounded ρ (about 1e-8 off); that happens on the diagonal and at pairs of nodes with identical
    inputs (two leaves of one hub), and every later aggregation ``A Θ Aᵀ`` carries the error to
    the pairs of their neighbours. Found by a NumPy NNGP recursion of ``gcn(depth)`` (SciPy sparse
    products, the degree-1 arc-cosine map of Cho & Saul 2009; the ``Dense`` scale σw² does not change
    a correlation): a pair is irregular if its input to some ReLU has 1 - ρ < ``DEGENERATE_GAP``
    (or involves a node of zero variance), or if a later aggregation reaches an irregular pair.
    """
    import scipy.sparse

    a = scipy.sparse.csr_array(adjacency)
    reach = scipy.sparse.csr_array((np.abs(adjacency) > 0).astype(np.float64))
    s = features @ features.T / features.shape[1]
    mask = np.zeros(s.shape, dtype=bool)
    for _ in range(depth - 1):
        s = a @ (a @ s).T  # A s Aᵀ for a symmetric s
        s = (s + s.T) / 2
        mask = (reach @ (reach @ mask.astype(np.float64)).T) > 0  # the pairs an irregular pair reaches
        d = np.sqrt(np.clip(np.diag(s), 0.0, None))
        norms = np.outer(d, d)
        rho = np.divide(s, norms, out=np.ones_like(s), where=norms > 0)
        mask |= rho >= 1.0 - DEGENERATE_GAP  # the diagonal among them
        theta = np.arccos(np.clip(rho, -1.0, 1.0))
        s = norms * (np.sin(theta) + (math.pi - theta) * np.cos(theta)) / math.pi  # σw² = 2 times the /2π map
    return (reach @ (reach @ mask.astype(np.float64)).T) > 0  # the readout's aggregation


def agreements(tmp: Path, case: str, irregular: np.ndarray | None = None) -> dict[str, dict]:
    """The checks of ``CHECKS[case]`` among the kernels the workers saved, with their limits and verdicts."""
    result = {}
    for a, b, whole_limit, regular_limit in CHECKS[case]:
        for key in ("nngp", "ntk"):
            pa, pb = tmp / f"{a}_{key}.npy", tmp / f"{b}_{key}.npy"
            if pa.exists() and pb.exists():
                whole, regular = rel_error(np.load(pa), np.load(pb), irregular)
                result[f"{a}~{b} {key}"] = {"whole": whole, "regular": regular,
                                            "limits": [whole_limit, regular_limit],
                                            "ok": whole <= whole_limit and regular <= regular_limit}
    return result


def run_case(case: dict, data: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Start the workers of one case, check their kernels agree, then time ``args.repeats`` interleaved rounds."""
    kind = case["case"]
    row: dict[str, Any] = {"case": case, "load_start": os.getloadavg(), "workers": {}, "timed": {}}
    with tempfile.TemporaryDirectory(prefix="graph_kernel_speed_") as tmp_name:
        tmp = Path(tmp_name)
        np.savez(tmp / "data.npz", **data)
        workers = []
        try:
            for role in (p for p in PEERS if p in args.peers):  # warm-ups one after the other
                names = MEASUREMENTS[kind][role]
                spec = dict(case, data=str(tmp / "data.npz"), measurements=list(names), threads=args.threads,
                            floor_chunk=args.floor_chunk)
                print(f"{_tag(case)}: starting {role} ...", end="", file=sys.stderr, flush=True)
                worker = Worker(role, spec, tmp, args)
                workers.append(worker)
                ready = worker.receive()
                row["workers"][role] = {k: ready[k] for k in ("versions", "threads")}
                for name in names:
                    row["timed"][name] = {"first": ready["first"][name], "calls": []}
                print(" first calls " + ", ".join(f"{n} {ready['first'][n]['wall']:.3g}s" for n in names),
                      file=sys.stderr, flush=True)
            irregular = None
            if kind == "node" and "nt" in args.peers:
                irregular = irregular_pairs(data["features"], data["adjacency"], case["depth"])
                np.fill_diagonal(irregular, True)
                row["regular_fraction"] = 1.0 - float(irregular.mean())
            row["agreement"] = agreements(tmp, kind, irregular)
            bad = {k: v for k, v in row["agreement"].items() if not v["ok"]}
            if bad:
                raise SystemExit(f"{_tag(case)}: kernels disagree before timing: {json.dumps(bad)}")
            for r in range(args.repeats):
                for worker in workers:
                    for name in MEASUREMENTS[kind][worker.role]:
                        row["timed"][name]["calls"].append(worker.run(name))
                print(f"{_tag(case)}: round {r + 1}/{args.repeats}: " + ", ".join(
                    f"{n} {s['calls'][-1]['wall']:.3g}s" for n, s in row["timed"].items()), file=sys.stderr, flush=True)
        finally:
            for worker in workers:
                worker.close()
    row["load_end"] = os.getloadavg()
    return row


def _tag(case: dict) -> str:
    if case["case"] == "node":
        return f"node depth {case['depth']}"
    return f"graph gntk({case['blocks']}, {case['mlp_layers']}){'' if case['jumping_knowledge'] else ' no JK'}"


# ---------------------------------------------------------------------------------------------
# report
def median_wall(row: dict, name: str) -> float:
    """The median wall time of a measurement's timed calls (nan if it did not run)."""
    stats = row["timed"].get(name)
    return statistics.median(c["wall"] for c in stats["calls"]) if stats and stats["calls"] else math.nan


def quartiles(row: dict, name: str) -> tuple[float, float]:
    """The lower and upper quartiles of a measurement's wall times (nan with fewer than 2 calls)."""
    stats = row["timed"].get(name)
    walls = [c["wall"] for c in stats["calls"]] if stats else []
    if len(walls) < 2:
        return math.nan, math.nan
    q = statistics.quantiles(walls, n=4, method="inclusive")
    return q[0], q[2]


def peak_mib(row: dict, name: str) -> float:
    stats = row["timed"].get(name)
    return max(c["peak_kib"] for c in stats["calls"]) / 1024 if stats and stats["calls"] else math.nan


def _ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


def _num(v: float) -> str:
    return "-" if v != v else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


RATIOS = {  # label -> (numerator, denominator)
    "node": {"NT / gpntk-cold": ("nt", "gpntk-cold"), "NT / gpntk": ("nt", "gpntk"),
             "gpntk-cold / floor": ("gpntk-cold", "floor"), "gpntk / floor-agg": ("gpntk", "floor-agg")},
    "graph": {"NT / gpntk-buckets": ("nt-padded", "gpntk-buckets"), "NT / gpntk-padded": ("nt-padded", "gpntk-padded"),
              "gpntk-padded / floor-padded": ("gpntk-padded", "floor-padded"),
              "gpntk-buckets / floor-buckets": ("gpntk-buckets", "floor-buckets")},
}


def summarise(rows: list[dict]) -> dict:
    """Medians, quartiles, peaks and ratios of every case (also stored in the JSON)."""
    out = {}
    for row in rows:
        kind = row["case"]["case"]
        meds = {n: median_wall(row, n) for n in row["timed"]}
        out[_tag(row["case"])] = {
            "median_s": meds,
            "quartiles_s": {n: quartiles(row, n) for n in row["timed"]},
            "first_s": {n: s["first"]["wall"] for n, s in row["timed"].items()},
            "peak_mib": {n: peak_mib(row, n) for n in row["timed"]},
            "ratios": {label: (meds[a] / meds[b] if a in meds and b in meds and meds[b] > 0 else None)
                       for label, (a, b) in RATIOS[kind].items()},  # None where a peer did not run
        }
    return out


def report(rows: list[dict], args: argparse.Namespace, loads: tuple) -> None:
    print()
    print(f"Graph kernels, NNGP + NTK in one pass, float64; machine: {platform.machine()}, {os.cpu_count()} CPUs; "
          f"threads: {args.threads or 'library defaults'} (pinned); medians of {args.repeats} interleaved rounds "
          f"after 1 untimed warm-up call each")
    print(f"load average (1 min) at start {loads[0][0]:.2f}, at end {loads[1][0]:.2f}")
    seen = {}
    for row in rows:
        for role, w in row["workers"].items():
            seen.setdefault(role, f"{w['versions']}; {w['threads']}")
    for role, text in seen.items():
        print(f"  {role:6s} {text}")
    for row in rows:
        tag = _tag(row["case"])
        print()
        print(f"{tag} (load {row['load_start'][0]:.2f} -> {row['load_end'][0]:.2f})")
        head = f"  {'measurement':15s}{'median s':>10s}{'quartiles s':>18s}{'first s':>9s}{'peak MiB':>10s}"
        print(head)
        for name in row["timed"]:
            q1, q3 = quartiles(row, name)
            print(f"  {name:15s}{_num(median_wall(row, name)):>10s}{f'{_num(q1)}-{_num(q3)}':>18s}"
                  f"{_num(row['timed'][name]['first']['wall']):>9s}{_num(peak_mib(row, name)):>10s}")
        ratios = [f"{label} {_ratio(median_wall(row, a), median_wall(row, b))}"
                  for label, (a, b) in RATIOS[row["case"]["case"]].items()
                  if a in row["timed"] and b in row["timed"]]
        if ratios:
            print("  ratios of medians: " + "; ".join(ratios))
        checks = ", ".join(f"{k} {v['whole']:.1e}/{v['regular']:.1e}" for k, v in row["agreement"].items())
        if checks:
            regular = "off-diagonal" if row["case"]["case"] == "graph" else (
                f"regular entries, {100 * row.get('regular_fraction', math.nan):.1f}% of all")
            print(f"  agreement, max|a-b|/max|b| (all entries / {regular}): {checks}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=["node", "graph"], default=["node", "graph"])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4], help="node level: aggregations of the GCN")
    p.add_argument("--graph-blocks", type=int, default=2, help="graph level: BLOCKs of gntk(blocks, mlp_layers)")
    p.add_argument("--mlp-layers", type=int, default=2, help="graph level: ReLU layers per BLOCK")
    p.add_argument("--no-jk", action="store_true", help="graph level: gntk without jumping knowledge")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--threads", type=int, default=1, help="CPUs and threads of every worker (0: library defaults)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds after the warm-up (median)")
    p.add_argument("--floor-chunk", type=int, default=32, help="graphs per chunk of the graph-level floors")
    p.add_argument("--nt-multithread-eigen", action="store_true",
                   help="for --threads > 1, leave XLA_FLAGS alone (XLA's Eigen multi-threaded, pinned to the CPUs)")
    p.add_argument("--synthetic", action="store_true", help="small random graphs instead of Cora and MUTAG")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder with planetoid/ and tu/ (graph_data.py)")
    p.add_argument("--nt-python", default=DEFAULT_NT_PYTHON, help="python of the Neural Tangents venv")
    p.add_argument("--gpntk-python", default=sys.executable, help="python of the gpntk venv")
    p.add_argument("--seed", type=int, default=0, help="of --synthetic")
    p.add_argument("--json", help="write the raw results and the summary to this file")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker_main(args.worker, args.spec)
        return {}
    if "nt" in args.peers and not os.access(args.nt_python, os.X_OK):
        p.error(f"Neural Tangents' python not found at {args.nt_python} (pass --nt-python, or leave nt out of --peers)")
    load_start = os.getloadavg()
    rows = []
    if "node" in args.cases:
        node_data = load_node_data(args)
        for depth in args.depths:
            rows.append(run_case({"case": "node", "depth": depth}, node_data, args))
        del node_data
    if "graph" in args.cases:
        case = {"case": "graph", "blocks": args.graph_blocks, "mlp_layers": args.mlp_layers,
                "jumping_knowledge": not args.no_jk}
        rows.append(run_case(case, load_graph_data(args), args))
    loads = (load_start, os.getloadavg())
    report(rows, args, loads)
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
              "load_average_start": loads[0], "load_average_end": loads[1],
              "machine": {"machine": platform.machine(), "cpus": os.cpu_count()},
              "summary": summarise(rows), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
