"""``GraphDataset``: graph-level kernels on graph indices, evaluated bucket by bucket.

The reference is the same network on rows of ``GraphInputs`` holding every graph padded to the
largest (one evaluation, no buckets): bucketing and padding must not change a value. Features are
random and continuous, so no two nodes of different graphs have correlation one (where the ReLU
NTK is ill-conditioned and two summation orders would differ in the ninth digit).
"""

from __future__ import annotations

import math

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.blockwise import kernel_matmul

TOL = 1e-12
SIZES = (3, 9, 4, 12, 5, 3, 10, 6)  # several buckets at growth 1.25


def _graphs(seed: int = 0, channels: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for n in SIZES:
        weights = torch.rand(n, n, generator=g, dtype=torch.float64)
        adjacency = weights * (torch.rand(n, n, generator=g, dtype=torch.float64) < 0.4)  # weighted, directed
        graphs.append((torch.randn(n, channels, generator=g, dtype=torch.float64), adjacency))
    return graphs


def _net() -> L.Serial:
    return L.serial(
        L.Aggregate(), L.Dense(1.7, 0.2), L.ReLU(), L.Aggregate(), L.Dense(2.0, 0.1), L.Erf(),
        L.GlobalAvgPool(), L.Dense(1.0, 0.05),
    )


def _indices(index) -> torch.Tensor:
    return torch.as_tensor(index, dtype=torch.float64)[:, None]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def setting():
    graphs = _graphs()
    fmt, rows = gpntk.GraphInputs.from_graphs(graphs)
    return graphs, gpntk.GraphDataset(graphs), fmt, rows


@pytest.mark.parametrize("kernel_class", [gpntk.NNGPKernel, gpntk.NTKKernel])
def test_equals_padded_rows(setting, kernel_class):
    graphs, dataset, fmt, rows = setting
    net = _net()
    expected = kernel_class(net, input_shape=fmt)(rows).to_dense().detach()
    kernel = kernel_class(net, input_shape=dataset)
    x = _indices(range(len(graphs)))
    assert _relative(kernel(x).to_dense().detach(), expected) <= TOL
    assert _relative(kernel(x, diag=True).detach(), expected.diagonal()) <= TOL
    # unsorted, repeated indices on both sides, and a pairwise diagonal
    left, right = [6, 0, 3, 3, 7], [1, 6, 2, 5, 0]
    assert _relative(kernel(_indices(left), _indices(right)).to_dense().detach(), expected[left][:, right]) <= TOL
    assert _relative(kernel(_indices(left), _indices(right), diag=True).detach(), expected[left, right]) <= TOL


def test_gradients_equal_padded_rows(setting):
    graphs, dataset, fmt, rows = setting
    net = _net()
    weights = torch.randn(len(graphs), len(graphs), dtype=torch.float64)
    x = _indices(range(len(graphs)))
    grads = []
    cases = ((gpntk.NTKKernel(net, input_shape=fmt), rows), (gpntk.NTKKernel(net, input_shape=dataset), x))
    for kernel, inputs in cases:
        net.zero_grad()
        (kernel(inputs).to_dense() * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert _relative(grads[1], grads[0]) <= 1e-11


def test_batched_hyperparameters(setting):
    graphs, dataset, fmt, rows = setting
    x = _indices(range(len(graphs)))
    batched = gpntk.NNGPKernel(_net(), input_shape=dataset, batch_shape=torch.Size([2]))
    with torch.no_grad():
        first = batched.net.layers[1].weight_variance
        batched.net.layers[1].weight_variance = torch.stack([first[0], 2 * first[1]])
        values = batched(x).to_dense()
        for b in range(2):
            single = gpntk.NNGPKernel(batched[b].net, input_shape=fmt)(rows).to_dense()
            assert _relative(values[b], single) <= TOL


def test_products_for_krylov_solvers(setting):
    graphs, dataset, fmt, rows = setting
    net = _net()
    x = _indices(range(len(graphs)))
    hyper = Hyperparameters.collect(net, like=x)
    rhs = torch.randn(len(graphs), 3, dtype=torch.float64)
    products = kernel_matmul(net, x, x, hyper, rhs, kinds=("nngp", "ntk"), input_shape=dataset)
    with torch.no_grad():
        for kind, product in zip(("nngp", "ntk"), products):
            kernel = (gpntk.NNGPKernel if kind == "nngp" else gpntk.NTKKernel)(net, input_shape=fmt)
            assert _relative(product, kernel(rows).to_dense() @ rhs) <= TOL


def test_trained_ensemble_equals_padded_rows(setting):
    graphs, dataset, fmt, rows = setting
    net = _net()
    y = torch.randn(len(graphs), dtype=torch.float64)
    train, test = [0, 2, 4, 6, 7], [1, 3, 5]
    by_rows = gpntk.TrainedEnsemble(net, rows[train], y[train], 0.5, 1e-6, input_shape=fmt)
    by_index = gpntk.TrainedEnsemble(net, _indices(train), y[train], 0.5, 1e-6, input_shape=dataset)
    for t in (3.0, math.inf):
        mean_r, cov_r = by_rows.moments(rows[test], t, "ntk")
        mean_i, cov_i = by_index.moments(_indices(test), t, "ntk")
        assert _relative(mean_i, mean_r) <= 1e-10
        assert _relative(cov_i, cov_r) <= 1e-10


def test_finite_network_reads_indices_like_rows(setting):
    graphs, dataset, fmt, rows = setting
    net = _net()
    by_rows = net.finite(16, input_shape=fmt, generator=torch.Generator().manual_seed(3)).double()
    by_index = net.finite(16, input_shape=dataset, generator=torch.Generator().manual_seed(3)).double()
    picked = [5, 1, 1, 7]
    assert torch.allclose(by_index(_indices(picked)), by_rows(rows[picked]), rtol=1e-12, atol=1e-12)


def test_graph_kernel_matrices_equal_dataset_kernel(setting):
    graphs, dataset, fmt, rows = setting
    net = _net()
    x = _indices(range(len(graphs)))
    nngp, ntk = gpntk.graph_kernel_matrices(net, graphs)
    with torch.no_grad():
        assert _relative(nngp, gpntk.NNGPKernel(net, input_shape=dataset)(x).to_dense()) <= TOL
        assert _relative(ntk, gpntk.NTKKernel(net, input_shape=dataset)(x).to_dense()) <= TOL


def test_bad_inputs_are_refused(setting):
    graphs, dataset, fmt, rows = setting
    kernel = gpntk.NTKKernel(_net(), input_shape=dataset)
    with pytest.raises(ValueError, match=r"graph indices must lie in \[0, 8\)"):
        kernel(_indices([0, 8])).to_dense()
    with pytest.raises(ValueError, match="whole numbers"):
        kernel(torch.tensor([[0.5]], dtype=torch.float64)).to_dense()
    with pytest.raises(ValueError, match="without batch dimensions"):
        kernel(_indices([0, 1]).expand(2, 2, 1)).to_dense()
    with pytest.raises(ValueError, match="cannot evaluate a kernel on GraphDataset indices matrix-free"):
        gpntk.NTKKernel(_net(), input_shape=dataset, backend="blockwise")
    with pytest.raises(ValueError, match="same number of feature channels"):
        gpntk.GraphDataset([(torch.ones(2, 3), torch.eye(2)), (torch.ones(2, 4), torch.eye(2))])
    with pytest.raises(ValueError, match="NaN or infinite"):
        gpntk.GraphDataset([(torch.full((2, 3), math.nan), torch.eye(2))])
    with pytest.raises(gpntk.ArchitectureError, match=r"GlobalSumPool\(\) or GlobalAvgPool\(\) over the nodes"):
        gpntk.NTKKernel(L.serial(L.Aggregate(), L.Dense(1.0, 0.0)), input_shape=dataset)


def test_in_place_changes_are_refused():
    graphs = _graphs(seed=1)
    dataset = gpntk.GraphDataset(graphs)
    kernel = gpntk.NNGPKernel(_net(), input_shape=dataset)
    x = _indices([0, 1])
    kernel(x).to_dense()
    graphs[0][0].mul_(2)  # the caller's tensor: the dataset holds its own copy
    kernel(x).to_dense()
    dataset.graphs[0][0].mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        kernel(x).to_dense()
