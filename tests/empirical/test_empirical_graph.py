r"""The empirical NTK of finite graph networks (``net.finite(width, input_shape=GraphInputs | NodeGraph)``).

Graph networks mix the nodes of a graph (``AggregateNodes``) and read the graph from a binding
that the wrapper fills during a forward pass, so ``gpntk.empirical_ntk`` takes its full-Jacobian
path (``torch.func.jacrev``) for them. Checked here, on the graphs of ``_graph_cases`` (four
padded random graphs for graph-level networks, one 15-node graph for the node-level GCN):

* the Jacobian path equals a reference written here with nothing but ``torch.autograd.grad``:
  one gradient per (input, output channel), flattened over every trainable parameter, and
  :math:`\hat\Theta_{ab}(x, x') = \langle \nabla_\theta f_a(x), \nabla_\theta f_b(x')\rangle`,
  for ``x1 != x2``, three output channels, ``reduce="none"`` and ``"mean"``, to 1e-10 relative
  (float64; both sum the same products in another order). The structured path either refuses
  these modules (``ValueError``) or agrees to the same precision;
* one wide network's empirical NTK is close to the analytic limit. Tolerance: the relative
  Frobenius spread of one network's NTK around its mean, measured at width 512 in
  ``test_monte_carlo_graph.py`` (0.118 for ``gntk``, 0.090 for ``gcn_mean``, 0.060 for
  ``gcn_node``), shrinks like ``width^-1/2``; a draw must lie within 4 such spreads at its width,
  ``4 · s_512 · sqrt(512 / width)`` (a rough check: 24 %, 18 % and 8.5 %; measured over three
  draws each: at most 3.7 %, 4.6 % and 4.6 %). The finite-width bias, ``O(depth / width)``
  (< 0.2 % here), is far below. The ``gntk`` draw is also checked to be far (186 %, more than twice
  the bound) from the kernel of the graphs without self loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from _graph_cases import gcn_mean, gcn_node, graph_rows, graphs, node_graph, node_indices, plus_identity, row_normalised

import gpntk
from gpntk import layers as L
from gpntk.core.finite import NTKLinear
from gpntk.kernels.dense import nngp_and_ntk

CASES = ("gntk", "gcn_mean", "gcn_node")
SPREAD_AT_512 = {"gntk": 0.118, "gcn_mean": 0.090, "gcn_node": 0.060}  # test_monte_carlo_graph.py, slow tier
WIDE = {"gntk": 2048, "gcn_mean": 2048, "gcn_node": 4096}


def case(name: str):
    """``(net, input_shape, x1, x2)``: the network, its input format, and two different sets of inputs."""
    if name == "gcn_node":
        x = node_indices()
        return gcn_node(), node_graph(), x, x[[3, 11, 0, 7]]
    net, adjacency_of = (L.gntk(2, 1), plus_identity) if name == "gntk" else (gcn_mean(), row_normalised)
    fmt, x = graph_rows(graphs(), adjacency_of)
    return net, fmt, x, x[[2, 0]]


def autograd_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, k, P)``: the gradient of every output ``f_a(x_i)`` w.r.t. all trainable parameters, flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    rows = []
    for i in range(out.shape[0]):
        for a in range(out.shape[1]):
            grads = torch.autograd.grad(out[i, a], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    return torch.stack(rows).unflatten(0, out.shape)


@pytest.mark.parametrize("name", CASES)
def test_jacobian_ntk_equals_autograd_reference(name):
    net, fmt, x1, x2 = case(name)
    model = net.finite(12, input_shape=fmt, out_features=3, generator=torch.Generator().manual_seed(2)).to(x1)
    j1, j2 = autograd_jacobian(model, x1), autograd_jacobian(model, x2)
    reference = torch.einsum("iap,jbp->ijab", j1, j2)
    assert reference.abs().max() > 1e-2
    for a, b in ((x1, x2), (x2, x2)):
        expected = reference if a is x1 else torch.einsum("iap,jbp->ijab", j2, j2)
        full = gpntk.empirical_ntk(model, a, b, reduce="none", method="jacobian")
        torch.testing.assert_close(full, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
        mean = gpntk.empirical_ntk(model, a, b)  # method "auto"
        torch.testing.assert_close(mean, expected.diagonal(dim1=-2, dim2=-1).mean(-1), rtol=1e-10, atol=1e-12)
        try:
            structured = gpntk.empirical_ntk(model, a, b, reduce="none", method="structured")
        except ValueError:  # refused: the graph modules are not row-wise
            continue
        torch.testing.assert_close(structured, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def test_frozen_hidden_layer_contributes_nothing():
    """``Dense(trainable=False)`` in a graph network: the empirical NTK is the readout's alone, i.e. one
    sample of the NNGP feature product ``s²·⟨φ(x), φ(x')⟩ + σb²`` of the last hidden features."""
    graph = node_graph()
    x = node_indices()
    model = gcn_node(trainable_hidden=False).finite(
        16, input_shape=graph, generator=torch.Generator().manual_seed(4)
    ).to(x)
    kernel = gpntk.empirical_ntk(model, x)
    readout = [m for m in model.modules() if isinstance(m, NTKLinear)][-1]
    features = {}
    handle = readout.register_forward_hook(lambda module, inputs, output: features.setdefault("phi", inputs[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    phi = features["phi"][0]  # (N, width): the readout's input at every node of the one graph
    expected = readout.weight_std**2 / phi.shape[-1] * phi @ phi.T + readout.bias_std**2
    torch.testing.assert_close(kernel, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_one_wide_network_is_close_to_the_limit(name):
    net, fmt, x, _ = case(name)
    with torch.no_grad():
        _, limit = nngp_and_ntk(net, x, input_shape=fmt)
    width = WIDE[name]
    model = net.finite(width, input_shape=fmt, generator=torch.Generator().manual_seed(0)).to(x)
    kernel = gpntk.empirical_ntk(model, x)
    error = ((kernel - limit).norm() / limit.norm()).item()
    bound = 4 * SPREAD_AT_512[name] * math.sqrt(512 / width)
    print(f"\n{name} width {width}: relative error of one network's NTK {error:.4f} (bound {bound:.3f})")
    assert error <= bound
    if name == "gntk":  # the same draw is far from the kernel of the graphs without self loops
        fmt_wrong, x_wrong = graph_rows(graphs(), lambda a: a)
        with torch.no_grad():
            _, wrong = nngp_and_ntk(net, x_wrong, input_shape=fmt_wrong)
        assert ((kernel - wrong).norm() / wrong.norm()).item() > 2 * bound
