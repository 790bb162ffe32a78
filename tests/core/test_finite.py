"""Finite-width networks built by ``net.finite(width)`` (gpntk.finite) and exact NTK identities.

Structure, hyperparameters, frozen/bias-free layers, error messages, the NTK-parameterization
forward pass, reproducibility, and two identities that hold at *any* width:

* a single ``Dense`` layer has the empirical NTK ``σw² x·x'/d + σb²`` whatever its weights, equal
  to the analytic NTK and NNGP;
* with every layer but the readout frozen, the empirical NTK is the hidden-feature kernel
  ``σw² φ(x)·φ(x')/n + σb²`` of that network, whose mean over initialisations is the NNGP.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

import gpntk
from gpntk import layers as L
from gpntk.activations import activation_from_name
from gpntk.core.finite import ElementwiseActivation, NTKLinear

DTYPE = torch.float64


def _x(n: int = 5, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _linears(model: nn.Module) -> list[NTKLinear]:
    return [m for m in model.modules() if isinstance(m, NTKLinear)]


def _stored(layer, name: str) -> float:
    """The hyperparameter as networks and float64 kernels use it: the value as given, not its float32 storage."""
    return layer.hyperparameter(name, torch.empty(0, dtype=torch.float64)).item()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _autograd_ntk(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """Θ_ij = Σ_p ∂f(x_i)/∂θ_p ∂f(x_j)/∂θ_p over ``params`` by plain autograd (one output channel)."""
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[i : i + 1]).sum(), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    jac = torch.stack(rows)
    return jac @ jac.T


# --- structure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("out_features", [1, 3])
def test_mlp_structure_explicit_in_features(depth, out_features):
    width, d = 7, 4
    model = L.mlp(depth, "relu").finite(width, in_features=d, out_features=out_features, generator=_gen())
    linears = _linears(model)
    assert len(linears) == depth + 1
    assert len([m for m in model.modules() if isinstance(m, ElementwiseActivation)]) == depth
    expected_in = [d] + [width] * depth
    expected_out = [width] * depth + [out_features]
    assert [lin.in_features for lin in linears] == expected_in
    assert [lin.out_features for lin in linears] == expected_out
    assert [tuple(lin.weight.shape) for lin in linears] == list(zip(expected_out, expected_in))
    out = model.to(DTYPE)(_x(6, d))
    assert out.shape == (6, out_features)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("depth", [0, 2])
def test_mlp_structure_lazy_in_features(depth):
    width, d = 6, 5
    model = L.mlp(depth, "erf").finite(width, out_features=2, generator=_gen())
    first = _linears(model)[0]
    assert isinstance(first.weight, UninitializedParameter)
    out = model(torch.randn(3, d))
    assert out.shape == (3, 2)
    assert first.in_features == d and first.weight.shape == ((width if depth else 2), d)
    assert not isinstance(first.weight, UninitializedParameter)
    # materialised: the empirical kernels see all parameters
    assert gpntk.empirical_ntk(model, torch.randn(4, d)).shape == (4, 4)


def test_empirical_ntk_initialises_a_lazy_model():
    model = L.mlp(1, "relu").finite(8, generator=_gen()).to(DTYPE)
    x = _x(4, 3)
    ntk = gpntk.empirical_ntk(model, x)  # materialises the lazy first layer from x
    assert ntk.dtype == DTYPE and ntk.shape == (4, 4)
    assert all(p.dtype == DTYPE for p in model.parameters())
    assert _linears(model)[0].weight.shape == (8, 3)


def test_shared_dense_gives_independent_weights():
    net = L.mlp(3, "relu", weight_variance=1.7, bias_variance=0.2, shared=True)
    assert len({id(m) for m in net.modules() if isinstance(m, L.Dense)}) == 1
    model = net.finite(16, in_features=16, out_features=16, generator=_gen())
    linears = _linears(model)
    assert len(linears) == 4
    assert len({id(lin.weight) for lin in linears}) == 4
    weights = [lin.weight.detach() for lin in linears]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(weights[i], weights[j])
            # independent standard normals: far from identical or proportional
            corr = torch.corrcoef(torch.stack([weights[i].reshape(-1), weights[j].reshape(-1)]))[0, 1]
            assert abs(corr) < 0.2
    assert len({lin.weight_std for lin in linears}) == 1  # but the hyperparameters are shared


def test_hyperparameters_come_from_the_layers():
    d1, d2 = L.Dense(weight_variance=2.5, bias_variance=0.3), L.Dense(weight_variance=0.7, bias_variance=1.2)
    net = L.serial(d1, L.Tanh(), d2)
    model = net.finite(5, in_features=3, generator=_gen())
    first, second = _linears(model)
    assert first.weight_std == pytest.approx(math.sqrt(2.5)) and first.bias_std == pytest.approx(math.sqrt(0.3))
    assert second.weight_std == pytest.approx(math.sqrt(0.7)) and second.bias_std == pytest.approx(math.sqrt(1.2))
    # the current values are taken, e.g. after learning or setting them
    d1.weight_variance = 4.0
    d2.bias_variance = 0.01
    first, second = _linears(net.finite(5, in_features=3, generator=_gen()))
    assert first.weight_std == pytest.approx(2.0)
    assert second.bias_std == pytest.approx(0.1)
    assert first.weight_std == pytest.approx(math.sqrt(d1.weight_variance.item()))


def test_no_bias_layers_have_no_bias():
    net = L.serial(L.Dense(1.0, 0.0), L.ReLU(), L.Dense(2.0, 0.5), L.ReLU(), L.Dense(1.0, 0.0))
    model = net.finite(4, in_features=3, generator=_gen())
    first, second, third = _linears(model)
    assert first.bias is None and third.bias is None
    assert second.bias is not None and second.bias.shape == (4,)
    names = [name for name, _ in model.named_parameters()]
    assert sum(name.endswith("bias") for name in names) == 1
    # without bias the output at x = 0 is exactly zero
    assert torch.equal(L.mlp(2, "relu", bias_variance=0.0).finite(6, in_features=3)(torch.zeros(2, 3)),
                       torch.zeros(2, 1))


def test_frozen_layers_have_no_gradient_and_no_ntk_term():
    torch.manual_seed(0)
    frozen = L.Dense(1.5, 0.2, trainable=False)
    net = L.serial(L.Dense(2.0, 0.1), L.ReLU(), frozen, L.Erf(), L.Dense(1.0, 0.3))
    model = net.finite(9, in_features=4, generator=_gen()).to(DTYPE)
    lin0, lin1, lin2 = _linears(model)
    assert lin0.weight.requires_grad and lin0.bias.requires_grad
    assert not lin1.weight.requires_grad and not lin1.bias.requires_grad
    assert lin2.weight.requires_grad and lin2.bias.requires_grad
    x = _x(5, 4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4
    ntk = gpntk.empirical_ntk(model, x)
    torch.testing.assert_close(ntk, _autograd_ntk(model, x, trainable))
    # and it is the all-trainable NTK minus exactly the frozen layer's own term
    for p in lin1.parameters():
        p.requires_grad_(True)
    frozen_term = _autograd_ntk(model, x, [lin1.weight, lin1.bias])
    torch.testing.assert_close(gpntk.empirical_ntk(model, x), ntk + frozen_term)
    assert frozen_term.diagonal().min() > 0


def test_frozen_lazy_layer_stays_frozen():
    model = L.serial(L.Dense(1.0, 0.1, trainable=False), L.ReLU(), L.Dense(1.0, 0.1)).finite(4)
    model(torch.randn(2, 3))
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


# --- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [0, -3, 2.0, 1.5, True, "8", None])
def test_bad_width_raises(width):
    with pytest.raises(ValueError, match="width"):
        L.mlp(2).finite(width)


@pytest.mark.parametrize("out_features", [0, -1, 2.5, False])
def test_bad_out_features_raises(out_features):
    with pytest.raises(ValueError, match="out_features"):
        L.mlp(1).finite(8, out_features=out_features)


@pytest.mark.parametrize("in_features", [0, -2, 3.0])
def test_bad_in_features_raises(in_features):
    with pytest.raises(ValueError, match="in_features"):
        L.mlp(1).finite(8, in_features=in_features)


def test_batch_shaped_hyperparameters_raise_a_clear_error():
    net = gpntk.NTKKernel(L.mlp(1, "relu"), batch_shape=torch.Size([3])).net  # a copy with batch-shaped σ²
    with pytest.raises(ValueError, match=r"scalar hyperparameters.*batch shape \(3,\)"):
        net.finite(8)


# --- the forward pass --------------------------------------------------------------------------
def test_forward_matches_hand_computation():
    width, d = 6, 3
    net = L.mlp(2, "relu", weight_variance=1.7, bias_variance=0.4)
    model = net.finite(width, in_features=d, out_features=2, generator=_gen(3)).to(DTYPE)
    lin0, lin1, lin2 = _linears(model)
    x = _x(4, d)
    dense = net.layers[0]  # (hyperparameters are stored in float32: use the stored values)
    sw, sb = math.sqrt(_stored(dense, "weight_variance")), math.sqrt(_stored(dense, "bias_variance"))
    assert sw == pytest.approx(math.sqrt(1.7), rel=1e-6) and sb == pytest.approx(math.sqrt(0.4), rel=1e-6)
    h = x @ lin0.weight.T * (sw / math.sqrt(d)) + sb * lin0.bias
    h = torch.relu(h) @ lin1.weight.T * (sw / math.sqrt(width)) + sb * lin1.bias
    out = torch.relu(h) @ lin2.weight.T * (sw / math.sqrt(width)) + sb * lin2.bias
    torch.testing.assert_close(model(x), out, rtol=1e-13, atol=1e-13)
    # loop-level check of one output entry
    a = torch.relu(x[0] @ lin0.weight.T * sw / math.sqrt(d) + sb * lin0.bias)
    a = torch.relu(sum(lin1.weight[:, j] * a[j] for j in range(width)) * sw / math.sqrt(width) + sb * lin1.bias)
    value = sum(lin2.weight[1, j] * a[j] for j in range(width)) * sw / math.sqrt(width) + sb * lin2.bias[1]
    assert model(x)[0, 1].item() == pytest.approx(value.item(), rel=1e-12)


def test_weights_are_standard_normal():
    model = L.mlp(1, "relu", weight_variance=9.0, bias_variance=4.0).finite(512, in_features=512, generator=_gen())
    weight, bias = _linears(model)[0].weight.detach(), _linears(model)[0].bias.detach()
    # N(0, 1) entries whatever σw, σb (they scale the forward pass, not the weights)
    assert abs(weight.mean().item()) < 0.05 and abs(weight.std().item() - 1.0) < 0.05
    assert abs(bias.std().item() - 1.0) < 0.15


def test_reproducible_with_a_generator():
    net = L.mlp(2, "gelu", bias_variance=0.1)
    first = net.finite(12, in_features=3, out_features=2, generator=_gen(7)).state_dict()
    second = net.finite(12, in_features=3, out_features=2, generator=_gen(7)).state_dict()
    third = net.finite(12, in_features=3, out_features=2, generator=_gen(8)).state_dict()
    assert first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not any(torch.equal(first[k], third[k]) for k in first)
    # lazily initialised networks too
    x = torch.randn(2, 3)
    lazy = [net.finite(12, generator=_gen(5)) for _ in range(2)]
    torch.testing.assert_close(lazy[0](x), lazy[1](x), rtol=0, atol=0)


# --- exact identities --------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 7, 1024])
@pytest.mark.parametrize("wv,bv", [(1.0, 0.0), (2.3, 0.45)])
def test_single_dense_empirical_ntk_is_exact_at_any_width(width, wv, bv):
    # depth 0: f(x) = σw/√d W x + σb b, so ∂f/∂W = σw x/√d and Θ = σw² x·x'/d + σb² for any W
    d = 4
    x1, x2 = _x(5, d, seed=1), _x(3, d, seed=2)
    dense = L.Dense(wv, bv)
    net = L.serial(dense)
    wv, bv = _stored(dense, "weight_variance"), _stored(dense, "bias_variance")
    expected = wv * (x1 @ x2.T) / d + bv
    analytic_ntk = gpntk.NTKKernel(net)(x1, x2).to_dense()
    analytic_nngp = gpntk.NNGPKernel(net)(x1, x2).to_dense()
    torch.testing.assert_close(analytic_ntk, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(analytic_nngp, expected, rtol=1e-12, atol=1e-12)
    for seed in range(2):
        # the net's only layer is its readout: `width` does not enter, any out_features works
        model = net.finite(width, in_features=d, out_features=3, generator=_gen(seed)).to(DTYPE)
        full = gpntk.empirical_ntk(model, x1, x2, reduce="none")
        eye = torch.eye(3, dtype=DTYPE)
        torch.testing.assert_close(full, expected[:, :, None, None] * eye, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gpntk.empirical_ntk(model, x1, x2), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            gpntk.empirical_ntk(model, x1, x2, method="jacobian"), expected, rtol=1e-12, atol=1e-12
        )
    # a wide readout: every one of its 1024 channels has the same exact NTK
    wide = net.finite(width, in_features=d, out_features=1024, generator=_gen(5)).to(DTYPE)
    torch.testing.assert_close(gpntk.empirical_ntk(wide, x1, x2), expected, rtol=1e-12, atol=1e-12)


def _readout_only(act: str, depth: int, wv: float, bv: float) -> L.Serial:
    layers = []
    for _ in range(depth):
        layers += [L.Dense(wv, bv, trainable=False), activation_from_name(act)]
    return L.serial(*layers, L.Dense(wv, bv))


@pytest.mark.parametrize("act", ["relu", "erf"])
def test_readout_only_empirical_ntk_is_the_hidden_feature_kernel(act):
    wv, bv, width, d = 1.8, 0.2, 64, 4
    net = _readout_only(act, 2, wv, bv)
    x1, x2 = _x(5, d, seed=3), _x(4, d, seed=4)
    for seed in range(3):
        model = net.finite(width, in_features=d, out_features=2, generator=_gen(seed)).to(DTYPE)
        with torch.no_grad():
            phi1, phi2 = model[:-1](x1), model[:-1](x2)
        readout = net.layers[-1]
        features = _stored(readout, "weight_variance") * (phi1 @ phi2.T) / width + _stored(readout, "bias_variance")
        torch.testing.assert_close(gpntk.empirical_ntk(model, x1, x2), features, rtol=1e-12, atol=1e-12)
        full = gpntk.empirical_ntk(model, x1, x2, reduce="none")
        torch.testing.assert_close(full[..., 0, 1], torch.zeros_like(features), rtol=0, atol=1e-13)


@pytest.mark.parametrize("act", ["relu", "erf"])
def test_readout_only_ntk_converges_to_the_nngp(act):
    wv, bv, d = 1.8, 0.2, 4
    net = _readout_only(act, 2, wv, bv)
    x = _x(6, d, seed=5)
    trained = L.mlp(2, act, weight_variance=wv, bias_variance=bv)
    nngp = gpntk.NNGPKernel(trained)(x, x).to_dense()
    # analytically, training only the readout turns the NTK into the NNGP
    torch.testing.assert_close(gpntk.NTKKernel(net)(x, x).to_dense(), nngp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gpntk.NNGPKernel(net)(x, x).to_dense(), nngp, rtol=1e-10, atol=1e-10)
    errors = {}
    for width, n_samples in ((16, 24), (1024, 24)):
        mean, se = gpntk.monte_carlo_kernel(net, x.float(), width=width, n_samples=n_samples, seed=11)
        mean, se = mean.double(), se.double()
        errors[width] = ((mean - nngp).norm() / nngp.norm()).item()
        if width == 1024:
            scale = nngp.diagonal().sqrt()
            allowance = 4.5 * se + 2.0 * 2 / width * scale[:, None] * scale[None, :]
            assert ((mean - nngp).abs() <= allowance).all(), (mean - nngp).abs() / se
    assert errors[1024] <= 0.03
    assert errors[1024] * 3 < errors[16]
