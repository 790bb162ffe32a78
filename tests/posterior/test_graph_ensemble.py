r"""The trained-ensemble posterior on graphs: against its closed form, and against trained finite graph networks.

**Closed form** (fast tier). ``TrainedEnsemble(net, train_x, train_y, learning_rate, diag_reg,
input_shape=...)`` on graph-level inputs (``GraphInputs``: train on 7 random graphs, test on 3
others) and node-level inputs (``NodeGraph``, transductive: train on 9 nodes of a 15-node graph,
test on the other 6) is compared with the posterior computed here from the kernel matrices
(``nngp_and_ntk`` of all inputs at once) with ``torch.linalg.eigh`` of the training kernel, as
in Lee et al. (2019, eqs. 15-16) and ``tests/reference/README.md``: with :math:`G` the kernel that
drives training (:math:`\Theta` in regime ``"ntk"``, :math:`\Sigma` in ``"nngp"``) plus
``diag_reg``·I, :math:`P` the prior (:math:`\Sigma`, plus ``diag_reg``·I on the training block
where :math:`P = G`), :math:`G = V \Lambda V^\top` and
:math:`A_t = V \mathrm{diag}\bigl((1 - e^{-\eta t\lambda/(nk)})/\lambda\bigr) V^\top`,

.. math::
    \mu_t = G_{*X} A_t Y, \qquad
    \Sigma_t = P_{**} - G_{*X} A_t P_{X*} - P_{*X} A_t G_{X*} + G_{*X} A_t P_{XX} A_t G_{X*},

at t = 0, a few finite times and ∞ (:math:`A_\infty = G^{-1}`), for ``diag_reg`` 0 and 1e-2. Both
sides do float64 linear algebra on the same matrices; the training kernels' condition numbers are
below 1e6 (asserted; they are 1e2-2e4), so rounding (ε·cond ≲ 1e-10 relative) stays well below
the 1e-8 relative tolerance (that of the Neural Tangents posterior cases, README). Measured: at
most 3e-13 relative.

**Trained finite networks** (slow tier), as ``test_posterior_vs_training.py`` (whose docstring
has the statistical argument in full; shared code in ``tests/_ensemble_study.py``):

* node-level: 200 GCNs ``Aggregate, Dense(2, 0.1), ReLU, Aggregate, Dense(2, 0.1)`` of width
  1024 on the 15-node graph (symmetric normalisation, self loops), 2 outputs, each trained by
  full-batch gradient descent ``θ ← θ − lr·∇θ [1/(2nk)·‖f(X) − Y‖²]`` on the 9 training nodes
  (the whole graph goes through every forward pass; the loss reads the training nodes), lr a
  twentieth of the stability limit, T = 60 and 240 steps;
* graph-level: 200 GNTK networks ``gntk(1, 1, readout="mean")`` (one BLOCK of one ReLU layer,
  jumping knowledge: an average-pooled readout of the input features plus one of the block,
  no biases) of width 512 on 8 training and 4 test graphs (aggregation :math:`A + I`), 2 outputs.

Both networks have one hidden layer, whose pre-activations are linear in Gaussian weights (the
first aggregation is a fixed linear map of the input features), so the initial outputs have
exactly the NNGP as covariance at any width. The empirical mean and standard deviation of the
trained outputs at the test and training inputs must then match ``TrainedEnsemble.moments(x, T,
regime)`` within Z = 4 Monte Carlo standard errors plus the measured finite-width deviation
rms(d) (regime ``"ntk"``: all layers trained; ``"nngp"``: the hidden ``Dense`` frozen, only the
readouts trained); the linearised ensemble alone within Z standard errors; rms(d)·sqrt(width) is
O(1) relative to the initial residual (median below 1, max below 2) and shrinks like
``width^-1/2`` (a width-256 / 128 ensemble of 200 networks); and the posterior at t = 2T or T/2
is rejected (excess > 2).

Measured: node level, worst excess (error / tolerance) 0.41 for the mean and 0.33 for the
standard deviation, the linearised ensembles within 3.0 SE, rms(d)·sqrt(width)/residual median
0.26-0.43 and max 0.77, width 256 vs 1024 rms(d) ratio 2.10-2.11 (2 expected), wrong times
rejected with excess 4.0-9.3; graph level, worst excess 0.65 (the ntk mean at T = 240: 8 SE
from μ_T at a training graph, within rms(d), as for the MLP), linearised within 3.0 SE,
rms(d)·sqrt(width)/residual median 0.29-0.54 and max 1.14, width 128 vs 512 ratio 1.84-2.02,
wrong times rejected with excess 2.8-5.6. Runtime ~35 s per level (one thread). Training is batched by hand
(parameters stacked along a leading dimension, one autograd call on the summed losses); a test
checks it against plain per-network autograd training of the ``nn.Module`` itself. Networks run in
float32, kernels and posterior in float64. Seeded (deterministic).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from _ensemble_study import PosteriorAgreementTests, check_plain_training, run_study
from _graph_cases import DTYPE, gcn_mean, gcn_node, graph_rows, graphs, node_graph, plus_identity, row_normalised
from torch import Tensor

import gpntk
from gpntk import layers as L
from gpntk.core.finite import NTKLinear
from gpntk.kernels.dense import nngp_and_ntk

K = 2  # outputs
REGIMES = ("ntk", "nngp")
LR_FRACTION = 1 / 20  # of max_learning_rate(regime): lr·λmax/(nk) = 0.1
Z = 4.0  # standard errors allowed
CLOSED_FORM_RTOL = 1e-8  # relative to the largest value compared (see the docstring)


# --- the closed form -------------------------------------------------------------------------------------
def closed_form(nngp: Tensor, ntk: Tensor, y: Tensor, n_test: int, regime: str, lr: float, t: float,
                diag_reg: float) -> tuple[Tensor, Tensor]:
    """``(mean (m, k), cov (m, m))`` at the first ``n_test`` inputs from the kernels of ``(test, train)`` inputs.

    ``nngp``, ``ntk``: ``(m + n, m + n)`` kernels of the test inputs followed by the training inputs.
    """
    n, k = y.shape
    s = slice(0, n_test)
    x = slice(n_test, n_test + n)
    drive = ntk if regime == "ntk" else nngp
    g_xx = drive[x, x] + diag_reg * torch.eye(n, dtype=drive.dtype)
    p_xx = nngp[x, x] + (diag_reg * torch.eye(n, dtype=drive.dtype) if regime == "nngp" else 0)
    lam, vec = torch.linalg.eigh(g_xx)
    assert lam.min() > 0
    if math.isinf(t):
        filt = 1 / lam
    else:
        filt = -torch.expm1(-lr * t * lam / (n * k)) / lam
    a_t = vec @ torch.diag(filt) @ vec.T
    g_sx, p_sx = drive[s, x], nngp[s, x]
    mean = g_sx @ a_t @ y
    cov = nngp[s, s] - g_sx @ a_t @ p_sx.T - p_sx @ a_t @ g_sx.T + g_sx @ a_t @ p_xx @ a_t @ g_sx.T
    return mean, cov


def graph_level_problem(net_name: str):
    """``(net, input_shape, train_x, train_y, test_x)``: 10 random graphs of 3-8 nodes, 7 train, 3 test."""
    adjacency_of = plus_identity if net_name == "gntk" else row_normalised
    net = L.gntk(2, 1) if net_name == "gntk" else gcn_mean()
    fmt, x = graph_rows(graphs((5, 3, 8, 6, 4, 7, 5, 8, 3, 6), seed=3, p=0.4), adjacency_of)
    y = torch.randn(7, K, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    return net, fmt, x[:7], y, x[7:]


def node_level_problem():
    """``(net, graph, train_nodes, train_y, test_nodes)``: the 15-node GCN, 9 nodes train, 6 test."""
    graph = node_graph()
    order = torch.randperm(graph.nodes, generator=torch.Generator().manual_seed(5))
    nodes = order.to(DTYPE)[:, None]
    y = torch.randn(9, K, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    return gcn_node(), graph, nodes[:9], y, nodes[9:]


PROBLEMS = {
    "graph-gntk": lambda: graph_level_problem("gntk"),
    "graph-gcn-mean": lambda: graph_level_problem("gcn_mean"),
    "node-gcn": node_level_problem,
}
TIMES = (0.0, 3.0, 30.0, 300.0, math.inf)


@pytest.mark.parametrize("diag_reg", [0.0, 1e-2])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_posterior_equals_closed_form(problem, regime, diag_reg):
    net, fmt, train_x, train_y, test_x = PROBLEMS[problem]()
    with torch.no_grad():
        nngp, ntk = nngp_and_ntk(net, torch.cat([test_x, train_x]), input_shape=fmt)
    n_test = test_x.shape[0]
    drive = (ntk if regime == "ntk" else nngp)[n_test:, n_test:]
    lam = torch.linalg.eigvalsh(drive)
    assert lam[-1] / lam[0] < 1e6  # the conditioning the tolerance assumes
    lr = 0.5 * 2 * train_y.numel() / lam[-1].item()  # half the stability limit: moves well within t = 300
    post = gpntk.TrainedEnsemble(net, train_x, train_y, learning_rate=lr, diag_reg=diag_reg, input_shape=fmt)
    means, covs = post.moments(test_x, torch.tensor(TIMES, dtype=DTYPE), regime)
    scale_mean, scale_cov = train_y.abs().max().item(), nngp[:n_test, :n_test].abs().max().item()
    for i, t in enumerate(TIMES):
        mean, cov = closed_form(nngp, ntk, train_y, n_test, regime, lr, t, diag_reg)
        torch.testing.assert_close(means[i], mean, rtol=0, atol=CLOSED_FORM_RTOL * scale_mean)
        torch.testing.assert_close(covs[i], cov, rtol=0, atol=CLOSED_FORM_RTOL * scale_cov)
        # the same answer one time at a time, and as a distribution
        single_mean, single_cov = post.moments(test_x, t, regime)
        torch.testing.assert_close(single_mean, mean, rtol=0, atol=CLOSED_FORM_RTOL * scale_mean)
        torch.testing.assert_close(single_cov, cov, rtol=0, atol=CLOSED_FORM_RTOL * scale_cov)
    # the dynamics do something: the mean moves from 0 and the variance shrinks from the prior's
    assert means[0].abs().max() == 0 and means[-1].abs().max() > 0.1
    assert (covs[-1].diagonal() < covs[0].diagonal()).all()
    torch.testing.assert_close(covs[0], nngp[:n_test, :n_test], rtol=1e-12, atol=1e-12 * scale_cov)


def test_posterior_at_the_training_inputs_interpolates():
    """Node-level, t = ∞, ridgeless: the mean at the training nodes is Y and their variance is 0 (to
    rounding), in both regimes; at the test nodes the mean is kernel regression on the training nodes."""
    net, graph, train_x, train_y, test_x = node_level_problem()
    post = gpntk.TrainedEnsemble(net, train_x, train_y, input_shape=graph)
    for regime in REGIMES:
        mean, cov = post.moments(train_x, math.inf, regime)
        torch.testing.assert_close(mean, train_y, rtol=0, atol=1e-8)
        assert cov.abs().max() < 1e-8


# --- trained finite networks ---------------------------------------------------------------------------
N_NETWORKS = 200
CHUNK = 100  # networks trained together in one batched computation
STEPS = (60, 240)  # τ·λmax = 6 and 24


def _linears(model: torch.nn.Module) -> list[NTKLinear]:
    return [m for m in model.modules() if isinstance(m, NTKLinear)]


def _stack(tensors: list[Tensor | None], dtype: torch.dtype) -> Tensor | None:
    """Parameters of identically built networks stacked on dim 0, keeping their ``requires_grad``."""
    if tensors[0] is None:
        return None
    return torch.stack([t.detach() for t in tensors]).to(dtype).requires_grad_(tensors[0].requires_grad)


class StackedAffine:
    """One ``NTKLinear`` of every network: ``h ↦ σw/√n_in · h Wᵀ + σb·b`` with ``W (B, out, in)``, ``b (B, out)``."""

    def __init__(self, layers: list[NTKLinear], dtype: torch.dtype):
        self.weight = _stack([m.weight for m in layers], dtype)
        self.bias = _stack([m.bias for m in layers], dtype)
        self.scale = layers[0].weight_std / math.sqrt(layers[0].weight.shape[1])
        self.bias_scale = layers[0].bias_std

    def __call__(self, h: Tensor) -> Tensor:
        """``h (B, ..., in)`` (or ``(..., in)``, the same for every network) to ``(B, ..., out)``."""
        if h.dim() == 2 or h.shape[0] != self.weight.shape[0]:  # shared inputs: broadcast over the networks
            h = h.expand(self.weight.shape[0], *h.shape)
        out = torch.einsum("b...i,boi->b...o", h, self.weight) * self.scale
        if self.bias is not None:
            out = out + self.bias_scale * self.bias.view(self.bias.shape[0], *([1] * (out.dim() - 2)), -1)
        return out

    def trainable(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]


class StackedNodeGCNs:
    """``B`` node-level GCNs ``Aggregate, Dense, ReLU, Aggregate, Dense`` on one graph, batched.

    ``f = Â·relu(Â X W₁ᵀ s₁ + s_b b₁) W₂ᵀ s₂ + s_b b₂`` at every node (``AggregateNodes``: row u of Â
    is what node u receives), read at the requested node indices.
    """

    def __init__(self, models: list[torch.nn.Module], graph: gpntk.NodeGraph, dtype: torch.dtype):
        hidden, readout = zip(*[_linears(m) for m in models])
        self.hidden, self.readout = StackedAffine(list(hidden), dtype), StackedAffine(list(readout), dtype)
        self.adjacency = graph.adjacency.to_dense().to(dtype)
        self.aggregated_features = self.adjacency @ graph.features.to(dtype)  # the first Aggregate: Â X (N, C)

    def __call__(self, nodes: Tensor) -> Tensor:
        phi = torch.relu(self.hidden(self.aggregated_features))  # (B, N, width)
        out = self.readout(self.adjacency @ phi)  # (B, N, k)
        return out[:, nodes[:, 0].long()]

    def trainable(self) -> list[Tensor]:
        return self.hidden.trainable() + self.readout.trainable()


class StackedGNTKs:
    """``B`` networks ``gntk(1, 1, readout="mean")`` on padded graphs, batched.

    ``f(G) = s₀·mean_u(x_u) W₀ᵀ + s₂·mean_u relu(s₁ (Â X)_u W₁ᵀ) W₂ᵀ`` (means over the real nodes):
    the jumping-knowledge readouts of depth 0 and of the one BLOCK, summed.
    """

    def __init__(self, models: list[torch.nn.Module], fmt: gpntk.GraphInputs, dtype: torch.dtype):
        layers = [_linears(m) for m in models]
        readout0, block, readout1 = (StackedAffine([ls[i] for ls in layers], dtype) for i in range(3))
        assert block.weight.shape[1] > K and readout1.weight.shape[1:] == (K, block.weight.shape[1])
        self.readout0, self.block, self.readout1 = readout0, block, readout1
        self.format, self.dtype = fmt, dtype

    def __call__(self, rows: Tensor) -> Tensor:
        g = self.format.unpack(rows.to(self.dtype))
        mask = g.mask.unsqueeze(-1)  # (n, N, 1)
        count = g.mask.sum(-1, keepdim=True)  # (n, 1)
        depth0 = self.readout0((g.features * mask).sum(-2) / count)  # (B, n, k)
        phi = torch.relu(self.block(g.adjacency @ g.features))  # (B, n, N, width)
        depth1 = self.readout1((phi * mask).sum(-2) / count)
        return depth0 + depth1

    def trainable(self) -> list[Tensor]:
        return self.readout0.trainable() + self.block.trainable() + self.readout1.trainable()


def train_ensemble(
    arch: L.Layer, train_x: Tensor, train_y: Tensor, eval_x: Tensor, *, n_networks: int, width: int,
    learning_rate: float, steps: tuple[int, ...], stacked, input_shape, seed: int = 1, chunk: int = CHUNK,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Train ``n_networks`` networks ``arch.finite(width, input_shape=...)`` by full-batch gradient descent.

    ``stacked(models, input_shape, dtype)`` batches them. Returns ``(f0, {T: fT})``, each
    ``(n_networks, len(eval_x), k)`` in float64: the outputs on ``eval_x`` at initialisation and
    after ``T`` steps of ``θ ← θ − lr·∇θ [1/(2nk)·‖f(X) − Y‖²]`` (one autograd call on the summed
    per-network losses gives every network its own gradient).
    """
    n, k = train_y.shape
    gen = torch.Generator().manual_seed(seed)
    y = train_y.to(dtype)
    initial, trained = [], {t: [] for t in steps}
    for start in range(0, n_networks, chunk):
        models = [
            arch.finite(width, input_shape=input_shape, out_features=k, generator=gen)
            for _ in range(min(chunk, n_networks - start))
        ]
        nets = stacked(models, input_shape, dtype)
        params = nets.trainable()
        with torch.no_grad():
            initial.append(nets(eval_x).double())
        for step in range(1, max(steps) + 1):
            loss = (nets(train_x) - y).square().sum() / (2 * n * k)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(learning_rate * g)
            if step in trained:
                with torch.no_grad():
                    trained[step].append(nets(eval_x).double())
    return torch.cat(initial), {t: torch.cat(v) for t, v in trained.items()}


def _targets(net: L.Layer, train_x: Tensor, input_shape, seed: int) -> Tensor:
    """Gaussian targets ``(n, K)`` of twice the prior's output scale (training moves the outputs well
    beyond the Monte Carlo noise)."""
    with torch.no_grad():
        nngp, _ = nngp_and_ntk(net, train_x, input_shape=input_shape)
    scale = 2 * nngp.diagonal().mean().sqrt()
    return scale * torch.randn(train_x.shape[0], K, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# node level: the 15-node GCN, transductive (9 training nodes, 6 test nodes)
NODE_WIDTH, NODE_SMALL_WIDTH = 1024, 256


def node_problem():
    """``(net, {regime: trained architecture}, graph, (train_x, train_y, test_x))``."""
    net, graph, train_x, _, test_x = node_level_problem()
    trained = {"ntk": net, "nngp": gcn_node(trainable_hidden=False)}
    return net, trained, graph, (train_x, _targets(net, train_x, graph, seed=8), test_x)


@functools.lru_cache(maxsize=None)
def node_study(regime: str, width: int = NODE_WIDTH, n_networks: int = N_NETWORKS, steps=STEPS) -> dict:
    net, trained, graph, data = node_problem()
    train = functools.partial(train_ensemble, stacked=StackedNodeGCNs, input_shape=graph)
    return run_study(net, trained, regime, data, train, width=width, n_networks=n_networks, steps=steps,
                     lr_fraction=LR_FRACTION, input_shape=graph)


# graph level: a one-BLOCK GNTK with jumping knowledge and mean readout, 8 training and 4 test graphs
GRAPH_WIDTH, GRAPH_SMALL_WIDTH = 512, 128


def gntk_frozen_block() -> L.Layer:
    """``gntk(1, 1, readout="mean")`` with its BLOCK's ``Dense`` frozen: only the two readouts train."""
    def read_out() -> L.Layer:
        return L.serial(L.GlobalAvgPool(), L.Dense(1.0, 0.0))

    block = L.serial(L.Aggregate(), L.Dense(2.0, 0.0, trainable=False), L.ReLU())
    return L.serial(L.FanOut(2), L.parallel(read_out(), L.serial(block, read_out())), L.FanInSum())


def graph_problem():
    """``(net, {regime: trained architecture}, format, (train_x, train_y, test_x))``."""
    net = L.gntk(1, 1, readout="mean")
    fmt, x = graph_rows(graphs((5, 3, 7, 6, 4, 7, 5, 6, 4, 6, 3, 7), seed=7, p=0.4), plus_identity)
    train_x, test_x = x[:8], x[8:]
    trained = {"ntk": net, "nngp": gntk_frozen_block()}
    return net, trained, fmt, (train_x, _targets(net, train_x, fmt, seed=9), test_x)


@functools.lru_cache(maxsize=None)
def graph_study(regime: str, width: int = GRAPH_WIDTH, n_networks: int = N_NETWORKS, steps=STEPS) -> dict:
    net, trained, fmt, data = graph_problem()
    train = functools.partial(train_ensemble, stacked=StackedGNTKs, input_shape=fmt)
    return run_study(net, trained, regime, data, train, width=width, n_networks=n_networks, steps=steps,
                     lr_fraction=LR_FRACTION, input_shape=fmt)


@pytest.mark.slow
class TestNodeLevelTrainedGCNs(PosteriorAgreementTests):
    """200 GCNs of width 1024 trained on 9 nodes against the node-level posterior (tests in
    ``_ensemble_study.PosteriorAgreementTests``)."""

    z, n_test, width, small_width, steps = Z, 6, NODE_WIDTH, NODE_SMALL_WIDTH, STEPS
    allowance_bounds = (1, 2)  # median, max of rms(d)·sqrt(width)/residual (measured 0.43, 0.77)

    def study(self, regime, width=None, n_networks=None, steps=None):
        return node_study(regime, width or NODE_WIDTH, n_networks or N_NETWORKS, steps or STEPS)


@pytest.mark.slow
class TestGraphLevelTrainedGNTKs(PosteriorAgreementTests):
    """200 one-BLOCK GNTK networks of width 512 trained on 8 graphs against the graph-level posterior."""

    z, n_test, width, small_width, steps = Z, 4, GRAPH_WIDTH, GRAPH_SMALL_WIDTH, STEPS
    allowance_bounds = (1, 2)  # median, max of rms(d)·sqrt(width)/residual (measured 0.54, 1.14)

    def study(self, regime, width=None, n_networks=None, steps=None):
        return graph_study(regime, width or GRAPH_WIDTH, n_networks or N_NETWORKS, steps or STEPS)


def test_frozen_twin_has_the_readout_kernel():
    """The readout-only GNTK twin has the GNTK's NNGP, and its NTK is that NNGP (only readouts train)."""
    net, trained, fmt, (train_x, _, test_x) = graph_problem()
    x = torch.cat([train_x, test_x])
    with torch.no_grad():
        nngp, _ = nngp_and_ntk(net, x, input_shape=fmt)
        twin_nngp, twin_ntk = nngp_and_ntk(trained["nngp"], x, input_shape=fmt)
    torch.testing.assert_close(twin_nngp, nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(twin_ntk, nngp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("level", ["node", "graph"])
def test_batched_training_equals_plain_training_of_one_network(level):
    """The stacked computation is ordinary gradient descent on each ``nn.Module`` (autograd, one network
    at a time, float64): same initial outputs, same outputs after training."""
    if level == "node":
        _, trained, shape, (train_x, train_y, test_x) = node_problem()
        stacked, counts = StackedNodeGCNs, {"ntk": 4, "nngp": 2}
    else:
        _, trained, shape, (train_x, train_y, test_x) = graph_problem()
        stacked, counts = StackedGNTKs, {"ntk": 3, "nngp": 2}
    eval_x = torch.cat([test_x, train_x])
    steps, lr, width, n_networks = 15, 0.3, 16, 3
    for regime in REGIMES:
        f0, out = train_ensemble(trained[regime], train_x, train_y, eval_x, n_networks=n_networks, width=width,
                                 learning_rate=lr, steps=(steps,), stacked=stacked, input_shape=shape, seed=7,
                                 chunk=2, dtype=torch.float64)
        gen = torch.Generator().manual_seed(7)
        for i in range(n_networks):
            model = trained[regime].finite(width, input_shape=shape, out_features=K, generator=gen).double()
            final = check_plain_training(model, f0[i], out[steps][i], train_x, train_y, eval_x, lr, steps,
                                         n_trainable=counts[regime])
            assert (final - f0[i]).abs().max() > 0.05  # training moved the outputs
