r"""Finite graph networks converge to their analytic graph kernels: Monte Carlo over random initialisations.

Three architectures (``ARCHITECTURES``), on random graphs drawn here (seeded):

* ``gntk``: ``gpntk.layers.gntk(2, 1)``, Du et al. (2019)'s graph NTK network with two BLOCKs of
  one ReLU layer each, jumping knowledge (a sum-pooled readout of every depth 0..2), no biases, on
  four undirected random graphs of 4, 6, 8 and 5 nodes with their "sum" aggregation :math:`A + I`
  (``GraphInputs.from_graphs``, padded to 8 nodes), 3 Gaussian features per node;
* ``gcn_mean``: a graph-level GCN with biases, ``Aggregate, Dense(2, 0.1), ReLU, Aggregate,
  Dense(2, 0.1), ReLU, GlobalAvgPool, Dense(2, 0.1)``, on the same graphs with the row-normalised
  (mean) aggregation :math:`D^{-1}(A + I)`, which is not symmetric. With biases the padding nodes
  of a graph get non-zero features, so the masked average over the real nodes matters;
* ``gcn_node``: a node-level two-layer GCN ``Aggregate, Dense(2, 0.1), ReLU, Aggregate,
  Dense(2, 0.1)`` on one random 15-node graph with the symmetric normalisation and self loops
  :math:`D^{-1/2}(A + I)D^{-1/2}` (``NodeGraph.from_edges``), 4 Gaussian features per node; the
  inputs are the 15 node indices.

For each, the average over random initialisations (``gpntk.monte_carlo_kernel``, float64
networks) of the empirical NTK, and of the empirical NNGP ``f(x) f(x')ᵀ`` averaged over ``2 *
width`` output channels, of ``net.finite(width, input_shape=...)`` is compared with the analytic
``NTKKernel`` / ``NNGPKernel(net, input_shape=...)`` self-kernel of all inputs (diagonal included):
4×4 graph kernels, 15×15 node kernels. The statistics follow
``test_monte_carlo_architectures.py``:

* fast tier (``test_kernel_within_monte_carlo_error_at_width_256``): 32 networks of width 256;
  every entry of the analytic kernel lies within ``4 * stderr + bias`` of the Monte Carlo mean, with
  the finite-width bias allowance ``2 * depth / width * sqrt(K(x, x) K(x', x'))`` (``depth``:
  hidden layers on the longest path, 2 for the graph-level networks). The node-level GCN has one
  hidden layer: its first pre-activations are linear in Gaussian weights, hence exactly Gaussian,
  and each hidden channel contributes an i.i.d. term to both empirical kernels, so its estimates
  are unbiased at any width and it is checked with no allowance at all;
* slow tier, 128 networks per width in 16 independently seeded batches of 8, widths 16, 64, 512:
  the relative Frobenius error at width 512 is at most 4 % (measured 0.4-2.0 %); the per-entry
  bound above at widths 64 and 512 (and at 16 too for the unbiased one-hidden-layer GCN); the
  estimates converge like ``width^-1/2`` (fitted log-log slope of one network's spread in
  [-0.75, -0.3], spread and the typical error of an 8-network average at least 2.5x smaller at
  width 512 than at 16, 5.7x expected);
* the checks can fail: plausible wrong twins of each case (the self loops of the GNTK's
  aggregation dropped; the graph GCN's adjacency transposed, i.e. the column instead of the row
  normalisation, a mix-up of which node receives; the padding nodes counted in the average; the
  node GCN row-normalised or without self loops: 8-190 % from the estimates) must fail the bounds
  the right kernel passes: beyond the 4 % bound, at least 4x further from the estimate than the
  right kernel, and outside the per-entry bound by at least 2x somewhere.

Cheap exact checks of the finite networks' graph semantics sit beside (fast tier): padding a
graph further, or renumbering its nodes, leaves a graph-level network's outputs unchanged (to
rounding) for the same weights, and a node-level network's output at a node depends only on the
nodes within two hops.

Measured (slow tier): the width-512 errors are 0.4-2.0 %; max |mean - exact| / stderr is 2.5 at
width 512 and 4.1 at width 64 (gntk NTK, inside its bias allowance: worst excess 0.46 over all
cases); spread slopes -0.45 to -0.53; the wrong twins are 8-190 % from the estimates, 5.5-58x
outside the per-entry bound. Fast tier: relative errors 0.5-3 % at width 256, worst excess 0.55.
The estimates are seeded (deterministic). Runtime: ~5 s for the fast tier, ~60 s for the slow one
(one thread).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from _graph_cases import (
    DTYPE,
    NODES,
    gcn_mean,
    gcn_node,
    graph_rows,
    graphs,
    node_graph,
    node_indices,
    plus_identity,
    row_normalised,
)

import gpntk
from gpntk import layers as L
from gpntk.kernels.dense import nngp_and_ntk

N_BATCHES, BATCH = 16, 8  # slow tier: 128 networks per width, in 16 independently seeded batches
FAST_WIDTH, FAST_BATCHES = 256, 4  # fast tier: 32 networks of width 256
WIDTHS = (16, 64, 512)
NNGP_CHANNELS_PER_WIDTH = 2  # NNGP estimates average over out_features = 2 * width channels
TOLERANCE = 0.04  # relative Frobenius error at the largest width
N_SE = 4.0  # per-entry bound: N_SE standard errors ...
BIAS_PER_LAYER = 2.0  # ... plus BIAS_PER_LAYER * depth / width * sqrt(K(x, x) K(x', x'))
SEED = 0


class Inputs(NamedTuple):
    net: L.Layer
    x: torch.Tensor
    input_shape: gpntk.GraphInputs | gpntk.NodeGraph


class Architecture(NamedTuple):
    right: Inputs  # the network, its inputs and their format
    wrong: dict[str, Inputs]  # plausible mistakes: their kernels must be rejected by the same checks
    depth: int  # hidden layers on the longest path, for the finite-width bias allowance


def _graph_inputs(net: L.Layer, adjacency_of, mask_padding: bool = True) -> Inputs:
    fmt, x = graph_rows(graphs(), adjacency_of, mask_padding=mask_padding)
    return Inputs(net, x, fmt)


def _node_inputs(net: L.Layer, **normalization) -> Inputs:
    return Inputs(net, node_indices(), node_graph(**normalization))


@functools.lru_cache(maxsize=None)
def architecture(name: str) -> Architecture:
    """The case ``name`` (one of ``NAMES``): the network on its graphs, and its wrong twins."""
    if name == "gntk":
        return Architecture(
            _graph_inputs(L.gntk(2, 1), plus_identity),
            {"without self loops": _graph_inputs(L.gntk(2, 1), lambda a: a)},
            2,
        )
    if name == "gcn_mean":
        return Architecture(
            _graph_inputs(gcn_mean(), row_normalised),
            {
                "adjacency transposed": _graph_inputs(gcn_mean(), lambda a: row_normalised(a).T),
                "padding counted": _graph_inputs(gcn_mean(), row_normalised, mask_padding=False),
            },
            2,
        )
    assert name == "gcn_node"
    return Architecture(
        _node_inputs(gcn_node()),
        {
            "row normalisation": _node_inputs(gcn_node(), normalization="row"),
            "without self loops": _node_inputs(gcn_node(), self_loops=False),
        },
        1,
    )


NAMES = ("gntk", "gcn_mean", "gcn_node")
CASES = [(name, kind) for name in NAMES for kind in ("ntk", "nngp")]
IDS = [f"{name}-{kind}" for name, kind in CASES]


# --- the estimates ----------------------------------------------------------------------------------
def exact_kernel(inputs: Inputs, kind: str) -> torch.Tensor:
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(inputs.net, inputs.x, input_shape=inputs.input_shape)
    return ntk if kind == "ntk" else nngp


def _relative_error(mean: torch.Tensor, exact: torch.Tensor) -> float:
    return ((mean - exact).norm() / exact.norm()).item()


def _excess(mean: torch.Tensor, se: torch.Tensor, exact: torch.Tensor, depth: int, width: int) -> float:
    """``max |mean - exact| / (N_SE * se + BIAS_PER_LAYER * depth / width * sqrt(K_ii K_jj))``: <= 1 passes."""
    scale = exact.diagonal().sqrt()
    allowance = N_SE * se + BIAS_PER_LAYER * depth / width * scale[:, None] * scale[None, :]
    return ((mean - exact).abs() / allowance).max().item()


def _estimate(name: str, kind: str, width: int, n_batches: int, seed: int) -> dict:
    """Mean and standard error of ``n_batches`` seeded batches of ``BATCH`` networks of ``width``."""
    inputs = architecture(name).right
    out_features = 1 if kind == "ntk" else NNGP_CHANNELS_PER_WIDTH * width
    means, ses = [], []
    for batch in range(n_batches):
        mean, se = gpntk.monte_carlo_kernel(
            inputs.net, inputs.x, width=width, n_samples=BATCH, kind=kind, out_features=out_features,
            seed=seed + batch, input_shape=inputs.input_shape,
        )
        means.append(mean.detach())
        ses.append(se.detach())
    return {
        "means": means,
        "mean": torch.stack(means).mean(0),
        "se": torch.stack(ses).square().sum(0).sqrt() / n_batches,
    }


def _seed(name: str, kind: str, width: int) -> int:
    return SEED + 100_000 * CASES.index((name, kind)) + 100 * width


@functools.lru_cache(maxsize=None)
def study(name: str, kind: str) -> dict:
    """Analytic kernel and, per width, the Monte Carlo estimates of ``N_BATCHES`` batches.

    ``error``: relative Frobenius error of the 128-network mean; ``batch_error``: the average over
    batches of the error of each batch's mean (the typical error of a ``BATCH``-network average);
    ``spread``: the relative spread of one network's kernel around the mean.
    """
    exact = exact_kernel(architecture(name).right, kind)
    results = {}
    for width in WIDTHS:
        r = _estimate(name, kind, width, N_BATCHES, _seed(name, kind, width))
        r["error"] = _relative_error(r["mean"], exact)
        r["batch_error"] = float(np.mean([_relative_error(m, exact) for m in r["means"]]))
        r["spread"] = ((r["se"] * math.sqrt(N_BATCHES * BATCH)).norm() / exact.norm()).item()
        results[width] = r
    return {"exact": exact, "widths": results}


# --- fast tier -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_kernel_within_monte_carlo_error_at_width_256(name, kind):
    arch = architecture(name)
    exact = exact_kernel(arch.right, kind)
    r = _estimate(name, kind, FAST_WIDTH, FAST_BATCHES, _seed(name, kind, FAST_WIDTH) + 50)
    excess = _excess(r["mean"], r["se"], exact, arch.depth if arch.depth > 1 else 0, FAST_WIDTH)
    print(f"\n{name} {kind}: relative error {_relative_error(r['mean'], exact):.4f}, excess {excess:.2f}")
    assert excess <= 1.0, (excess, ((r["mean"] - exact).abs() / r["se"]).max().item())


def test_padding_and_node_order_leave_graph_outputs_unchanged():
    """The same weights on a graph padded further, or with its nodes renumbered, give the same outputs.

    With biases the padding nodes carry features (σb·b, then ReLU of it), so this checks that the
    finite ``GlobalAvgPool`` averages over the real nodes only and that aggregation reads each row's
    own adjacency and mask.
    """
    fmt, x = graph_rows(graphs(), row_normalised)
    wide_fmt, wide_x = graph_rows(graphs(), row_normalised, nodes=11)
    g = torch.Generator().manual_seed(1)
    perms = [torch.randperm(f.shape[0], generator=g) for f, _ in graphs()]
    assert sum(not torch.equal(p, torch.arange(len(p))) for p in perms) >= 3
    _, permuted_x = graph_rows([(f[p], a[p][:, p]) for (f, a), p in zip(graphs(), perms)], row_normalised)
    for net in (gcn_mean(), L.gntk(2, 1)):
        outputs = []
        for f, rows in ((fmt, x), (wide_fmt, wide_x), (fmt, permuted_x)):
            model = net.finite(32, input_shape=f, out_features=3, generator=torch.Generator().manual_seed(5)).to(rows)
            with torch.no_grad():
                outputs.append(model(rows))
        assert outputs[0].abs().min() > 1e-3  # the outputs are not trivially zero
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-12, atol=1e-12)


def test_node_outputs_depend_on_two_hop_neighbourhoods_only():
    """Changing the features of one node changes the outputs of exactly the nodes within two hops of it."""
    graph = node_graph()
    loops = graph.adjacency.to_dense() + torch.eye(NODES, dtype=DTYPE)
    reach = (loops @ loops) != 0  # (receiver, sender): within two hops

    def outputs(features: torch.Tensor) -> torch.Tensor:
        moved = gpntk.NodeGraph(features, graph.adjacency)
        model = gcn_node().finite(64, input_shape=moved, generator=torch.Generator().manual_seed(3)).to(DTYPE)
        with torch.no_grad():
            return model(node_indices())[:, 0]

    before = outputs(graph.features)
    for node in (0, 7):
        features = graph.features.clone()
        features[node] += 1.0
        changed = (outputs(features) - before).abs() > 1e-12
        assert torch.equal(changed, reach[:, node]), (node, changed, reach[:, node])
    assert not bool(reach.all())  # some nodes are further than two hops apart


# --- slow tier -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_converges_at_the_largest_width(name, kind):
    errors = {w: r["error"] for w, r in study(name, kind)["widths"].items()}
    print(f"\n{name} {kind}: relative errors {errors}")
    assert errors[WIDTHS[-1]] <= TOLERANCE, errors


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_analytic_kernel_within_monte_carlo_error(name, kind):
    s, depth = study(name, kind), architecture(name).depth
    exact = s["exact"]
    for width in WIDTHS[1:]:
        r = s["widths"][width]
        excess = _excess(r["mean"], r["se"], exact, depth, width)
        print(f"\n{name} {kind} width {width}: excess {excess:.2f}, "
              f"max |Δ|/SE {((r['mean'] - exact).abs() / r['se']).max().item():.2f}")
        assert excess <= 1.0, (width, excess)
    if depth == 1:  # one hidden layer: unbiased at every width, within N_SE standard errors
        for width in WIDTHS:
            r = s["widths"][width]
            assert _excess(r["mean"], r["se"], exact, 0, width) <= 1.0, width


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_error_shrinks_like_inverse_sqrt_width(name, kind):
    s = study(name, kind)
    spreads = [s["widths"][w]["spread"] for w in WIDTHS]
    batch_errors = [s["widths"][w]["batch_error"] for w in WIDTHS]
    slope = np.polyfit(np.log(WIDTHS), np.log(spreads), 1)[0]
    print(f"\n{name} {kind}: spreads {spreads} (slope {slope:.2f}), batch errors {batch_errors}")
    assert -0.75 <= slope <= -0.3, (slope, dict(zip(WIDTHS, spreads)))
    assert spreads[0] >= 2.5 * spreads[-1], dict(zip(WIDTHS, spreads))
    assert batch_errors[0] >= 2.5 * batch_errors[-1], dict(zip(WIDTHS, batch_errors))


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_wrong_kernel_is_rejected(name, kind):
    """The kernel of a plausible mistake fails the very bounds the right one passes."""
    s, arch = study(name, kind), architecture(name)
    width = WIDTHS[-1]
    r = s["widths"][width]
    for mistake, inputs in arch.wrong.items():
        wrong = exact_kernel(inputs, kind)
        wrong_error = _relative_error(r["mean"], wrong)
        excess = _excess(r["mean"], r["se"], wrong, arch.depth, width)
        print(f"\n{name} {kind} {mistake}: error {wrong_error:.3f} (right {r['error']:.4f}), excess {excess:.1f}")
        assert wrong_error > TOLERANCE, (mistake, wrong_error)
        assert wrong_error >= 4.0 * r["error"], (mistake, wrong_error, r["error"])
        assert excess >= 2.0, (mistake, excess)
