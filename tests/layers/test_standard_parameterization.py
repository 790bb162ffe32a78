"""Dense and Conv in standard parameterization (``parameterization="standard"``, ``in_width``).

The Neural Tangents cases ``a2_sp_*`` are in ``tests/test_reference.py``; here: the maps by hand on
a linear network, the NNGP unchanged, frozen layers, ``diag=True``, float32, batch shapes,
hyperparameter gradients (gradcheck), the blockwise backend, the finite modules (their
distribution, the width checks, the structured empirical NTK against the Jacobian one), which
networks the KeOps backend takes, and the trained ensemble.
"""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from torch.autograd import gradcheck

import gpntk
from gpntk import layers as L
from gpntk import settings
from gpntk.contrib.keops import keops_supported
from gpntk.core.finite import NTKLinear
from gpntk.core.standard import StandardConv, StandardLinear
from gpntk.empirical.structured import structured_applicable
from gpntk.errors import ArchitectureError

pytestmark = pytest.mark.usefixtures("float64_default")

SP = {"parameterization": "standard"}


def sp_mlp(width: int, d: int = 4, bias: float = 0.1, readout: str = "standard") -> L.Serial:
    """Two hidden layers (ReLU, Erf), every layer in standard parameterization with its own values."""
    readout_kwargs = {"parameterization": "standard", "in_width": width} if readout == "standard" else {}
    return L.serial(
        L.Dense(2.0, bias, in_width=d, **SP), L.ReLU(),
        L.Dense(1.5, 2 * bias, in_width=width, **SP), L.Erf(),
        L.Dense(1.2, bias, **readout_kwargs),
    )


def sp_cnn(width: int, channels: int = 2, length: int = 6, pool: bool = False) -> L.Serial:
    """Two 1-D convolutions then Flatten (or GlobalAvgPool: the full position covariance) and a readout."""
    readout_width = width if pool else width * length
    return L.serial(
        L.Conv(3, padding="same", weight_variance=2.0, bias_variance=0.1, in_width=channels, **SP), L.ReLU(),
        L.Conv(3, padding="circular", weight_variance=1.5, bias_variance=0.05, in_width=width, **SP), L.ReLU(),
        L.GlobalAvgPool() if pool else L.Flatten(),
        L.Dense(1.0, 0.1, in_width=readout_width, **SP),
    )


CNN_SHAPE = (2, 6)
NETS = {
    "mlp": (lambda: sp_mlp(8), None),
    "mlp_nobias": (lambda: sp_mlp(8, bias=0.0), None),
    "cnn": (lambda: sp_cnn(5), CNN_SHAPE),
    "cnn_pool": (lambda: sp_cnn(5, pool=True), CNN_SHAPE),
}
KERNELS = {"ntk": gpntk.NTKKernel, "nngp": gpntk.NNGPKernel}


def inputs(n: int, shape, seed: int = 0) -> torch.Tensor:
    d = 4 if shape is None else math.prod(shape)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def kernel_of(name: str, kind: str, **kwargs):
    make, shape = NETS[name]
    return KERNELS[kind](make(), input_shape=shape, **kwargs), shape


# --- the maps ------------------------------------------------------------------------------------
def test_linear_network_by_hand():
    r"""Two linear standard layers: :math:`\Theta_1 = x\cdot x' + 1`,
    :math:`\Theta_2 = n \Sigma_1 + \sigma_2^2 \Theta_1 + 1`."""
    d, n = 3, 7
    net = L.serial(L.Dense(2.0, 0.3, in_width=d, **SP), L.Dense(1.5, 0.2, in_width=n, **SP))
    x1, x2 = inputs(4, None)[:, :d], inputs(3, None, seed=1)[:, :d]
    dot = x1 @ x2.T
    sigma1 = 2.0 * dot / d + 0.3
    theta = n * sigma1 + 1.5 * (dot + 1) + 1
    torch.testing.assert_close(gpntk.NTKKernel(net)(x1, x2).to_dense(), theta, rtol=1e-14, atol=0)
    torch.testing.assert_close(gpntk.NNGPKernel(net)(x1, x2).to_dense(), 1.5 * sigma1 + 0.2, rtol=1e-14, atol=0)
    # a frozen standard layer only carries the NTK below it; without bias there is no "+ 1"
    frozen = L.serial(L.Dense(2.0, 0.3, in_width=d, **SP), L.Dense(1.5, 0.2, trainable=False, in_width=n, **SP))
    torch.testing.assert_close(gpntk.NTKKernel(frozen)(x1, x2).to_dense(), 1.5 * (dot + 1), rtol=1e-14, atol=0)
    nobias = L.serial(L.Dense(2.0, 0.0, in_width=d, **SP), L.Dense(1.5, 0.0, in_width=n, **SP))
    torch.testing.assert_close(
        gpntk.NTKKernel(nobias)(x1, x2).to_dense(), n * 2.0 * dot / d + 1.5 * dot, rtol=1e-14, atol=0
    )


@pytest.mark.parametrize("name", list(NETS))
def test_nngp_does_not_depend_on_the_parameterization(name):
    make, shape = NETS[name]
    net = make()
    twin = L.serial(*[
        type(layer)(**{**_affine_kwargs(layer), "parameterization": "ntk", "in_width": None})
        if isinstance(layer, L.Affine) else layer
        for layer in net.layers
    ])
    x = inputs(5, shape)
    torch.testing.assert_close(
        gpntk.NNGPKernel(net, input_shape=shape)(x).to_dense(), gpntk.NNGPKernel(twin, input_shape=shape)(x).to_dense()
    )
    ntk = gpntk.NTKKernel(net, input_shape=shape)(x).to_dense()
    assert not torch.allclose(ntk, gpntk.NTKKernel(twin, input_shape=shape)(x).to_dense())


def _affine_kwargs(layer):
    kwargs = {"weight_variance": layer.weight_variance.item(), "bias_variance": layer.bias_variance.item()}
    if isinstance(layer, L.Conv):
        kwargs.update(kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding)
    return kwargs


def test_ntk_grows_with_the_widths():
    x = inputs(4, None)
    small, large = (gpntk.NTKKernel(sp_mlp(w))(x).to_dense() for w in (8, 800))
    assert (large.diagonal() > 50 * small.diagonal()).all()


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("name", list(NETS))
def test_diag_is_the_diagonal_of_the_full_kernel(name, kind):
    kernel, shape = kernel_of(name, kind)
    x = inputs(5, shape)
    torch.testing.assert_close(kernel(x, diag=True), kernel(x).to_dense().diagonal(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(NETS))
def test_float32_is_finite_and_close(name):
    kernel, shape = kernel_of(name, "ntk")
    x = inputs(5, shape)
    exact = kernel(x).to_dense()
    single = kernel(x.float()).to_dense()
    assert single.dtype == torch.float32 and torch.isfinite(single).all()
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())


def test_batch_shape_evaluates_each_member():
    kernel = gpntk.NTKKernel(sp_mlp(8), batch_shape=torch.Size([2]))
    first = kernel.net.layers[0]
    first.weight_variance = torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    x = inputs(4, None)
    batched = kernel(x).to_dense()
    assert batched.shape == (2, 4, 4)
    for i, value in enumerate((1.0, 3.0)):
        single = sp_mlp(8)
        single.layers[0].weight_variance = value
        torch.testing.assert_close(batched[i], gpntk.NTKKernel(single)(x).to_dense(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn_pool"])
def test_gradcheck_wrt_raw_hyperparameters(name):
    kernel, shape = kernel_of(name, "ntk")
    names, raws = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in kernel.named_parameters()])
    x1, x2 = inputs(3, shape), inputs(2, shape, seed=1)

    def entries(*values):
        with gpytorch.settings.lazily_evaluate_kernels(False):
            return torch.func.functional_call(kernel, dict(zip(names, values)), (x1, x2)).to_dense()

    assert gradcheck(entries, raws)
    assert gradcheck(lambda *v: torch.func.functional_call(kernel, dict(zip(names, v)), (x1,), {"diag": True}), raws)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_blockwise_backend_matches_dense(name):
    kernel, shape = kernel_of(name, "ntk")
    x, v = inputs(7, shape), torch.randn(7, 2)
    dense = kernel(x).to_dense() @ v
    with settings.kernel_backend("blockwise"):
        torch.testing.assert_close(kernel(x) @ v, dense, rtol=1e-12, atol=0)


def test_reprs_name_the_parameterization():
    layer = L.Conv(3, in_width=4, **SP)
    assert "parameterization='standard', in_width=4" in repr(layer)
    assert "in_width" not in repr(L.Dense())


# --- the finite network --------------------------------------------------------------------------
def test_finite_modules_and_their_distribution():
    width = 400
    model = sp_mlp(width, d=4).finite(width, in_features=4, generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if isinstance(m, StandardLinear)]
    assert len(linears) == 3 and not any(isinstance(m, NTKLinear) for m in model.modules())
    for linear, (var_w, var_b, fan_in) in zip(linears, [(2.0, 0.1, 4), (1.5, 0.2, width), (1.2, 0.1, width)]):
        assert linear.in_features == fan_in
        std = linear.weight.detach().std().item()
        assert abs(std / math.sqrt(var_w / fan_in) - 1) < 0.1  # 400-1600 draws per layer
        assert linear.bias is not None and linear.bias.requires_grad
    assert abs(linears[1].bias.detach().std().item() / math.sqrt(0.2) - 1) < 0.15
    nobias = sp_mlp(width, bias=0.0).finite(width, in_features=4)
    assert all(m.bias is None for m in nobias.modules() if isinstance(m, StandardLinear))
    frozen = L.serial(L.Dense(2.0, 0.1, in_width=3, trainable=False, **SP), L.ReLU(), L.Dense(in_width=5, **SP))
    first = frozen.finite(5, in_features=3)[0]
    assert not first.weight.requires_grad and not first.bias.requires_grad
    conv = sp_cnn(6).finite(6, input_shape=CNN_SHAPE)
    convs = [m for m in conv.modules() if isinstance(m, StandardConv)]
    assert [c.linear.in_features for c in convs] == [2 * 3, 6 * 3]


def test_finite_refuses_a_width_other_than_in_width():
    with pytest.raises(ArchitectureError, match=r"gets 16 input features .* in_width=8 .* net.finite\(8\)"):
        sp_mlp(8).finite(16, in_features=4)
    with pytest.raises(ArchitectureError, match=r"gets 5 input features \(channels\) from the input, .* in_width is 4"):
        sp_mlp(8).finite(8, in_features=5)  # the first layer's in_width is the input dimension
    with pytest.raises(ArchitectureError, match=r"Conv\(.*in_width=2\) gets 3 input features"):
        sp_cnn(5).finite(5, input_shape=(3, 6))
    with pytest.raises(ArchitectureError, match=r"Dense\(.*in_width=30\) gets 35 input features"):
        sp_cnn(5).finite(5, input_shape=(2, 7))  # after Flatten: width * length
    # inputs of unknown size: the first layer takes in_width features
    lazy = sp_mlp(8).finite(8)
    assert lazy(torch.randn(3, 4)).shape == (3, 1)
    with pytest.raises(RuntimeError):
        lazy(torch.randn(3, 5))


@pytest.mark.parametrize("out_features", [1, 3])
@pytest.mark.parametrize(
    "name", ["mlp", "mlp_nobias", "cnn", "cnn_pool", "frozen_first", "ntk_readout"]
)
def test_structured_empirical_ntk_matches_the_jacobian(name, out_features):
    nets = {
        **NETS,
        "frozen_first": (lambda: L.serial(
            L.Dense(2.0, 0.1, in_width=4, trainable=False, **SP), L.ReLU(), L.Dense(1.0, 0.1, in_width=8, **SP)
        ), None),
        "ntk_readout": (lambda: sp_mlp(8, readout="ntk"), None),
    }
    make, shape = nets[name]
    width = 5 if shape is not None else 8
    model = make().finite(width, input_shape=shape, in_features=None if shape else 4, out_features=out_features,
                          generator=torch.Generator().manual_seed(1))
    assert structured_applicable(model)
    x1, x2 = inputs(4, shape), inputs(3, shape, seed=1)
    for reduce in ("mean", "none"):
        fast = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="structured")
        slow = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="jacobian")
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10 * slow.abs().max().item())


# --- backends and the posterior ------------------------------------------------------------------
def test_keops_backend_takes_standard_dense_layers_only_on_vectors():
    """Its values and gradients are checked against dense in tests/contrib/test_keops_standard.py (slow)."""
    assert keops_supported(sp_mlp(8)) is None
    reason = keops_supported(sp_cnn(5), input_shape=CNN_SHAPE)
    assert reason is not None and "spatial inputs" in reason


def test_trained_ensemble_follows_the_standard_kernels():
    net = sp_mlp(8)
    x, test_x = inputs(6, None), inputs(3, None, seed=2)
    y = torch.sin(x.sum(-1, keepdim=True)) + torch.stack([x[:, 0], x[:, 1]], -1)
    lr, t = 0.5, 30.0
    ensemble = gpntk.TrainedEnsemble(net, x, y, learning_rate=lr)
    ntk, nngp = gpntk.NTKKernel(net), gpntk.NNGPKernel(net)
    with torch.no_grad():
        theta, theta_star = ntk(x).to_dense(), ntk(test_x, x).to_dense()
        sigma, sigma_star, sigma_test = nngp(x).to_dense(), nngp(test_x, x).to_dense(), nngp(test_x).to_dense()
    evals, evecs = torch.linalg.eigh(theta)
    tau = lr * t / y.numel()
    a_t = evecs @ torch.diag(-torch.expm1(-tau * evals) / evals) @ evecs.T
    mean = theta_star @ a_t @ y
    cov = (sigma_test - theta_star @ a_t @ sigma_star.T - sigma_star @ a_t @ theta_star.T
           + theta_star @ a_t @ sigma @ a_t @ theta_star.T)
    post = ensemble(test_x, t)
    torch.testing.assert_close(post.mean, mean, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(post.covariance_matrix[::2, ::2], cov, rtol=1e-7, atol=1e-9)
    assert ensemble(test_x, math.inf, regime="ntkgp").mean.shape == (3, 2)  # smoke
    with pytest.raises(ValueError, match=r"regime='nngp' .* Dense\(.*in_width=4\) is in standard parameterization"):
        ensemble.mean(test_x, t, regime="nngp")
    with pytest.raises(ValueError, match="regime='nngp'"):
        ensemble.max_learning_rate("nngp")
    ntk_net = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dense(1.2, 0.1))  # NTK parameterization keeps it
    assert gpntk.TrainedEnsemble(ntk_net, x, y).mean(test_x, t, regime="nngp").shape == (3, 2)


def test_subclasses_must_declare_standard_support():
    class Unshared(L.Conv):  # e.g. a layer whose fan-in the standard map of Conv would get wrong
        pass

    with pytest.raises(ArchitectureError, match=r"Unshared supports parameterization='ntk' only"):
        Unshared(3, in_width=2, **SP)
    assert Unshared(3).in_width is None


def test_a_first_layer_in_width_must_be_the_number_of_inputs():
    """The kernel of a first layer with another in_width belongs to no network: refused where the inputs are known."""
    kernel = gpntk.NTKKernel(sp_mlp(8))  # vector inputs: their number is known at the call
    with pytest.raises(ArchitectureError, match=r"Dense\(.*in_width=4\) gets 5 input features .* from the input"):
        kernel(torch.randn(3, 5)).to_dense()
    with pytest.raises(ArchitectureError, match=r"gets 5 input features"):
        kernel(torch.randn(3, 5), diag=True)
    with pytest.raises(ArchitectureError, match=r"gets 5 input features"):
        gpntk.NeuralKernelSum(sp_mlp(8))(torch.randn(3, 5)).to_dense()
    assert kernel(torch.randn(3, 4)).shape == (3, 3)
    with pytest.raises(ArchitectureError, match=r"Conv\(.*in_width=2\) gets 3 input features"):
        gpntk.NNGPKernel(sp_cnn(5), input_shape=(3, 6))  # spatial: C is known when the kernel is built
    with pytest.raises(ArchitectureError, match=r"gets 5 input features"):
        gpntk.TrainedEnsemble(sp_mlp(8), torch.randn(4, 5), torch.randn(4))
    # after a layer that changes the number of features the check stops: Flatten of the inputs
    flat = L.serial(L.Flatten(), L.Dense(2.0, 0.1, in_width=12, **SP), L.ReLU(), L.Dense(in_width=5, **SP))
    x = inputs(3, CNN_SHAPE)
    assert gpntk.NTKKernel(flat, input_shape=CNN_SHAPE)(x).to_dense().shape == (3, 3)
    # a 1x1 standard Dense on spatial inputs: in_width = C
    spatial_dense = L.serial(
        L.Dense(2.0, 0.1, in_width=2, **SP), L.ReLU(), L.GlobalAvgPool(), L.Dense(in_width=5, **SP)
    )
    assert gpntk.NTKKernel(spatial_dense, input_shape=CNN_SHAPE)(x).to_dense().shape == (3, 3)
    with pytest.raises(ArchitectureError, match=r"Dense\(.*in_width=6\) gets 2 input features"):
        L.serial(L.Dense(in_width=6, **SP), L.ReLU(), L.Flatten(), L.Dense()).finite(4, input_shape=CNN_SHAPE)


def test_parameterization_and_in_width_are_fixed():
    layer = L.Dense(in_width=3, **SP)
    assert (layer.parameterization, layer.in_width) == ("standard", 3)
    assert (L.Dense().parameterization, L.Dense().in_width) == ("ntk", None)
    with pytest.raises(AttributeError):
        layer.in_width = 5


@pytest.mark.parametrize("reducer,right", [
    (lambda: L.Flatten(), 2 * 2 * 2),
    (lambda: L.GlobalAvgPool(), 2),
    (lambda: L.GlobalSumPool(), 2),
    (lambda: L.serial(L.AvgPool(2), L.Flatten()), 2 * 1 * 1),
])
def test_in_width_after_flatten_and_pooling_is_checked_against_the_inputs(reducer, right):
    """Layers without weights hand on the number of features, so a wrong in_width of a standard layer
    after them is refused instead of scaling the NTK; the right one is accepted."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def net(width):
        return L.serial(reducer(), L.Dense(2.0, 0.1, parameterization="standard", in_width=width), L.ReLU(),
                        L.Dense(1.0))

    assert torch.isfinite(gpntk.NTKKernel(net(right), input_shape=(2, 2, 2))(x).to_dense()).all()
    for wrong in (right + 1, max(right - 1, 1) if right > 1 else right + 2):
        with pytest.raises(ArchitectureError, match=f"in_width is {wrong}"):
            gpntk.NTKKernel(net(wrong), input_shape=(2, 2, 2))(x).to_dense()
