"""Graph-level (``GraphInputs``) and node-level (``NodeGraph``) NNGP and NTK kernels.

The values are checked against the dense NumPy reference of ``tests/_graph_reference.py`` (the
recursion of Dense / ReLU / Erf / Aggregate / pooling written from the formulas, on the disjoint
union of the graphs) on random weighted *directed* adjacencies; the rest against exact identities
(padding, diagonals, index subsets, batches, backends, ``graph_kernel_matrices``) and central
finite differences (gradients).

Tolerances: float64 kernels of a few layers on ≤ 12-node graphs agree with the reference to a few
ulps per operation; ``1e-12`` relative to the largest entry leaves two orders of magnitude. The
data are continuous and random, so no two different nodes have correlation one (where the ReLU
NTK's ``arccos`` turns a rounding error δ into √δ).
"""

from __future__ import annotations

import io
import re

import gpytorch
import numpy as np
import pytest
import torch
from _graph_reference import reference_kernels
from _models import ExactGP

import gpntk
import gpntk.kernels.dense
from gpntk import layers as L

DTYPE = torch.float64
RTOL = 1e-12
#: float32 against float64: each of the ~10 maps of a network rounds to a few ε₃₂ (6e-8) and every
#: aggregation or pooling sums ≤ 12 terms per node, so ≲ 10 · 12 · ε₃₂ ≈ 7e-6; the ReLU's arccos at
#: correlation one would give √ε₃₂ ≈ 2e-4, but the kernels take every node with itself exactly
F32_RTOL = 2e-5
KERNELS = {"nngp": gpntk.NNGPKernel, "ntk": gpntk.NTKKernel}


# --------------------------------------------------------------------------------------------
# Networks (one list of ops for the reference and for gpntk) and data
# --------------------------------------------------------------------------------------------
def build(ops) -> L.Serial:
    """The gpntk network of a reference op list (see ``_graph_reference.Op``)."""
    make = {
        "dense": lambda op: L.Dense(op[1], op[2]),
        "relu": lambda op: L.ReLU(),
        "erf": lambda op: L.Erf(),
        "aggregate": lambda op: L.Aggregate(),
        "sum_pool": lambda op: L.GlobalSumPool(),
        "avg_pool": lambda op: L.GlobalAvgPool(),
    }
    return L.serial(*(make[op[0]](op) for op in ops))


def node_ops(activation: str, bias: bool) -> list:
    """Dense, φ, Aggregate, Dense, φ, Aggregate, Dense, φ, Dense: a GCN-like network (distinct variances)."""
    b = (lambda v: v) if bias else (lambda v: 0.0)
    act = (activation,)
    return [("dense", 1.6, b(0.3)), act, ("aggregate",), ("dense", 1.3, b(0.2)), act, ("aggregate",),
            ("dense", 1.1, b(0.1)), act, ("dense", 0.8, b(0.4))]


def graph_ops(activation: str, bias: bool, pool: str) -> list:
    """``node_ops`` with the pooling before its readout, and one more hidden layer after the pooling."""
    ops = node_ops(activation, bias)
    b = 0.25 if bias else 0.0
    return [*ops[:-1], (pool + "_pool",), ("dense", 1.2, b), (activation,), ops[-1]]


def random_graph(n: int, channels: int, rng: np.random.Generator, density: float = 0.5):
    """Gaussian features; a weighted directed adjacency with self-loops, other entries nonzero with ``density``."""
    a = rng.uniform(0.2, 1.5, (n, n)) * (rng.random((n, n)) < density)
    np.fill_diagonal(a, rng.uniform(0.5, 1.0, n))
    return rng.standard_normal((n, channels)), a


def random_graphs(sizes, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return [random_graph(n, channels, rng) for n in sizes]


SIZES = [3, 7, 5, 12, 4]


def graph_inputs(graphs, nodes=None):
    return gpntk.GraphInputs.from_graphs(graphs, nodes=nodes)


def node_graph(n=11, seed=1, sparse=False):
    (features, adjacency), = random_graphs([n], channels=4, seed=seed)
    a = torch.as_tensor(adjacency).to_sparse() if sparse else adjacency
    return gpntk.NodeGraph(features, a), features, adjacency


def indices(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)[:, None]


def all_nodes(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=DTYPE)[:, None]


def dense(kernel, *args, **kwargs) -> torch.Tensor:
    out = kernel(*args, **kwargs)
    return (out.to_dense() if not torch.is_tensor(out) else out).detach()


def assert_relative(actual, expected, rtol=RTOL):
    """``max |actual − expected| ≤ rtol · max |expected|`` (relative to the matrix's scale)."""
    actual = actual.detach().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    expected = expected.detach().numpy() if torch.is_tensor(expected) else np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all()
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


# --------------------------------------------------------------------------------------------
# Values against the dense reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["sum", "avg"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_graph_level_matches_reference(activation, bias, pool):
    ops = graph_ops(activation, bias, pool)
    graphs = random_graphs(SIZES, seed=2)
    fmt, x = graph_inputs(graphs, nodes=14)  # padded beyond the largest graph
    sigma_ref, theta_ref = reference_kernels(graphs, ops)
    net = build(ops)
    sigma, theta = gpntk.kernels.dense.nngp_and_ntk(net, x, input_shape=fmt)
    assert_relative(sigma, sigma_ref)
    assert_relative(theta, theta_ref)
    with torch.no_grad():
        assert_relative(dense(gpntk.NNGPKernel(net, input_shape=fmt), x), sigma_ref)
        assert_relative(dense(gpntk.NTKKernel(net, input_shape=fmt), x), theta_ref)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_adjacency", "sparse_adjacency"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_node_level_matches_reference(activation, bias, sparse):
    ops = node_ops(activation, bias)
    graph, features, adjacency = node_graph(sparse=sparse)
    sigma_ref, theta_ref = reference_kernels([(features, adjacency)], ops)
    net = build(ops)
    x = all_nodes(graph.nodes)
    sigma, theta = gpntk.kernels.dense.nngp_and_ntk(net, x, input_shape=graph)
    assert_relative(sigma, sigma_ref)
    assert_relative(theta, theta_ref)
    with torch.no_grad():
        assert_relative(dense(gpntk.NNGPKernel(net, input_shape=graph), x), sigma_ref)
        assert_relative(dense(gpntk.NTKKernel(net, input_shape=graph), x), theta_ref)


def test_node_level_normalized_graph_with_a_node_that_receives_nothing():
    """A row-normalised graph whose node 3 has no in-edges (zero row, zero variance after Aggregate): finite, exact."""
    rng = np.random.default_rng(3)
    features, a = random_graph(8, 3, rng)
    np.fill_diagonal(a, 0.0)
    a[3] = 0.0
    edges = np.stack(np.nonzero(a.T))  # edge k: from edges[0, k] to edges[1, k], i.e. entry a[edges[1], edges[0]]
    graph = gpntk.NodeGraph.from_edges(features, edges, weights=a.T[edges[0], edges[1]], normalization="row")
    normalized = graph.adjacency.to_dense().numpy()
    assert not normalized[3].any()
    ops = [("aggregate",), ("dense", 1.5, 0.2), ("relu",), ("aggregate",), ("dense", 1.2, 0.0), ("relu",),
           ("dense", 1.0, 0.1)]
    sigma_ref, theta_ref = reference_kernels([(features, normalized)], ops)
    sigma, theta = gpntk.kernels.dense.nngp_and_ntk(build(ops), all_nodes(8), input_shape=graph)
    assert_relative(sigma, sigma_ref)
    assert_relative(theta, theta_ref)


# --------------------------------------------------------------------------------------------
# Padding and pooling
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["sum", "avg"])
def test_padding_does_not_change_graph_kernels(pool):
    ops = graph_ops("relu", True, pool)
    net = build(ops)
    graphs = random_graphs(SIZES, seed=4)
    results = [gpntk.kernels.dense.nngp_and_ntk(net, x, input_shape=fmt)
               for fmt, x in (graph_inputs(graphs), graph_inputs(graphs, nodes=19))]
    for first, second in zip(*results):
        assert_relative(second, first)
    # a graph of 5 nodes padded by 7 (a 12-node format) against the same graph alone, unpadded
    fmt, x = graph_inputs(graphs[2:4])
    alone_fmt, alone = graph_inputs(graphs[2:3])
    for padded, unpadded in zip(gpntk.kernels.dense.nngp_and_ntk(net, x[:1], input_shape=fmt),
                                gpntk.kernels.dense.nngp_and_ntk(net, alone, input_shape=alone_fmt)):
        assert_relative(padded, unpadded)


def test_global_avg_pool_averages_over_real_nodes_only():
    """With a readout Dense(σw², 0) right after the pooling, every kernel entry of the mean is the sum's / (n_i n_j)."""
    graphs = random_graphs(SIZES, seed=5)
    fmt, x = graph_inputs(graphs, nodes=15)
    head = [("dense", 1.4, 0.3), ("relu",), ("aggregate",), ("dense", 1.2, 0.1), ("erf",)]
    sizes = torch.tensor([len(f) for f, _ in graphs], dtype=DTYPE)
    counts = sizes[:, None] * sizes[None, :]
    summed = gpntk.kernels.dense.nngp_and_ntk(build(head + [("sum_pool",), ("dense", 0.7, 0.0)]), x, input_shape=fmt)
    mean = gpntk.kernels.dense.nngp_and_ntk(build(head + [("avg_pool",), ("dense", 0.7, 0.0)]), x, input_shape=fmt)
    for s, m in zip(summed, mean):
        assert_relative(m, s / counts)


# --------------------------------------------------------------------------------------------
# Diagonals, cross kernels, subsets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_diag_is_the_diagonal(kind):
    graphs = random_graphs(SIZES, seed=6)
    fmt, x = graph_inputs(graphs)
    kernel = KERNELS[kind](build(graph_ops("relu", True, "avg")), input_shape=fmt)
    with torch.no_grad():
        full = dense(kernel, x)
        diag = kernel(x, diag=True).detach()
    assert diag.shape == (len(graphs),)
    assert_relative(diag, full.diagonal())
    graph, _, _ = node_graph()
    kernel = KERNELS[kind](build(node_ops("erf", True)), input_shape=graph)
    x = indices(4, 0, 7, 7, 2)
    with torch.no_grad():
        full = dense(kernel, x)
        diag = kernel(x, diag=True).detach()
        assert_relative(diag, full.diagonal())
        # the diagonal of a cross call: k(x1_i, x2_i)
        x2 = indices(1, 0, 3, 7, 10)
        assert_relative(kernel(x, x2, diag=True).detach(), dense(kernel, x, x2).diagonal())


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_graph_cross_kernels_are_entries_of_the_full_kernel(kind):
    ops = graph_ops("relu", True, "sum")
    graphs = random_graphs(SIZES, seed=7)
    fmt, x = graph_inputs(graphs)
    kernel = KERNELS[kind](build(ops), input_shape=fmt)
    reference = reference_kernels(graphs, ops)[0 if kind == "nngp" else 1]
    rows, cols = [3, 0, 2], [1, 3, 4, 0]  # overlapping, unsorted subsets: graphs 0 and 3 on both sides
    with torch.no_grad():
        full = dense(kernel, x)
        cross = dense(kernel, x[rows], x[cols])
    assert_relative(full, reference)
    assert_relative(cross, full[rows][:, cols])
    assert_relative(cross, reference[np.ix_(rows, cols)])


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_node_index_subsets_are_entries_of_the_full_kernel(kind):
    ops = node_ops("relu", True)
    graph, features, adjacency = node_graph()
    reference = reference_kernels([(features, adjacency)], ops)[0 if kind == "nngp" else 1]
    kernel = KERNELS[kind](build(ops), input_shape=graph)
    rows, cols = [7, 2, 2, 10, 0], [5, 7, 1, 5]  # unsorted, repeated, overlapping
    with torch.no_grad():
        cross = dense(kernel, indices(*rows), indices(*cols))
        square = dense(kernel, indices(*rows))
    assert_relative(cross, reference[np.ix_(rows, cols)])
    assert_relative(square, reference[np.ix_(rows, rows)])


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------
def batched_net(ops, kernel_cls, input_shape):
    """A kernel with batch_shape (2,) whose first Dense has weight variance 1.6 (batch 0) and 0.9 (batch 1)."""
    kernel = kernel_cls(build(ops), input_shape=input_shape, batch_shape=torch.Size([2]))
    first = kernel.net.layers[0]
    assert first.raw_weight_variance.shape == (2, 1, 1)
    first.weight_variance = torch.tensor([1.6, 0.9], dtype=DTYPE).view(2, 1, 1)  # float64: remembered exactly
    return kernel


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_graph_level_batch_shapes(kind):
    ops = graph_ops("erf", True, "avg")
    graphs = random_graphs(SIZES, seed=8)
    fmt, x = graph_inputs(graphs)
    kernel = batched_net(ops, KERNELS[kind], fmt)
    pick = 0 if kind == "nngp" else 1
    with torch.no_grad():
        k = dense(kernel, x)
        assert k.shape == (2, 5, 5)
        diag = kernel(x, diag=True)
        assert diag.shape == (2, 5)
        assert_relative(diag, k.diagonal(dim1=-2, dim2=-1))
        for b, variance in enumerate([1.6, 0.9]):
            assert_relative(k[b], reference_kernels(graphs, [("dense", variance, 0.3), *ops[1:]])[pick])
        # batched inputs (b, n, d): each batch its own graphs and hyperparameters
        other = random_graphs(SIZES, seed=9)
        _, x_other = graph_inputs(other, nodes=fmt.nodes)
        kb = dense(kernel, torch.stack([x, x_other]))
        assert kb.shape == (2, 5, 5)
        assert_relative(kb[0], k[0])
        assert_relative(kb[1], reference_kernels(other, [("dense", 0.9, 0.3), *ops[1:]])[pick])
    # an unbatched kernel on batched inputs
    plain = KERNELS[kind](build(ops), input_shape=fmt)
    with torch.no_grad():
        kb = dense(plain, torch.stack([x_other, x]))
    assert kb.shape == (2, 5, 5)
    assert_relative(kb[1], k[0])


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_node_level_batch_shapes(kind):
    ops = node_ops("relu", True)
    graph, features, adjacency = node_graph()
    kernel = batched_net(ops, KERNELS[kind], graph)
    pick = 0 if kind == "nngp" else 1
    x1, x2 = indices(3, 9, 0), indices(1, 3, 3, 8)
    with torch.no_grad():
        k = dense(kernel, x1, x2)
        assert k.shape == (2, 3, 4)
        for b, variance in enumerate([1.6, 0.9]):
            ref = reference_kernels([(features, adjacency)], [("dense", variance, 0.3), *ops[1:]])[pick]
            assert_relative(k[b], ref[np.ix_([3, 9, 0], [1, 3, 3, 8])])
        diag = kernel(x1, diag=True)
        assert diag.shape == (2, 3)
        assert_relative(diag, dense(kernel, x1).diagonal(dim1=-2, dim2=-1))
        # batched index rows (b, n, 1)
        xb = torch.stack([x1, indices(5, 5, 10)])
        kb = dense(kernel, xb)
        assert kb.shape == (2, 3, 3)
        assert_relative(kb[0], dense(kernel, x1)[0])
        assert_relative(kb[1], dense(kernel, indices(5, 5, 10))[1])


# --------------------------------------------------------------------------------------------
# Gradients with respect to the hyperparameters
# --------------------------------------------------------------------------------------------
def gradcheck_hyperparameters(kernel, x1, x2):
    """Autograd against central finite differences (float64) of the kernel in every raw hyperparameter."""
    kernel = kernel.to(DTYPE)
    names, raws = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in kernel.named_parameters()])
    assert len(names) == 6  # the weight and bias variances of the three Dense layers

    def evaluate(*values):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            out = torch.func.functional_call(kernel, dict(zip(names, values)), (x1, x2))
        return out.to_dense() if not torch.is_tensor(out) else out

    # central differences with step 1e-6 on O(1..10) kernel values: truncation ~1e-12, rounding ~1e-10
    assert torch.autograd.gradcheck(evaluate, raws, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_graph_level_hyperparameter_gradients(kind):
    ops = [("dense", 1.6, 0.3), ("erf",), ("aggregate",), ("dense", 1.3, 0.2), ("relu",), ("avg_pool",),
           ("dense", 0.8, 0.4)]
    graphs = random_graphs([3, 5, 4], seed=10)
    fmt, x = graph_inputs(graphs)
    gradcheck_hyperparameters(KERNELS[kind](build(ops), input_shape=fmt), x, x[[2, 0]])


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_node_level_hyperparameter_gradients(kind):
    ops = [("dense", 1.6, 0.3), ("relu",), ("aggregate",), ("dense", 1.3, 0.2), ("erf",), ("aggregate",),
           ("dense", 0.8, 0.4)]
    graph, _, _ = node_graph(n=6, seed=11)
    gradcheck_hyperparameters(KERNELS[kind](build(ops), input_shape=graph), indices(0, 4, 5), indices(2, 4))


# --------------------------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_float32_is_finite_and_close_to_float64(activation, kind):
    """float32 kernels (graph- and node-level): finite, within ``F32_RTOL`` of float64 (measured: ≤ 3e-6)."""
    graphs = random_graphs(SIZES, seed=12)
    fmt, x = graph_inputs(graphs)
    kernel = KERNELS[kind](build(graph_ops(activation, True, "avg")), input_shape=fmt)
    graph, _, _ = node_graph()
    node_kernel = KERNELS[kind](build(node_ops(activation, True)), input_shape=graph)
    with torch.no_grad():
        for k, inputs in ((kernel, x), (node_kernel, all_nodes(graph.nodes))):
            k64 = dense(k, inputs)
            k32 = dense(k, inputs.float())
            assert k32.dtype == torch.float32 and torch.isfinite(k32).all()
            assert_relative(k32.double(), k64, rtol=F32_RTOL)
            d32 = k(inputs.float(), diag=True)
            assert d32.dtype == torch.float32 and torch.isfinite(d32).all()


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_blockwise_backend_equals_dense_for_graph_level(kind):
    graphs = random_graphs([*SIZES, 6, 9, 3], seed=13)
    fmt, x = graph_inputs(graphs)
    net = build(graph_ops("relu", True, "sum"))
    reference = KERNELS[kind](net, input_shape=fmt, backend="dense")
    blockwise = KERNELS[kind](net, input_shape=fmt, backend="blockwise", block_elements=40 * fmt.nodes**2)
    v = torch.randn(len(graphs), 2, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(reference, x)
        operator = blockwise.forward(x, x)
        assert not torch.is_tensor(operator)  # matrix-free
        assert_relative(operator.to_dense(), expected)
        assert_relative(operator @ v, expected @ v)
        assert_relative(dense(blockwise, x[:5], x[3:]), expected[:5, 3:])
        with gpntk.settings.kernel_backend("blockwise"):
            plain = KERNELS[kind](net, input_shape=fmt)
            operator = plain.forward(x, x)
            assert not torch.is_tensor(operator)
            assert_relative(operator.to_dense(), expected)


def test_node_level_refuses_blockwise_at_construction_and_stays_dense_under_the_setting():
    graph, _, _ = node_graph()
    net = build(node_ops("relu", True))
    with pytest.raises(ValueError, match="backend='blockwise' cannot evaluate a kernel on NodeGraph indices"):
        gpntk.NTKKernel(net, input_shape=graph, backend="blockwise")
    kernel = gpntk.NTKKernel(net, input_shape=graph)
    with torch.no_grad():
        expected = dense(kernel, all_nodes(graph.nodes))
        with gpntk.settings.kernel_backend("blockwise"):
            out = kernel.forward(all_nodes(graph.nodes), all_nodes(graph.nodes))
    assert torch.is_tensor(out)
    assert_relative(out, expected, rtol=0)


def test_keops_backend_refuses_graph_inputs():
    """Refused with a reason naming graph inputs (where pykeops is missing, the reason is that, and still refused)."""
    from gpntk.kernels.backends import keops_available

    reason = "graph inputs" if keops_available() else "pykeops is not installed"
    graphs = random_graphs([3, 4], seed=14)
    fmt, x = graph_inputs(graphs)
    graph, _, _ = node_graph()
    for shape, net in ((fmt, build(graph_ops("relu", True, "sum"))), (graph, build(node_ops("relu", True)))):
        with pytest.raises(ValueError, match="backend='keops' cannot evaluate this kernel:.*" + reason):
            gpntk.NTKKernel(net, input_shape=shape, backend="keops")
        kernel = gpntk.NNGPKernel(net, input_shape=shape)
        inputs = x if shape is fmt else all_nodes(graph.nodes)
        with gpntk.settings.kernel_backend("keops"), pytest.raises(ValueError, match="KeOps.*" + reason):
            kernel.forward(inputs, inputs)


# --------------------------------------------------------------------------------------------
# GPyTorch
# --------------------------------------------------------------------------------------------
def test_exact_gp_on_node_indices_trains():
    graph, _, _ = node_graph(n=12, seed=15)
    net = build([("aggregate",), ("dense", 1.5, 0.1), ("relu",), ("aggregate",), ("dense", 1.0, 0.05)])
    train_x = indices(0, 2, 3, 5, 7, 8, 11)
    train_y = torch.sin(torch.arange(7, dtype=DTYPE))
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    model = ExactGP(train_x, train_y, gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net, input_shape=graph)),
                    likelihood).to(DTYPE)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        losses.append(loss.item())
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert net.layers[1].raw_weight_variance.grad.abs() > 0  # the network's own hyperparameters learn
        optimizer.step()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model.eval()
    likelihood.eval()
    with torch.no_grad():
        prediction = likelihood(model(indices(1, 4, 6, 9, 10)))
    assert torch.isfinite(prediction.mean).all() and (prediction.variance > 0).all()


# --------------------------------------------------------------------------------------------
# Inputs refused at evaluation
# --------------------------------------------------------------------------------------------
def test_nan_inputs_are_rejected():
    graphs = random_graphs([3, 4], seed=16)
    fmt, x = graph_inputs(graphs)
    kernel = gpntk.NTKKernel(build(graph_ops("relu", True, "sum")), input_shape=fmt)
    bad = x.clone()
    bad[1, 2] = float("nan")
    for args in ((bad,), (x, bad)):
        with pytest.raises(ValueError, match="NaN"):
            kernel(*args).to_dense()
    with pytest.raises(ValueError, match="NaN"):
        kernel(bad, diag=True)
    graph, _, _ = node_graph()
    node_kernel = gpntk.NNGPKernel(build(node_ops("relu", True)), input_shape=graph)
    with pytest.raises(ValueError, match="NaN"):
        node_kernel(indices(1, float("nan"))).to_dense()


# --------------------------------------------------------------------------------------------
# graph_kernel_matrices
# --------------------------------------------------------------------------------------------
def test_graph_kernel_matrices_equals_direct_evaluation():
    """Bucketed by size (3..12 nodes: several buckets), chunked, with ``others`` and a progress stream."""
    rng = np.random.default_rng(17)
    sizes = [3, 12, 4, 7, 9, 3, 5, 11, 6, 8]
    graphs = [random_graph(n, 3, rng) for n in sizes]
    graphs[3] = (graphs[3][0], torch.as_tensor(graphs[3][1]).to_sparse())  # sparse adjacencies are accepted
    others = [random_graph(n, 3, rng) for n in (10, 4, 6)] + [graphs[5]]
    ops = graph_ops("relu", True, "sum")
    net = build(ops)
    stream = io.StringIO()
    sigma, theta = gpntk.graph_kernel_matrices(net, graphs, pairs_per_call=7, progress=stream)
    fmt, x = graph_inputs(graphs)  # all padded to 12 nodes
    with torch.no_grad():
        direct = [dense(KERNELS[kind](net, input_shape=fmt), x) for kind in ("nngp", "ntk")]
    assert sigma.shape == theta.shape == (10, 10)
    assert_relative(sigma, direct[0])
    assert_relative(theta, direct[1])
    dense_graphs = [(f, a.to_dense().numpy() if torch.is_tensor(a) else a) for f, a in graphs]
    sigma_ref, theta_ref = reference_kernels(dense_graphs, ops)
    assert_relative(sigma, sigma_ref)
    assert_relative(theta, theta_ref)
    torch.testing.assert_close(sigma, sigma.T, rtol=0, atol=0)  # mirrored from the upper triangle of buckets
    text = stream.getvalue()
    assert text.startswith("\rgraph kernel: ") and text.endswith("\n")
    # the symmetric case evaluates each pair of buckets once: the last report counts them all
    done, total = map(int, re.findall(r"(\d+)/(\d+) pairs \(100\.0%\)", text)[-1])
    assert done == total and 55 <= total < 100  # the 55 pairs of a triangle and the buckets' own blocks

    cross_sigma, cross_theta = gpntk.graph_kernel_matrices(net, graphs, others, bucket_growth=1.5)
    everything = dense_graphs + [(f, a) for f, a in others[:3]]
    sigma_ref, theta_ref = reference_kernels(everything, ops)
    columns = [10, 11, 12, 5]  # the last of ``others`` is graphs[5]
    assert cross_sigma.shape == (10, 4)
    assert_relative(cross_sigma, sigma_ref[:10][:, columns])
    assert_relative(cross_theta, theta_ref[:10][:, columns])

    only_sigma, none = gpntk.graph_kernel_matrices(net, graphs[:4], track_ntk=False, dtype=torch.float32)
    assert none is None and only_sigma.dtype == torch.float32
    assert_relative(only_sigma.double(), sigma[:4, :4], rtol=F32_RTOL)


def test_graph_kernel_matrices_errors():
    net = build(graph_ops("relu", True, "sum"))
    graphs = random_graphs([3, 4], seed=18)
    with pytest.raises(ValueError, match="same number of feature channels"):
        gpntk.graph_kernel_matrices(net, graphs, random_graphs([3], channels=2))
    with pytest.raises(ValueError, match="at least one graph"):
        gpntk.graph_kernel_matrices(net, [])
    with pytest.raises(ValueError, match="bucket_growth"):
        gpntk.graph_kernel_matrices(net, graphs, bucket_growth=0.5)
    with pytest.raises(gpntk.ArchitectureError, match="over the nodes"):
        gpntk.graph_kernel_matrices(build(node_ops("relu", True)), graphs)
