"""Convolutional, pooling, branching and normalising architectures.

The kernels are checked against an independent, deliberately naive implementation that loops over
pairs of positions and window offsets (``naive_kernels``), for the settings the reference cases do
not cover: strides, even windows, every padding, 1-D and 2-D, pooling windows and strides. The
finite modules are checked against torch's own convolution and pooling.
"""

from __future__ import annotations

import itertools
import math

import gpytorch
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import parameterized_layers
from gpntk.kernels.dense import input_layout

pytestmark = pytest.mark.usefixtures("float64_default")


# --- a naive implementation: dictionaries over pairs of positions ------------------------------
def _axis_pads(length: int, size: int, stride: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return 0, (length - size) // stride + 1
    out = -(-length // stride)
    total = max((out - 1) * stride + size - length, 0)
    return total // 2, out


def _source(p: tuple, offset: tuple, shape: tuple, geometry: list, padding: str):
    """The input position read by output position ``p`` at window offset ``offset`` (None: a zero)."""
    src = []
    for i, (pi, di, (before, _), (size, stride)) in enumerate(
        zip(p, offset, [g[0] for g in geometry], [g[1] for g in geometry])
    ):
        q = stride * pi + di - before
        if padding == "circular":
            q %= shape[i]
        elif not 0 <= q < shape[i]:
            return None
        src.append(q)
    return tuple(src)


def _relu_dual(q1: float, q12: float, q2: float) -> tuple[float, float]:
    norm = math.sqrt(q1 * q2)
    cos = max(-1.0, min(1.0, q12 / norm)) if norm > 0 else 0.0
    theta = math.acos(cos)
    return norm * (math.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi), (math.pi - theta) / (2 * math.pi)


def naive_kernels(spec: list, x1: np.ndarray, x2: np.ndarray, input_shape: tuple) -> tuple[float, float]:
    """``(nngp, ntk)`` of one pair of inputs, looping over positions.

    ``spec``: ``("conv", k, stride, padding, σw², σb²)``, ``("relu",)``,
    ``("pool", k, stride, padding)``, ``("gap",)``, ``("flatten",)``, ``("dense", σw², σb²)``;
    ``k`` and ``stride`` are tuples with one entry per spatial axis.
    """
    channels, shape = input_shape[0], tuple(input_shape[1:])
    a, b = x1.reshape(input_shape), x2.reshape(input_shape)
    positions = list(itertools.product(*[range(s) for s in shape]))

    def at(x, p):
        return x[(slice(None),) + p]

    # K[(u, v)][(p, p')] for u, v in {1, 2}; Θ only for the pair (1, 2)
    data = {1: a, 2: b}
    K = {
        (u, v): {(p, q): float(at(data[u], p) @ at(data[v], q)) / channels for p in positions for q in positions}
        for u in (1, 2)
        for v in (1, 2)
    }
    T = {key: 0.0 for key in K[(1, 2)]}
    for layer in spec:
        kind = layer[0]
        if kind in ("conv", "pool"):
            size, stride, padding = layer[1], layer[2], layer[3]
            geometry = [(_axis_pads(n, k, s, padding), (k, s)) for n, k, s in zip(shape, size, stride)]
            out_shape = tuple(g[0][1] for g in geometry)
            out_positions = list(itertools.product(*[range(s) for s in out_shape]))
            offsets = list(itertools.product(*[range(k) for k in size]))

            def window_map(M):
                new = {}
                for p in out_positions:
                    for q in out_positions:
                        total = 0.0
                        pairs = [(d, d) for d in offsets] if kind == "conv" else itertools.product(offsets, offsets)
                        for d, e in pairs:
                            sp, sq = _source(p, d, shape, geometry, padding), _source(q, e, shape, geometry, padding)
                            if sp is not None and sq is not None:
                                total += M[(sp, sq)]
                        new[(p, q)] = total / (len(offsets) if kind == "conv" else len(offsets) ** 2)
                return new

            K = {key: window_map(M) for key, M in K.items()}
            T = window_map(T)
            shape, positions = out_shape, out_positions
            if kind == "conv":
                w, bias = layer[4], layer[5]
                K = {key: {pq: w * v + bias for pq, v in M.items()} for key, M in K.items()}
                T = {pq: w * T[pq] + K[(1, 2)][pq] for pq in T}
        elif kind == "relu":
            new_K, new_T = {}, {}
            for (u, v), M in K.items():
                new_K[(u, v)] = {}
                for (p, q), val in M.items():
                    k, kdot = _relu_dual(K[(u, u)][(p, p)], val, K[(v, v)][(q, q)])
                    new_K[(u, v)][(p, q)] = k
                    if (u, v) == (1, 2):
                        new_T[(p, q)] = kdot * T[(p, q)]
            K, T = new_K, new_T
        elif kind in ("gap", "flatten"):
            pairs = [(p, q) for p in positions for q in positions] if kind == "gap" else [(p, p) for p in positions]
            K = {key: {((), ()): sum(M[pq] for pq in pairs) / len(pairs)} for key, M in K.items()}
            T = {((), ()): sum(T[pq] for pq in pairs) / len(pairs)}
            positions = [()]
        elif kind == "dense":
            w, bias = layer[1], layer[2]
            K = {key: {pq: w * v + bias for pq, v in M.items()} for key, M in K.items()}
            T = {pq: w * T[pq] + K[(1, 2)][pq] for pq in T}
    return K[(1, 2)][((), ())], T[((), ())]


def gpntk_net(spec: list) -> L.Serial:
    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "conv":
            layers.append(
                L.Conv(layer[1], stride=layer[2], padding=layer[3], weight_variance=layer[4], bias_variance=layer[5])
            )
        elif kind == "pool":
            layers.append(L.AvgPool(layer[1], stride=layer[2], padding=layer[3]))
        elif kind == "relu":
            layers.append(L.ReLU())
        elif kind == "gap":
            layers.append(L.GlobalAvgPool())
        elif kind == "flatten":
            layers.append(L.Flatten())
        elif kind == "dense":
            layers.append(L.Dense(layer[1], layer[2]))
    return L.serial(*layers)


NAIVE_CASES = {
    "1d-stride2-even-same-flatten": (
        (2, 7),
        [("conv", (2,), (2,), "same", 1.5, 0.2), ("relu",), ("flatten",), ("dense", 2.0, 0.1)],
    ),
    "1d-circular-pool-gap": (
        (1, 6),
        [
            ("conv", (3,), (1,), "circular", 2.0, 0.1),
            ("relu",),
            ("pool", (2,), (1,), "same"),
            ("gap",),
            ("dense", 1.0, 0.0),
        ],
    ),
    "1d-valid-stride3": (
        (2, 8),
        [
            ("conv", (3,), (3,), "valid", 2.0, 0.0),
            ("relu",),
            ("conv", (2,), (1,), "same", 2.0, 0.3),
            ("flatten",),
            ("dense", 1.0, 0.1),
        ],
    ),
    "2d-mixed-strides-pool": (
        (2, 4, 5),
        [
            ("conv", (2, 3), (1, 2), "same", 2.0, 0.1),
            ("relu",),
            ("pool", (2, 1), (1, 1), "valid"),
            ("gap",),
            ("dense", 2.0, 0.1),
        ],
    ),
    "2d-circular-stride2-pool-same": (
        (1, 5, 4),
        [
            ("conv", (3, 2), (2, 1), "circular", 1.3, 0.05),
            ("relu",),
            ("pool", (2, 2), (2, 2), "same"),
            ("flatten",),
            ("dense", 1.0, 0.2),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(NAIVE_CASES))
def test_kernels_match_naive_position_loops(name):
    input_shape, spec = NAIVE_CASES[name]
    d = math.prod(input_shape)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(1))
    net = gpntk_net(spec)
    nngp = gpntk.NNGPKernel(net, input_shape=input_shape)(x).to_dense().detach().numpy()
    ntk = gpntk.NTKKernel(net, input_shape=input_shape)(x).to_dense().detach().numpy()
    for i, j in [(0, 1), (2, 0), (1, 1)]:
        expected = naive_kernels(spec, x[i].numpy(), x[j].numpy(), input_shape)
        np.testing.assert_allclose([nngp[i, j], ntk[i, j]], expected, rtol=1e-12, atol=1e-14)


def test_pooling_keeps_the_full_covariance_only_while_needed():
    conv = L.Conv(3, weight_variance=2.0)
    assert not input_layout(L.serial(conv, L.ReLU(), L.Flatten(), L.Dense()), (1, 6, 6)).full
    assert input_layout(L.serial(conv, L.ReLU(), L.GlobalAvgPool(), L.Dense()), (1, 6, 6)).full
    assert input_layout(L.serial(conv, L.ReLU(), L.AvgPool(2), L.Flatten(), L.Dense()), (1, 6, 6)).full
    assert not input_layout(L.mlp(2), None).full
    # after the pooling layer the state is reduced to the diagonal: per pair 4 numbers, not 16
    net = L.serial(conv, L.ReLU(), L.AvgPool(3), L.Conv(1, weight_variance=2.0), L.ReLU(), L.Flatten(), L.Dense())
    seen = []
    original = L.ReLU.kernel_map

    def spy(self, state, hyper):
        seen.append((state.layout.spatial, state.layout.full))
        return original(self, state, hyper)

    L.ReLU.kernel_map = spy
    try:
        gpntk.NNGPKernel(net, input_shape=(1, 6, 6))(torch.randn(2, 36)).to_dense()
    finally:
        L.ReLU.kernel_map = original
    assert seen == [((6, 6), True), ((2, 2), False)]


def test_full_and_diagonal_layouts_agree():
    """An identity pooling (window 1) forces the full layout everywhere; the kernels must not change."""
    body = [
        L.Conv(3, stride=2, weight_variance=2.0, bias_variance=0.1),
        L.Erf(),
        L.Conv(2, weight_variance=1.5),
        L.ReLU(),
    ]
    diagonal = L.serial(*body, L.Flatten(), L.Dense(1.0, 0.1))
    full = L.serial(*body, L.AvgPool(1), L.Flatten(), L.Dense(1.0, 0.1))
    x = torch.randn(4, 2 * 5 * 6, generator=torch.Generator().manual_seed(2))
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        a = cls(diagonal, input_shape=(2, 5, 6))
        b = cls(full, input_shape=(2, 5, 6))
        torch.testing.assert_close(a(x).to_dense(), b(x).to_dense(), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(a(x, diag=True), b(x, diag=True), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("same", [True, False])
def test_blocks_give_the_same_kernel_and_gradients(same):
    net = L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2), L.GlobalAvgPool(), L.Dense(2.0, 0.1)
    )
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(7, 2 * 16, generator=g, requires_grad=True)
    x2 = x1 if same else torch.randn(5, 2 * 16, generator=g)
    whole = gpntk.NTKKernel(net, input_shape=(2, 4, 4))
    blocks = gpntk.NTKKernel(net, input_shape=(2, 4, 4), block_elements=3 * 256)  # 3 pairs per block
    a, b = whole(x1, x2).to_dense(), blocks(x1, x2).to_dense()
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    (ga,) = torch.autograd.grad(a.sum(), x1)
    (gb,) = torch.autograd.grad(b.sum(), x1)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(whole(x1, diag=True), blocks(x1, diag=True), rtol=1e-14, atol=1e-14)


def test_diag_equals_the_diagonal_of_the_matrix_for_every_layer_kind():
    net = L.serial(
        L.Conv(2, weight_variance=2.0, bias_variance=0.1),
        L.LayerNorm(),
        L.ReLU(),
        L.AvgPool(2, stride=1),
        L.FanOut(2),
        L.parallel([L.Conv(1, weight_variance=2.0), L.Erf()], L.Identity()),
        L.FanInConcat(),
        L.GlobalAvgPool(),
        L.Dense(2.0, 0.1),
    )
    x = torch.randn(5, 3 * 4 * 3, generator=torch.Generator().manual_seed(4))
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        kernel = cls(net, input_shape=(3, 4, 3))
        torch.testing.assert_close(kernel(x, diag=True), kernel(x).to_dense().diagonal(), rtol=1e-13, atol=1e-14)


# --- combinators --------------------------------------------------------------------------------
def test_residual_sum_and_concat_closed_forms():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(5))
    first = L.Dense(2.0, 0.1)
    branch = L.serial(L.ReLU(), L.Dense(1.5, 0.2))
    base = gpntk.NNGPKernel(L.serial(first))(x).to_dense()
    branch_k = gpntk.NNGPKernel(L.serial(first, branch))(x).to_dense()
    residual = L.serial(first, L.FanOut(2), L.parallel(branch, L.Identity()), L.FanInSum())
    torch.testing.assert_close(gpntk.NNGPKernel(residual)(x).to_dense(), base + branch_k)
    concat = L.serial(first, L.FanOut(2), L.parallel(branch, L.Identity()), L.FanInConcat(), L.Dense(3.0, 0.0))
    torch.testing.assert_close(gpntk.NNGPKernel(concat)(x).to_dense(), 3.0 * (base + branch_k) / 2)
    # NTK of a product of independent branches: Θ = Θ1 Σ2 + Σ1 Θ2
    b1, b2 = L.serial(L.ReLU(), L.Dense(1.5, 0.2)), L.serial(L.Erf(), L.Dense(0.7, 0.1))
    prod = L.serial(first, L.FanOut(2), L.parallel(b1, b2), L.FanInProd())
    s1, t1 = (cls(L.serial(first, b1))(x).to_dense() for cls in (gpntk.NNGPKernel, gpntk.NTKKernel))
    s2, t2 = (cls(L.serial(first, b2))(x).to_dense() for cls in (gpntk.NNGPKernel, gpntk.NTKKernel))
    torch.testing.assert_close(gpntk.NNGPKernel(prod)(x).to_dense(), s1 * s2)
    torch.testing.assert_close(gpntk.NTKKernel(prod)(x).to_dense(), t1 * s2 + s1 * t2)


def test_layernorm_makes_the_kernel_a_correlation():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(6)) * torch.tensor(
        [[1.0], [3.0], [0.2], [1.0], [5.0], [2.0]]
    )
    net = L.serial(L.Dense(2.0, 0.1), L.LayerNorm())
    k = gpntk.NNGPKernel(net)(x).to_dense()
    q = 2.0 * (x * x).sum(-1) / 5 + 0.1
    expected = (2.0 * x @ x.T / 5 + 0.1) / torch.sqrt(q[:, None] * q[None, :])
    torch.testing.assert_close(k, expected)
    torch.testing.assert_close(k.diagonal(), torch.ones(6))


def test_layernorm_of_zero_inputs_is_zero_and_finite():
    net = L.serial(L.Dense(2.0), L.LayerNorm(), L.ReLU(), L.Dense(1.0, 0.1))
    x = torch.zeros(3, 4, requires_grad=True)
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        k = cls(net)(x).to_dense()
        assert torch.isfinite(k).all()
        (g,) = torch.autograd.grad(k.sum(), x)
        assert torch.isfinite(g).all()


# --- finite modules -------------------------------------------------------------------------------
@pytest.mark.parametrize("padding", ["same", "valid", "circular"])
@pytest.mark.parametrize("stride", [1, 2])
def test_finite_conv_is_torch_convolution(padding, stride):
    net = L.serial(
        L.Conv((3, 2), stride=stride, padding=padding, weight_variance=2.0, bias_variance=0.3), L.Flatten(), L.Dense()
    )
    model = net.finite(4, input_shape=(2, 5, 6), generator=torch.Generator().manual_seed(7))
    conv = model[1][0]
    x = torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(8))
    weight = conv.linear.weight.reshape(4, 2, 3, 2) * conv.linear.weight_std / math.sqrt(2 * 3 * 2)
    window_h, window_w = conv.windows
    padded = F.pad(
        x,
        (window_w.before, window_w.after, window_h.before, window_h.after),
        mode="circular" if padding == "circular" else "constant",
    )
    expected = F.conv2d(padded, weight, conv.linear.bias * conv.linear.bias_std, stride=stride)
    torch.testing.assert_close(conv(x), expected)
    if padding != "valid":
        assert expected.shape[-2:] == (math.ceil(5 / stride), math.ceil(6 / stride))


def test_finite_pooling_is_torch_avg_pool():
    x = torch.randn(3, 2, 6, 5, generator=torch.Generator().manual_seed(9))
    valid = L.serial(L.Conv(1), L.AvgPool(2), L.Flatten(), L.Dense()).finite(3, input_shape=(2, 6, 5))[1][1]
    torch.testing.assert_close(valid(x), F.avg_pool2d(x, 2))
    same = L.serial(L.Conv(1), L.AvgPool(3, stride=2, padding="same"), L.Flatten(), L.Dense()).finite(
        3, input_shape=(2, 6, 5)
    )[1][1]
    # TensorFlow-style "same": 3 outputs per axis, the padding split (0, 1) for 6 and (1, 1) for 5
    expected = F.avg_pool2d(F.pad(x, (1, 1, 0, 1)), 3, stride=2)
    torch.testing.assert_close(same(x), expected)


def test_finite_networks_have_the_architecture():
    g = torch.Generator().manual_seed(10)
    cnn = L.serial(L.Conv(3, weight_variance=2.0), L.ReLU(), L.AvgPool(2), L.Dense(2.0), L.GlobalAvgPool(), L.Dense())
    model = cnn.finite(8, input_shape=(3, 8, 8), out_features=4, generator=g)
    out = model(torch.randn(5, 192))
    assert out.shape == (5, 4)
    residual = L.serial(
        L.Dense(2.0), L.FanOut(2), L.parallel([L.ReLU(), L.Dense(2.0)], L.Identity()), L.FanInSum(), L.Dense()
    )
    assert residual.finite(16, in_features=3, generator=g)(torch.randn(4, 3)).shape == (4, 1)
    concat = L.serial(
        L.Conv(2), L.FanOut(3), L.parallel(L.ReLU(), L.Erf(), L.Identity()), L.FanInConcat(), L.Flatten(), L.Dense()
    )
    model = concat.finite(5, input_shape=(1, 4), generator=g)
    assert model(torch.randn(2, 4)).shape == (2, 1)
    assert model[1][-1].weight.shape == (1, 15 * 4)  # three branches of 5 channels at 4 positions


# --- GPyTorch manners ------------------------------------------------------------------------------
def test_batch_shape_hyperparameters_broadcast_over_positions():
    net = L.serial(L.Conv(2, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.0, 0.1))
    kernel = gpntk.NTKKernel(net, input_shape=(1, 5), batch_shape=torch.Size([2]))
    conv = kernel.net.layers[0]  # a batched kernel works on its own copy of the network
    conv.weight_variance = torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(11))
    k = kernel(x).to_dense()
    assert k.shape == (2, 4, 4)
    for i, value in enumerate((1.0, 3.0)):
        single = L.serial(
            L.Conv(2, weight_variance=value, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.0, 0.1)
        )
        torch.testing.assert_close(k[i], gpntk.NTKKernel(single, input_shape=(1, 5))(x).to_dense())


def test_cnn_kernel_in_an_exact_gp_learns_conv_hyperparameters():
    from _models import ExactGP

    g = torch.Generator().manual_seed(12)
    x = torch.randn(20, 12, generator=g)
    y = torch.sin(x[:, :6].sum(-1)) + 0.05 * torch.randn(20, generator=g)
    net = L.serial(L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1))
    model = ExactGP(x, y, gpntk.NTKKernel(net, input_shape=(2, 6)), gpytorch.likelihoods.GaussianLikelihood())
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    before = net.layers[0].weight_variance.item()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert net.layers[0].weight_variance.item() != before


def test_gradcheck_cnn_kernel_wrt_inputs_and_hyperparameters():
    net = L.serial(
        L.Conv(2, weight_variance=2.0, bias_variance=0.1),
        L.Erf(),
        L.AvgPool(2, stride=1),
        L.Flatten(),
        L.Dense(1.0, 0.1),
    )
    kernel = gpntk.NTKKernel(net, input_shape=(1, 4))
    x1 = torch.randn(3, 4, generator=torch.Generator().manual_seed(13), requires_grad=True)
    x2 = torch.randn(2, 4, generator=torch.Generator().manual_seed(14), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
    raw = net.layers[0].raw_weight_variance
    assert torch.autograd.gradcheck(
        lambda r: _with_raw(net.layers[0], r, lambda: kernel(x1.detach(), x2.detach()).to_dense()),
        (raw.detach().clone().requires_grad_(),),
    )


def _with_raw(layer, raw, fn):
    saved = layer.raw_weight_variance
    del layer.raw_weight_variance
    layer.raw_weight_variance = raw
    try:
        return fn()
    finally:
        del layer.raw_weight_variance
        layer.raw_weight_variance = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_and_zero_images_stay_finite(dtype):
    net = L.serial(
        L.Conv(3, weight_variance=2.0),
        L.ReLU(),
        L.Conv(3, weight_variance=2.0),
        L.ReLU(),
        L.GlobalAvgPool(),
        L.Dense(2.0),
    )
    x = torch.randn(3, 2 * 5 * 5, generator=torch.Generator().manual_seed(15)).to(dtype)
    x = torch.cat([x, x[:1], torch.zeros(1, 50, dtype=dtype)]).requires_grad_()
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        k = cls(net, input_shape=(2, 5, 5))(x).to_dense()
        assert torch.isfinite(k).all()
        assert torch.allclose(k[0], k[3])
        (g,) = torch.autograd.grad(k.sum(), x)
        assert torch.isfinite(g).all()


def test_trained_ensemble_of_a_cnn_interpolates_at_infinite_time():
    net = L.serial(L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(2.0, 0.1))
    g = torch.Generator().manual_seed(16)
    x, y, test_x = torch.randn(8, 14, generator=g), torch.randn(8, generator=g), torch.randn(3, 14, generator=g)
    post = gpntk.TrainedEnsemble(net, x, y, input_shape=(2, 7))
    mean, cov = post.moments(x, t=math.inf)
    torch.testing.assert_close(mean, y, rtol=1e-7, atol=1e-7)
    assert cov.diagonal().abs().max() < 1e-7
    ntk = gpntk.NTKKernel(net, input_shape=(2, 7))
    expected = ntk(test_x, x).to_dense() @ torch.linalg.solve(ntk(x).to_dense(), y)
    torch.testing.assert_close(post.moments(test_x, t=math.inf)[0], expected.detach(), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="needs 14 features per row"):
        gpntk.TrainedEnsemble(net, torch.randn(4, 10), torch.randn(4), input_shape=(2, 7))


def test_cnn_kernel_batches_indexes_and_pickles():
    import pickle

    net = L.serial(
        L.Conv(2, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2), L.Flatten(), L.Dense(1.0, 0.1)
    )
    kernel = gpntk.NTKKernel(net, input_shape=(2, 4), batch_shape=torch.Size([3]))
    x = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(17))  # (2, 3) batch of 5 inputs
    k = kernel(x).to_dense()
    assert k.shape == (2, 3, 5, 5)
    single = gpntk.NTKKernel(copy_net(net), input_shape=(2, 4))
    torch.testing.assert_close(k[1, 0], single(x[1, 0]).to_dense())
    torch.testing.assert_close(kernel[1](x[:, 1]).to_dense(), k[:, 1])
    restored = pickle.loads(pickle.dumps(kernel))
    torch.testing.assert_close(restored(x).to_dense(), k)
    assert restored.input_shape == (2, 4)


def copy_net(net):
    import copy

    new = copy.deepcopy(net)
    for layer in parameterized_layers(new):
        layer.index_hyperparameters((0,))
    return new
