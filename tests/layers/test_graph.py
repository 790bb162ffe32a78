"""Graph layers: ``Aggregate``, the checks that keep graph networks well formed, ``gntk``, finite graph networks.

Kernel identities are checked against the dense reference of ``tests/_graph_reference.py`` (NumPy,
from the formulas) or against each other where the identity is exact algebra (jumping knowledge as
a sum of depths; ``A(HW) = (AH)W``); finite networks against a NumPy forward pass written from their
documented weights (``σw/√n_in · W h + σb b``, ``h'_u = Σ_v A[u, v] h_v``, pooling over real nodes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _graph_reference import reference_kernels

import gpntk
import gpntk.kernels.dense
from gpntk import layers as L
from gpntk.errors import ArchitectureError

DTYPE = torch.float64
#: float64 agreement of two evaluations of the same kernel by different sums (a few layers, ≤ 12
#: nodes): rounding is a few ulps per operation, far below this
RTOL = 1e-12


def random_graphs(sizes, channels=3, seed=0):
    """Graphs with Gaussian features and weighted directed adjacencies (about half the entries nonzero)."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((n, channels)), rng.uniform(0.2, 1.5, (n, n)) * (rng.random((n, n)) < 0.5))
        for n in sizes
    ]


def kernels(net, x, input_shape):
    sigma, theta = gpntk.kernels.dense.nngp_and_ntk(net, x, input_shape=input_shape)
    return sigma.detach(), theta.detach()


def assert_relative(actual, expected, rtol=RTOL):
    """``max |actual − expected| ≤ rtol · max |expected|`` (a matrix-relative error)."""
    actual = actual.detach().numpy() if torch.is_tensor(actual) else actual
    expected = expected.detach().numpy() if torch.is_tensor(expected) else expected
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


# --------------------------------------------------------------------------------------------
# Architecture checks
# --------------------------------------------------------------------------------------------
FIX = (
    r"pass input_shape=gpntk\.GraphInputs\(\.\.\.\) or GraphDataset\(\.\.\.\) for graph-level kernels or "
    r"input_shape=gpntk\.NodeGraph"
)


def test_aggregate_refused_on_vectors():
    net = L.serial(L.Aggregate(), L.Dense(1.0))
    with pytest.raises(ArchitectureError, match="the inputs are vectors.*" + FIX):
        gpntk.NNGPKernel(net)
    with pytest.raises(ArchitectureError, match="the inputs are vectors.*" + FIX):
        net.finite(8, in_features=3)
    with pytest.raises(ArchitectureError, match=r"vectors \(after ReLU\).*" + FIX):
        gpntk.NTKKernel(L.serial(L.Dense(1.0), L.ReLU(), L.Aggregate(), L.Dense(1.0)))


def test_aggregate_refused_on_spatial_inputs():
    net = L.serial(L.Aggregate(), L.Dense(1.0), L.GlobalAvgPool(), L.Dense(1.0))
    with pytest.raises(ArchitectureError, match="the inputs are not graphs.*" + FIX):
        gpntk.NTKKernel(net, input_shape=(2, 5))
    with pytest.raises(ArchitectureError, match="not graphs.*" + FIX):
        gpntk.NTKKernel(L.serial(L.Conv(3), L.ReLU(), L.Aggregate(), L.GlobalAvgPool(), L.Dense(1.0)),
                        input_shape=(2, 4, 4))


def test_aggregate_refused_after_pooling():
    fmt = gpntk.GraphInputs(nodes=4, channels=2)
    fix = "put Aggregate before GlobalSumPool / GlobalAvgPool"
    for pool in (L.GlobalSumPool, L.GlobalAvgPool):
        message = rf"outputs of {pool.__name__} are vectors \(pooled or flattened\).*{fix}"
        with pytest.raises(ArchitectureError, match=message):
            L.serial(L.Dense(1.0), pool(), L.Aggregate(), L.Dense(1.0))  # refused as soon as it is built
    block = L.serial(L.Aggregate(), L.Dense(1.0))  # fine on its own: it does not know its inputs
    with pytest.raises(ArchitectureError, match=fix):
        gpntk.NNGPKernel(L.serial(L.GlobalSumPool(), block), input_shape=fmt)


@pytest.mark.parametrize(
    "layer",
    [lambda: L.Conv(3), lambda: L.AvgPool(2), lambda: L.SumPool(2), lambda: L.Flatten(),
     lambda: L.GlobalSelfAttention(1)],
    ids=["Conv", "AvgPool", "SumPool", "Flatten", "GlobalSelfAttention"],
)
def test_ordered_layers_refused_on_graphs(layer):
    fix = "on graphs use Aggregate"
    for fmt in (gpntk.GraphInputs(nodes=5, channels=2), gpntk.NodeGraph(np.ones((5, 2)), np.eye(5))):
        first = layer()
        tail = (L.Dense(1.0),) if isinstance(fmt, gpntk.NodeGraph) else (L.GlobalSumPool(), L.Dense(1.0))
        if isinstance(first, L.Flatten):
            tail = (L.Dense(1.0),)
        net = L.serial(L.Dense(1.0), L.ReLU(), first, *tail)
        with pytest.raises(ArchitectureError, match=f"{type(first).__name__} needs ordered positions.*graphs.*{fix}"):
            gpntk.NTKKernel(net, input_shape=fmt)
        with pytest.raises(ArchitectureError, match="ordered positions"):
            net.finite(4, input_shape=fmt)


def test_node_level_network_must_not_pool():
    graph = gpntk.NodeGraph(np.ones((5, 2)), np.eye(5))
    for net in (L.serial(L.Aggregate(), L.Dense(1.0), L.ReLU(), L.GlobalSumPool(), L.Dense(1.0)),
                L.serial(L.Aggregate(), L.Dense(1.0), L.GlobalAvgPool())):
        with pytest.raises(ArchitectureError, match="one output per node.*pooled.*remove the pooling"):
            gpntk.NNGPKernel(net, input_shape=graph)
        with pytest.raises(ArchitectureError, match="remove the pooling"):
            net.finite(4, input_shape=graph)


def test_graph_level_network_must_pool():
    fmt = gpntk.GraphInputs(nodes=4, channels=2)
    net = L.serial(L.Aggregate(), L.Dense(1.0), L.ReLU(), L.Dense(1.0))
    fix = r"spatial shape \(4,\).*GlobalSumPool\(\) or GlobalAvgPool\(\) over the nodes"
    with pytest.raises(ArchitectureError, match=fix):
        gpntk.NTKKernel(net, input_shape=fmt)
    with pytest.raises(ArchitectureError, match="over the nodes"):
        net.finite(4, input_shape=fmt)
    # pooling without a readout, and layers after the pooling, are both graph-level networks
    gpntk.NTKKernel(L.serial(L.Aggregate(), L.Dense(1.0), L.GlobalSumPool()), input_shape=fmt)
    gpntk.NTKKernel(L.serial(L.Aggregate(), L.GlobalAvgPool(), L.Dense(1.0), L.ReLU(), L.Dense(1.0)),
                    input_shape=fmt)


def test_aggregate_needs_a_graph_state():
    """Called on the state of vector inputs (bypassing the architecture checks), the kernel map refuses."""
    from gpntk.core.state import KernelState

    x = torch.ones(2, 3, dtype=DTYPE)
    state = KernelState.from_inputs(x, x, diag=False, same_inputs=True, track_ntk=False)
    with pytest.raises(RuntimeError, match="kernel state without graphs"):
        L.Aggregate().kernel_map(state, None)


# --------------------------------------------------------------------------------------------
# Identities of the kernel maps
# --------------------------------------------------------------------------------------------
def test_aggregate_commutes_with_dense():
    """A(HW) = (AH)W: Aggregate before or after a Dense layer gives the same kernels.

    Without a bias for any adjacency; with a bias b when A's rows sum to one (A(HW + 1bᵀ) = AHW + 1bᵀ).
    """
    for bias, normalization in ((0.0, None), (0.4, "row")):
        graphs = random_graphs([4, 6, 5], seed=2)
        graphs = [(f, gpntk.normalized_adjacency(torch.as_tensor(a), normalization, self_loops=True).numpy())
                  for f, a in graphs]
        fmt, x = gpntk.GraphInputs.from_graphs(graphs, nodes=7)
        tail = (L.ReLU(), L.GlobalSumPool(), L.Dense(1.1, 0.2))
        before = L.serial(L.Aggregate(), L.Dense(1.7, bias), *tail)
        after = L.serial(L.Dense(1.7, bias), L.Aggregate(), *tail)
        for k_before, k_after in zip(kernels(before, x, fmt), kernels(after, x, fmt)):
            assert_relative(k_after, k_before)


def test_identity_adjacency_is_no_aggregation():
    graphs = [(f, np.eye(len(f))) for f, _ in random_graphs([3, 5, 4], seed=4)]
    fmt, x = gpntk.GraphInputs.from_graphs(graphs)
    with_aggregate = L.serial(L.Dense(1.3, 0.2), L.Erf(), L.Aggregate(), L.Dense(1.5, 0.1), L.ReLU(),
                              L.GlobalAvgPool(), L.Dense(1.0, 0.3))
    without = L.serial(L.Dense(1.3, 0.2), L.Erf(), L.Dense(1.5, 0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.0, 0.3))
    for a, b in zip(kernels(with_aggregate, x, fmt), kernels(without, x, fmt)):
        assert_relative(a, b, rtol=0)


# --------------------------------------------------------------------------------------------
# gntk(blocks, mlp_layers)
# --------------------------------------------------------------------------------------------
def gntk_ops(blocks, mlp_layers, readout):
    block = [("aggregate",)] + [("dense", 2.0, 0.0), ("relu",)] * mlp_layers
    return block * blocks + [("sum_pool" if readout == "sum" else "avg_pool",), ("dense", 1.0, 0.0)]


@pytest.mark.parametrize("readout", ["sum", "mean"])
def test_gntk_without_jumping_knowledge_matches_the_reference(readout):
    graphs = random_graphs([3, 6, 5, 4], seed=5)
    graphs = [(f, a + np.eye(len(a))) for f, a in graphs]  # Du et al.'s A + I
    fmt, x = gpntk.GraphInputs.from_graphs(graphs, nodes=8)
    sigma, theta = kernels(L.gntk(2, 2, jumping_knowledge=False, readout=readout), x, fmt)
    sigma_ref, theta_ref = reference_kernels(graphs, gntk_ops(2, 2, readout))
    assert_relative(sigma, sigma_ref)
    assert_relative(theta, theta_ref)


@pytest.mark.parametrize("readout", ["sum", "mean"])
@pytest.mark.parametrize("blocks, mlp_layers", [(1, 1), (3, 2)])
def test_gntk_jumping_knowledge_is_the_sum_over_depths(blocks, mlp_layers, readout):
    """JK kernel = depth-0 readout (pooled input features, Dense(1, 0)) + Σ_{ℓ=1}^{L} the non-JK kernel of depth ℓ."""
    graphs = random_graphs([4, 6, 3], seed=6)
    graphs = [(f, gpntk.normalized_adjacency(torch.as_tensor(a), "row", self_loops=True).numpy()) for f, a in graphs]
    fmt, x = gpntk.GraphInputs.from_graphs(graphs, nodes=7)
    jk = kernels(L.gntk(blocks, mlp_layers, readout=readout), x, fmt)
    pool = L.GlobalSumPool() if readout == "sum" else L.GlobalAvgPool()
    depth0 = kernels(L.serial(pool, L.Dense(1.0, 0.0)), x, fmt)
    depths = [kernels(L.gntk(d, mlp_layers, jumping_knowledge=False, readout=readout), x, fmt)
              for d in range(1, blocks + 1)]
    for k in range(2):  # Σ, Θ
        assert_relative(jk[k], depth0[k] + sum(depth[k] for depth in depths))
    # and the depth-0 term is the pooled input kernel itself, from the reference
    sigma0, theta0 = reference_kernels(graphs, [("sum_pool" if readout == "sum" else "avg_pool",), ("dense", 1.0, 0.0)])
    assert_relative(depth0[0], sigma0)
    assert_relative(depth0[1], theta0)


def test_gntk_variances_and_errors():
    graphs = random_graphs([3, 5], seed=8)
    fmt, x = gpntk.GraphInputs.from_graphs(graphs)
    net = L.gntk(1, 1, jumping_knowledge=False, weight_variance=1.5, readout_variance=0.7)
    ops = [("aggregate",), ("dense", 1.5, 0.0), ("relu",), ("sum_pool",), ("dense", 0.7, 0.0)]
    for got, want in zip(kernels(net, x, fmt), reference_kernels(graphs, ops)):
        assert_relative(got, want)
    with pytest.raises(ArchitectureError, match="blocks"):
        L.gntk(0)
    with pytest.raises(ArchitectureError, match="mlp_layers"):
        L.gntk(1, 0)
    with pytest.raises(ArchitectureError, match="readout must be 'sum' or 'mean'"):
        L.gntk(1, readout="max")


# --------------------------------------------------------------------------------------------
# Finite graph networks
# --------------------------------------------------------------------------------------------
def finite_net(pool):
    return L.serial(L.Dense(1.5, 0.2), L.ReLU(), L.Aggregate(), L.Dense(1.3, 0.3), L.Erf(), L.Aggregate(),
                    *(() if pool is None else (pool(),)), L.Dense(0.9, 0.1))


def numpy_forward(state: dict, features: np.ndarray, adjacency: np.ndarray, pool: str | None) -> np.ndarray:
    """The finite network ``finite_net`` on one graph, from its weights: NTK-parameterized Dense layers."""
    from scipy.special import erf

    def dense(h, name, sigma_w2, sigma_b2):
        w, b = state[name + "weight"].numpy(), state[name + "bias"].numpy()
        return np.sqrt(sigma_w2 / w.shape[1]) * h @ w.T + np.sqrt(sigma_b2) * b

    names = [k[: -len("weight")] for k in state if k.endswith("weight")]
    h = np.maximum(dense(features, names[0], 1.5, 0.2), 0)
    h = adjacency @ h
    h = erf(dense(h, names[1], 1.3, 0.3))
    h = adjacency @ h
    if pool is not None:
        h = h.sum(0, keepdims=True) if pool == "sum" else h.mean(0, keepdims=True)
    return dense(h, names[2], 0.9, 0.1)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_finite_graph_level_network(pool):
    graphs = random_graphs([3, 6, 4], seed=9)
    layer = L.GlobalSumPool if pool == "sum" else L.GlobalAvgPool
    net = finite_net(layer)
    fmt, x = gpntk.GraphInputs.from_graphs(graphs)
    model = net.finite(16, input_shape=fmt, out_features=2, generator=torch.Generator().manual_seed(0)).to(x)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 2) and y.dtype == DTYPE
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for g, (f, a) in enumerate(graphs):  # the real nodes only: padding nodes are skipped
        np.testing.assert_allclose(y[g].numpy(), numpy_forward(state, f, a, pool)[0], rtol=1e-12, atol=1e-13)
    # the same weights on the graphs padded further: the same outputs (mask makes padding irrelevant)
    fmt_wide, x_wide = gpntk.GraphInputs.from_graphs(graphs, nodes=11)
    wide = net.finite(16, input_shape=fmt_wide, out_features=2).to(x)
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wide(x_wide), y, rtol=1e-13, atol=1e-14)


def test_finite_node_level_network_and_index_subsets():
    (features, adjacency), = random_graphs([9], seed=10)
    graph = gpntk.NodeGraph(features, adjacency)
    model = finite_net(None).finite(16, input_shape=graph, out_features=3, generator=torch.Generator().manual_seed(1))
    model = model.to(DTYPE)
    all_nodes = torch.arange(9, dtype=DTYPE)[:, None]
    with torch.no_grad():
        y = model(all_nodes)
        assert y.shape == (9, 3)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        np.testing.assert_allclose(y.numpy(), numpy_forward(state, features, adjacency, None), rtol=1e-12, atol=1e-13)
        index = torch.tensor([[4.0], [1.0], [4.0], [8.0], [0.0]], dtype=DTYPE)  # unsorted, repeated
        torch.testing.assert_close(model(index), y[index[:, 0].long()], rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"in \[0, 9\)"):
            model(torch.tensor([[9.0]], dtype=DTYPE))


def test_finite_node_level_mean_equals_graph_level_mean_pool():
    """The sparse (node-level) and dense (graph-level) message passing modules agree: with the same weights, the mean
    of a node-level network's outputs over the nodes is the graph-level network's with GlobalAvgPool before its
    readout (pooling is linear)."""
    (features, adjacency), = random_graphs([7], seed=11)
    graph_model = finite_net(L.GlobalAvgPool).finite(
        8, input_shape=gpntk.GraphInputs(7, 3), generator=torch.Generator().manual_seed(2)
    ).to(DTYPE)
    node_model = finite_net(None).finite(8, input_shape=gpntk.NodeGraph(features, adjacency)).to(DTYPE)
    with torch.no_grad():  # the same weights, layer by layer (the module names differ: pooling is one more module)
        for target, source in zip(node_model.parameters(), graph_model.parameters(), strict=True):
            target.copy_(source)
    _, x = gpntk.GraphInputs.from_graphs([(features, adjacency)])
    with torch.no_grad():
        nodes = node_model(torch.arange(7, dtype=DTYPE)[:, None])
        torch.testing.assert_close(nodes.mean(0, keepdim=True), graph_model(x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("level", ["graph", "node"])
def test_branches_keep_graph_inputs(level):
    """Merged branches are still node features of graphs, so Aggregate may follow a FanIn.

    Two independent Dense branches summed are one Dense with the summed variances (Σ and Θ alike),
    which pins the merged kernel exactly.
    """
    g = torch.Generator().manual_seed(5)
    if level == "graph":
        fmt, x = gpntk.GraphInputs.from_graphs(
            [(torch.randn(n, 3, generator=g, dtype=torch.float64), (torch.rand(n, n, generator=g) < 0.5).double())
             for n in (3, 5, 4)]
        )
        tail = [L.GlobalSumPool(), L.Dense(1.0, 0.0)]
    else:
        fmt = gpntk.NodeGraph(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.rand(6, 6, generator=g))
        x = torch.arange(6, dtype=torch.float64)[:, None]
        tail = [L.Dense(1.0, 0.0)]
    head = [L.Aggregate(), L.Dense(1.0, 0.1), L.ReLU()]
    branched = L.serial(*head, L.FanOut(2), L.parallel(L.Dense(1.0, 0.1), L.Dense(0.5, 0.2)), L.FanInSum(),
                        L.Aggregate(), L.ReLU(), *tail)
    merged = L.serial(*head, L.Dense(1.5, 0.3), L.Aggregate(), L.ReLU(), *tail)
    for kernel_class in (gpntk.NNGPKernel, gpntk.NTKKernel):
        with torch.no_grad():
            actual = kernel_class(branched, input_shape=fmt)(x).to_dense()
            expected = kernel_class(merged, input_shape=fmt)(x).to_dense()
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    concat = L.serial(*head, L.FanOut(2), L.parallel(L.Dense(1.0, 0.1), L.Identity()), L.FanInConcat(),
                      L.Aggregate(), L.Dense(1.0, 0.0), L.ReLU(), *tail)
    assert torch.isfinite(gpntk.NTKKernel(concat, input_shape=fmt)(x).to_dense()).all()
