"""``kernel.weight_variance`` / ``bias_variance`` / ``layer_variances``: GPyTorch-style access to variances."""

from __future__ import annotations

import math
import pickle

import gpytorch
import pytest
import torch
from gpytorch.constraints import Interval

import gpntk
from gpntk import layers as L

DTYPE = torch.float64


def _x(n: int = 5, d: int = 3) -> torch.Tensor:
    return torch.randn(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


def _relu_nngp_dense(x: torch.Tensor, weight_variance: float, bias_variance: float, depth: int) -> torch.Tensor:
    """The NNGP of a shared-pair ReLU mlp, by the arc-cosine closed form (Cho & Saul 2009), independently of gpntk."""
    k = weight_variance * (x @ x.T) / x.shape[1] + bias_variance
    for _ in range(depth):
        q = k.diagonal()
        norms = torch.sqrt(q[:, None] * q[None, :])
        theta = torch.arccos((k / norms).clamp(-1.0, 1.0))
        k = weight_variance * norms * (torch.sin(theta) + (math.pi - theta) * torch.cos(theta)) / (2 * math.pi)
        k = k + bias_variance
    return k


@pytest.mark.parametrize("kernel_class", [gpntk.NTKKernel, gpntk.NNGPKernel])
def test_shared_pair_is_readable_and_settable_on_the_kernel(kernel_class):
    net = L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1)
    kernel = kernel_class(net)
    dense = net.layers[0]
    assert kernel.weight_variance is not None and kernel.weight_variance.shape == (1, 1)
    assert kernel.weight_variance.item() == pytest.approx(2.0)
    assert kernel.bias_variance.item() == pytest.approx(0.1)
    kernel.weight_variance = 3.5
    kernel.bias_variance = torch.tensor(0.25)
    assert dense.weight_variance.item() == pytest.approx(3.5)  # the network's (shared) layer holds it
    assert dense.bias_variance.item() == pytest.approx(0.25)
    # the gradient flows to the raw parameter, as for RBFKernel.lengthscale
    kernel.weight_variance.sum().backward()
    assert dense.raw_weight_variance.grad is not None


def test_setting_goes_through_the_layer_constraint():
    net = L.mlp(1, "relu", weight_variance_constraint=Interval(1.0, 4.0))
    kernel = gpntk.NNGPKernel(net)
    kernel.weight_variance = 3.0
    raw = net.layers[0].raw_weight_variance.item()
    # Interval's transform: lower + (upper - lower) * sigmoid(raw)
    assert 1.0 + 3.0 * torch.sigmoid(torch.tensor(raw)).item() == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="weight_variance must be positive and finite"):
        kernel.weight_variance = -1.0


def test_kernel_with_set_variances_matches_the_closed_form():
    x = _x()
    kernel = gpntk.NNGPKernel(L.mlp(2, "relu")).to(DTYPE)
    kernel.weight_variance, kernel.bias_variance = 1.7, 0.3
    torch.testing.assert_close(kernel(x).to_dense(), _relu_nngp_dense(x, 1.7, 0.3, depth=2), rtol=1e-7, atol=1e-9)


def test_several_pairs_raise_naming_the_per_layer_paths():
    kernel = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(L.mlp(2, "relu", shared=False)))
    base = kernel.base_kernel
    for name in ("weight_variance", "bias_variance"):
        paths = ", ".join(rf"net\.layers\.{i}\.{name}" for i in (0, 2, 4))
        with pytest.raises(gpntk.AmbiguousHyperparameterError, match=paths):
            getattr(base, name)
        with pytest.raises(AttributeError, match="layer_variances"):
            setattr(base, name, 1.0)
        assert not hasattr(base, name)
        assert getattr(base, name, "missing") == "missing"
    # nothing was set as a plain attribute on the kernel by the refused assignment
    assert "weight_variance" not in vars(base)


def test_layer_variances_maps_paths_to_values_and_paths_work_with_initialize():
    net = L.mlp(2, "relu", weight_variance=2.0, bias_variance=0.1, shared=False)
    net.layers[4].weight_variance = 1.0
    model = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net))
    values = model.base_kernel.layer_variances
    assert list(values) == [
        "net.layers.0.weight_variance", "net.layers.0.bias_variance",
        "net.layers.2.weight_variance", "net.layers.2.bias_variance",
        "net.layers.4.weight_variance", "net.layers.4.bias_variance",
    ]
    assert [round(v.item(), 6) for v in values.values()] == [2.0, 0.1, 2.0, 0.1, 1.0, 0.1]
    # GPyTorch's initialize takes the paths (here from the outer ScaleKernel)
    model.initialize(**{"base_kernel.net.layers.2.weight_variance": 5.0, "base_kernel.net.layers.4.bias_variance": 0.4})
    assert net.layers[2].weight_variance.item() == pytest.approx(5.0)
    assert net.layers[4].bias_variance.item() == pytest.approx(0.4)
    # a shared layer is listed once, at its first place; a layer without bias lists no bias variance
    shared = gpntk.NNGPKernel(L.serial(L.Dense(2.0, 0.0), L.ReLU(), L.Dense(1.0, 0.2)))
    assert list(shared.layer_variances) == [
        "net.layers.0.weight_variance", "net.layers.2.weight_variance", "net.layers.2.bias_variance",
    ]
    assert list(gpntk.NNGPKernel(L.mlp(3, "erf")).layer_variances) == [
        "net.layers.0.weight_variance", "net.layers.0.bias_variance",
    ]


def test_one_layer_object_without_bias_reads_zero_and_refuses_a_bias():
    dense = L.Dense(2.0, 0.0)
    kernel = gpntk.NNGPKernel(L.serial(dense, L.ReLU(), dense))
    assert kernel.bias_variance.item() == 0.0
    with pytest.raises(ValueError, match=r"built without bias .* bias_variance=0\.1"):
        kernel.bias_variance = 0.5


def test_networks_without_affine_layers_and_attention_variances():
    attention = L.GlobalSelfAttention(1, bias_variance=0.1)
    net = L.serial(L.Conv(1, weight_variance=1.5), attention, L.Flatten(), L.Dense(1.0, 0.0))
    kernel = gpntk.NNGPKernel(net, input_shape=(2, 3))
    # two weight variances (Conv, Dense; attention has key/query/value/out variances instead)
    with pytest.raises(gpntk.AmbiguousHyperparameterError, match=r"net\.layers\.0\.weight_variance, "
                       r"net\.layers\.3\.weight_variance"):
        kernel.weight_variance
    assert "net.layers.1.key_variance" in kernel.layer_variances
    assert kernel.layer_variances["net.layers.1.bias_variance"].item() == pytest.approx(0.1)


def test_batched_kernel_reads_its_own_batched_values():
    net = L.mlp(1, "relu")
    kernel = gpntk.NNGPKernel(net, batch_shape=torch.Size([2]))
    assert kernel.weight_variance.shape == (2, 1, 1)
    kernel.weight_variance = torch.tensor([1.0, 3.0]).view(2, 1, 1)
    torch.testing.assert_close(kernel.net.layers[0].weight_variance.flatten(), torch.tensor([1.0, 3.0]))
    assert net.layers[0].weight_variance.shape == (1, 1)  # the network given is untouched


def test_access_survives_pickling_and_deepcopy():
    kernel = gpntk.NTKKernel(L.mlp(1, "relu", weight_variance=2.5))
    clone = pickle.loads(pickle.dumps(kernel))
    assert clone.weight_variance.item() == pytest.approx(2.5)
    clone.weight_variance = 1.0
    assert kernel.weight_variance.item() == pytest.approx(2.5)
