"""The layer language: composition, shared hyperparameters, frozen layers, closed-form identities."""

import math

import pytest
import torch

import gpntk
from gpntk import layers as L

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture
def x():
    return torch.randn(7, 4, generator=torch.Generator().manual_seed(0))


def dense(kernel, x1, x2=None):
    return kernel(x1, x2).to_dense().detach()


def test_mlp_structure_and_sharing():
    net = L.mlp(depth=3, activation="relu", weight_variance=2.0, bias_variance=0.1)
    assert len(net.layers) == 7
    assert all(net.layers[i] is net.layers[0] for i in (2, 4, 6))
    assert len(list(gpntk.NTKKernel(net).parameters())) == 2  # one shared (σw², σb²)
    separate = L.mlp(depth=3, activation="erf", shared=False)
    assert len(list(gpntk.NTKKernel(separate).parameters())) == 8
    assert isinstance(separate.layers[1], L.Erf)


def test_mlp_depth_zero_is_linear_and_ntk_equals_nngp(x):
    net = L.mlp(depth=0, weight_variance=1.7, bias_variance=0.3)
    expected = 1.7 * x @ x.T / x.shape[1] + 0.3
    torch.testing.assert_close(dense(gpntk.NNGPKernel(net), x), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dense(gpntk.NTKKernel(net), x), expected, rtol=1e-14, atol=1e-14)


def test_one_hidden_relu_ntk_matches_hand_formula(x):
    sw2, sb2 = 2.0, 0.1
    net = L.mlp(depth=1, activation="relu", weight_variance=sw2, bias_variance=sb2)
    d = x.shape[1]
    q = sw2 * x @ x.T / d + sb2
    qd = q.diagonal()
    norm = torch.sqrt(qd[:, None] * qd[None, :])
    theta = torch.arccos((q / norm).clamp(-1, 1))
    theta.fill_diagonal_(0.0)
    k = norm * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi)
    kdot = (math.pi - theta) / (2 * math.pi)
    nngp = sw2 * k + sb2
    ntk = nngp + sw2 * kdot * q
    torch.testing.assert_close(dense(gpntk.NNGPKernel(net), x), nngp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense(gpntk.NTKKernel(net), x), ntk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "erf", "gelu", "tanh"])
def test_freezing_all_but_readout_turns_ntk_into_nngp(x, activation):
    frozen = L.serial(
        L.Dense(2.0, 0.1, trainable=False), _act(activation),
        L.Dense(1.5, 0.2, trainable=False), _act(activation),
        L.Dense(1.3, 0.05),
    )
    ntk = dense(gpntk.NTKKernel(frozen), x)
    nngp = dense(gpntk.NNGPKernel(frozen), x)
    torch.testing.assert_close(ntk, nngp, rtol=1e-13, atol=1e-13)
    trained = L.serial(L.Dense(2.0, 0.1), _act(activation), L.Dense(1.5, 0.2), _act(activation), L.Dense(1.3, 0.05))
    assert (dense(gpntk.NTKKernel(trained), x) - nngp).abs().max() > 1e-2


def _act(name):
    from gpntk.activations import activation_from_name

    return activation_from_name(name)


def test_frozen_middle_layer_drops_its_term(x):
    # Θ after the last Dense: σw² * kdot * Θ_hidden + Σ; a frozen first layer zeroes Θ_hidden's own term
    net_frozen_first = L.serial(L.Dense(2.0, 0.1, trainable=False), L.ReLU(), L.Dense(2.0, 0.1))
    ntk = dense(gpntk.NTKKernel(net_frozen_first), x)
    nngp = dense(gpntk.NNGPKernel(net_frozen_first), x)
    torch.testing.assert_close(ntk, nngp)


def test_identity_is_a_no_op(x):
    plain = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dense(2.0, 0.1))
    with_identity = L.serial(
        L.Identity(), plain.layers[0], L.Identity(), plain.layers[1], plain.layers[2], L.Identity()
    )
    torch.testing.assert_close(dense(gpntk.NTKKernel(with_identity), x), dense(gpntk.NTKKernel(plain), x))


def test_nested_serial_equals_flat(x):
    d1, d2 = L.Dense(2.0, 0.1), L.Dense(1.0, 0.2)
    flat = L.serial(d1, L.Erf(), d2)
    nested = L.serial(L.serial(d1, L.Erf()), d2)
    torch.testing.assert_close(dense(gpntk.NTKKernel(nested), x), dense(gpntk.NTKKernel(flat), x))


def test_shared_layer_object_shares_hyperparameters(x):
    shared = L.Dense(2.0, 0.1)
    net = L.serial(shared, L.ReLU(), shared)
    kernel = gpntk.NTKKernel(net)
    before = dense(kernel, x)
    shared.weight_variance = 1.0
    after = dense(kernel, x)
    assert (before - after).abs().max() > 1e-3
    assert torch.allclose(net.layers[2].weight_variance, torch.tensor(1.0))


def test_dense_hyperparameter_properties_and_priors():
    layer = L.Dense(2.0, 0.5, weight_variance_prior=gpytorch_gamma())
    assert layer.raw_weight_variance.shape == (1, 1)
    torch.testing.assert_close(layer.weight_variance, torch.full((1, 1), 2.0))
    layer.bias_variance = 0.25
    torch.testing.assert_close(layer.bias_variance, torch.full((1, 1), 0.25))
    assert [name for name, *_ in layer.named_priors()] == ["weight_variance_prior"]
    no_bias = L.Dense(1.0, 0.0)
    assert not no_bias.has_bias and no_bias.bias_variance.item() == 0.0
    with pytest.raises(ValueError, match="without bias"):
        no_bias.bias_variance = 0.1


def gpytorch_gamma():
    from gpytorch.priors import GammaPrior

    return GammaPrior(2.0, 1.0)


def test_repr_describes_the_architecture():
    net = L.serial(L.Dense(2.0, 0.1), L.LeakyReLU(0.2), L.Dense(1.0, 0.0, trainable=False))
    text = repr(net)
    assert "Dense(weight_variance=2" in text and "LeakyReLU(negative_slope=0.2)" in text and "trainable=False" in text
    assert "NTKKernel(serial(" in repr(gpntk.NTKKernel(net))


def test_activation_names_and_kwargs():
    from gpntk.activations import ACTIVATION_NAMES, activation_from_name

    assert isinstance(activation_from_name("ReLU"), L.ReLU)
    assert isinstance(activation_from_name("leaky-relu", negative_slope=0.3), L.LeakyReLU)
    assert activation_from_name("monomial", degree=3).degree == 3
    assert "gelu" in ACTIVATION_NAMES
    net = L.mlp(2, "polynomial", coef=[0.0, 1.0, 0.5])
    assert isinstance(net.layers[1], L.Polynomial)


def test_layers_are_descriptions_not_modules(x):
    with pytest.raises(TypeError, match="describes an architecture"):
        L.ReLU()(x)
