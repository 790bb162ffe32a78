"""ConvTranspose and ConvLocal: geometry, finite modules against the kernel maps, manners, refusals.

The reference cases (``a2_convtranspose*``, ``a2_convlocal1d``) run in ``tests/test_reference.py``
and the Monte Carlo convergence in ``tests/empirical/test_monte_carlo_conv_variants.py``. Here the
finite-width modules are checked against the layers' kernel maps exactly: each module is linear
in its parameters, so the expectation over standard normal parameters of ``h hᵀ`` for inputs of
covariance Σ is ``Σ_i J_i Σ J_iᵀ + b_i b_iᵀ`` over the parameter basis (``J_i`` the module's
Jacobian with only parameter ``i`` equal to 1, ``b_i`` its output at zero input), which must equal
the layer's Σ' in the full position-by-position layout (one channel in, one out).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.core.spatial import Layout
from gpntk.core.state import KernelState
from gpntk.empirical.structured import structured_applicable
from gpntk.errors import ArchitectureError

DTYPE = torch.float64


def _finite_expectation(layer: L.Layer, spatial: tuple[int, ...], cov: torch.Tensor) -> torch.Tensor:
    """``E[h hᵀ]`` over the parameters of ``layer``'s one-channel finite module, inputs of covariance ``cov``."""
    module, out_shape = layer.build_finite((1, *spatial), 1, 1, True)
    module = module.double()
    positions = math.prod(spatial)
    basis_inputs = torch.eye(positions, dtype=DTYPE).reshape(positions, 1, *spatial)
    params = list(module.parameters())
    total = None
    with torch.no_grad():
        for param in params:
            for i in range(param.numel()):
                for p in params:
                    p.zero_()
                param.view(-1)[i] = 1.0
                offset = module(torch.zeros(1, 1, *spatial, dtype=DTYPE)).reshape(-1)
                jacobian = (module(basis_inputs).reshape(positions, -1) - offset).T  # (P_out, P_in)
                term = jacobian @ cov @ jacobian.T + torch.outer(offset, offset)
                total = term if total is None else total + term
    assert total is not None
    assert out_shape == (1, *_out_spatial(layer, spatial))
    return total


def _out_spatial(layer: L.Layer, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return layer.out_spatial(spatial)  # type: ignore[attr-defined]


def _kernel_map(layer: L.Layer, spatial: tuple[int, ...], cov: torch.Tensor, full: bool) -> torch.Tensor:
    """The layer's Σ' for one input of position covariance ``cov`` (``full`` or diagonal layout), as a matrix."""
    layout = Layout(spatial, full=True)
    t = layout.from_matrix(cov, 1, 1)  # (1, 1, *S)
    if not full:
        t = layout.point_variances(t)
        layout = layout.diagonal()
    state = KernelState(t, t, t, None, diag=True, same_inputs=True, layout=layout, keep_full=full)
    hyper = Hyperparameters(layer, Hyperparameters.collect(layer, cov))
    out = layer.kernel_map(state, hyper)
    if not full:
        assert not out.layout.full
        return torch.diag_embed(out.cov12.reshape(-1))
    assert out.layout.full
    return out.layout.to_matrix(out.cov12)


def _random_covariance(positions: int, seed: int) -> torch.Tensor:
    a = torch.randn(positions, positions + 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return a @ a.T / positions


TRANSPOSE_GEOMETRIES = [
    (length, k, s, padding)
    for length, k, s, padding in itertools.product((1, 2, 4), (1, 2, 3, 4), (1, 2, 3), ("same", "valid"))
]


@pytest.mark.parametrize("length,k,s,padding", TRANSPOSE_GEOMETRIES)
def test_conv_transpose_1d_finite_module_matches_kernel_map(length, k, s, padding):
    layer = L.ConvTranspose(k, stride=s, padding=padding, weight_variance=1.7, bias_variance=0.3)
    cov = _random_covariance(length, seed=length * 100 + k * 10 + s)
    expected = _finite_expectation(layer, (length,), cov)
    torch.testing.assert_close(_kernel_map(layer, (length,), cov, full=True), expected, rtol=1e-12, atol=1e-12)
    diagonal = _kernel_map(layer, (length,), cov, full=False)
    torch.testing.assert_close(diagonal.diagonal(), expected.diagonal(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_transpose_2d_finite_module_matches_kernel_map(padding):
    layer = L.ConvTranspose((2, 3), stride=(2, 1), padding=padding, weight_variance=1.5, bias_variance=0.05)
    spatial = (3, 2)
    cov = _random_covariance(6, seed=3)
    expected = _finite_expectation(layer, spatial, cov)
    torch.testing.assert_close(_kernel_map(layer, spatial, cov, full=True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,k,s,padding", [
    (5, 3, 1, "same"), (5, 3, 2, "same"), (6, 2, 2, "valid"), (5, 3, 1, "circular"), (7, 4, 3, "same"),
    # windows larger than the input: zeros (same) or the input wrapped more than once (circular)
    (4, 5, 1, "same"), (3, 7, 1, "circular"), (3, 7, 2, "same"),
])
def test_conv_local_finite_module_matches_kernel_map(length, k, s, padding):
    layer = L.ConvLocal(k, stride=s, padding=padding, weight_variance=1.5, bias_variance=0.2)
    cov = _random_covariance(length, seed=length + k + s)
    expected = _finite_expectation(layer, (length,), cov)
    off = ~torch.eye(expected.shape[0], dtype=torch.bool)
    assert expected[off].abs().max() == 0  # different output positions are independent
    torch.testing.assert_close(_kernel_map(layer, (length,), cov, full=True), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_kernel_map(layer, (length,), cov, full=False), expected, rtol=1e-12, atol=1e-12)


def test_conv_local_2d_finite_module_matches_kernel_map():
    layer = L.ConvLocal((2, 3), stride=(1, 2), padding="valid", weight_variance=1.5, bias_variance=0.2)
    spatial = (3, 5)
    cov = _random_covariance(15, seed=4)
    expected = _finite_expectation(layer, spatial, cov)
    torch.testing.assert_close(_kernel_map(layer, spatial, cov, full=True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length,k,s,padding,size", [
    (5, 3, 2, "same", 10), (5, 3, 2, "valid", 11), (3, 2, 3, "valid", 9), (3, 4, 1, "valid", 6),
    (4, 1, 1, "same", 4), (2, 5, 2, "same", 4),
])
def test_conv_transpose_output_sizes(length, k, s, padding, size):
    """``L s`` ("same") or ``L s + max(k - s, 0)`` ("valid") outputs, in the kernel and the finite network."""
    layer = L.ConvTranspose(k, stride=s, padding=padding)
    assert layer.out_spatial((length,)) == (size,)
    module, shape = layer.build_finite((2, length), 3, 1, False)
    assert shape == (3, size)
    assert module(torch.randn(4, 2, length)).shape == (4, 3, size)


def test_conv_transpose_taps_follow_jax_geometry():
    """Output p receives input q through tap t when s q = p + t - a (k = 3, s = 2, "same": a = ⌈3/2⌉ = 2)."""
    layer = L.ConvTranspose(3, stride=2, padding="same")
    (window,) = layer.windows((4,))
    assert (window.shift, window.output) == (2, 8)
    cov = torch.diag(torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=DTYPE))
    sigma = _kernel_map(layer, (4,), cov, full=True)
    # p odd: t = 1 hits q = (p - 1)/2; p even: t = 0 hits q = p/2 - 1 and t = 2 hits q = p/2
    expected_diag = torch.tensor([1, 1, 11, 10, 110, 100, 1100, 1000], dtype=DTYPE) / 3
    torch.testing.assert_close(sigma.diagonal(), expected_diag)


# --- whole networks: diag, backends, dtypes, hyperparameters ---------------------------------------------
def _transpose_net(pool: bool = True) -> L.Serial:
    return L.serial(
        L.ConvTranspose((2, 3), stride=(2, 1), padding="same", weight_variance=2.0, bias_variance=0.1), L.ReLU(),
        L.GlobalAvgPool() if pool else L.Flatten(), L.Dense(1.5, 0.1),
    )


def _local_net(pool: bool = True) -> L.Serial:
    return L.serial(
        L.ConvLocal(3, weight_variance=2.0, bias_variance=0.1), L.Erf(),
        L.ConvLocal(2, stride=2, padding="valid", weight_variance=1.5, bias_variance=0.2), L.ReLU(),
        L.GlobalAvgPool() if pool else L.Flatten(), L.Dense(1.5, 0.1),
    )


NETS = {
    "transpose-gap": (_transpose_net, (2, 3, 2)),
    "transpose-flatten": (lambda: _transpose_net(pool=False), (2, 3, 2)),
    "local-gap": (_local_net, (2, 7)),
    "local-flatten": (lambda: _local_net(pool=False), (2, 7)),
}


def _inputs(shape: tuple[int, ...], n: int = 4, seed: int = 0, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(n, math.prod(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("cls", [gpntk.NNGPKernel, gpntk.NTKKernel])
def test_diag_is_the_diagonal_and_backends_agree(name, cls):
    make, shape = NETS[name]
    kernel = cls(make(), input_shape=shape)
    x = _inputs(shape)
    with torch.no_grad():
        full = kernel(x).to_dense()
        torch.testing.assert_close(kernel(x, diag=True), full.diagonal(), rtol=1e-12, atol=1e-12)
        with gpntk.settings.kernel_backend("blockwise"):
            blockwise = kernel(x, x[:3]).to_dense()
    torch.testing.assert_close(blockwise, full[:, :3], rtol=1e-12, atol=1e-12)
    assert torch.all(full.diagonal() > 0)


def test_conv_local_before_pooling_differs_from_flatten_only_by_position_pairs():
    """With GlobalAvgPool the zero covariances between positions enter through the activation's mean."""
    shape = (2, 7)
    x = _inputs(shape)
    pooled = gpntk.NNGPKernel(_local_net(), input_shape=shape)(x).to_dense().detach()
    shared = L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.Erf(),
        L.Conv(2, stride=2, padding="valid", weight_variance=1.5, bias_variance=0.2), L.ReLU(),
        L.GlobalAvgPool(), L.Dense(1.5, 0.1),
    )
    conv = gpntk.NNGPKernel(shared, input_shape=shape)(x).to_dense().detach()
    assert ((pooled - conv).norm() / conv.norm()).item() > 0.05  # unshared weights change the kernel
    flat = gpntk.NNGPKernel(_local_net(pool=False), input_shape=shape)(x).to_dense().detach()
    flat_conv = gpntk.NNGPKernel(
        L.serial(*list(shared.layers)[:4], L.Flatten(), L.Dense(1.5, 0.1)), input_shape=shape
    )(x).to_dense().detach()
    torch.testing.assert_close(flat, flat_conv, rtol=1e-12, atol=1e-12)  # Flatten: only the diagonal counts


@pytest.mark.parametrize("name", NETS)
def test_float32_is_finite_and_close(name):
    make, shape = NETS[name]
    x = _inputs(shape)
    net = make()
    with torch.no_grad():
        k64 = gpntk.NTKKernel(net, input_shape=shape)(x).to_dense()
        k32 = gpntk.NTKKernel(net, input_shape=shape)(x.float()).to_dense()
    assert k32.dtype == torch.float32 and torch.isfinite(k32).all()
    torch.testing.assert_close(k32.double(), k64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["transpose-gap", "local-gap"])
def test_gradcheck_wrt_inputs_and_raw_hyperparameters(name):
    make, shape = NETS[name]
    kernel = gpntk.NTKKernel(make(), input_shape=shape)
    x1 = _inputs(shape, 3, seed=1).requires_grad_()
    x2 = _inputs(shape, 2, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
    assert torch.autograd.gradcheck(lambda a: kernel(a, diag=True), (x1,))
    names = ["net.layers.0.raw_weight_variance", "net.layers.0.raw_bias_variance"]
    params = dict(kernel.named_parameters())
    raws = tuple(params[n].detach().double().clone().requires_grad_() for n in names)

    def evaluate(*r):
        with gpytorch_lazy_off():
            return torch.func.functional_call(kernel, dict(zip(names, r)), (x1.detach(), x2.detach())).to_dense()

    assert torch.autograd.gradcheck(evaluate, raws)


def gpytorch_lazy_off():
    import gpytorch

    return gpytorch.settings.lazily_evaluate_kernels(False)


@pytest.mark.parametrize("layer_class", [L.ConvTranspose, L.ConvLocal])
def test_batch_shape_hyperparameters(layer_class):
    def net(value):
        return L.serial(layer_class(2, weight_variance=value, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(),
                        L.Dense(1.0, 0.1))

    kernel = gpntk.NTKKernel(net(2.0), input_shape=(1, 5), batch_shape=torch.Size([2]))
    kernel.net.layers[0].weight_variance = torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    x = _inputs((1, 5), dtype=torch.float32)
    k = kernel(x).to_dense()
    assert k.shape == (2, 4, 4)
    for i, value in enumerate((1.0, 3.0)):
        torch.testing.assert_close(k[i], gpntk.NTKKernel(net(value), input_shape=(1, 5))(x).to_dense())


@pytest.mark.parametrize("layer_class", [L.ConvTranspose, L.ConvLocal])
def test_hyperparameters_are_learnable_with_priors(layer_class):
    import gpytorch

    layer = layer_class(3, weight_variance=2.0, bias_variance=0.1,
                        weight_variance_prior=gpytorch.priors.GammaPrior(2.0, 1.0))
    net = L.serial(layer, L.ReLU(), L.Flatten(), L.Dense(1.0, 0.1))
    kernel = gpntk.NTKKernel(net, input_shape=(2, 4))
    kernel(_inputs((2, 4), dtype=torch.float32)).to_dense().sum().backward()
    assert layer.raw_weight_variance.grad is not None and layer.raw_weight_variance.grad.abs().item() > 0
    assert layer.raw_bias_variance.grad is not None and layer.raw_bias_variance.grad.abs().item() > 0
    assert any(name.endswith("weight_variance_prior") for name, *_ in kernel.named_priors())
    assert "weight_variance=2" in repr(layer) and layer_class.__name__ in repr(layer)


# --- finite networks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NETS)
def test_finite_networks_use_full_jacobians(name):
    """The modules hold their own weights: the structured empirical NTK must not be used for them."""
    make, shape = NETS[name]
    model = make().finite(6, input_shape=shape, generator=torch.Generator().manual_seed(0)).double()
    assert not structured_applicable(model)
    x = _inputs(shape, 3)
    with pytest.raises(ValueError):
        gpntk.empirical_ntk(model, x, method="structured")
    ntk = gpntk.empirical_ntk(model, x)
    torch.testing.assert_close(ntk, gpntk.empirical_ntk(model, x, method="jacobian"))
    assert ntk.shape == (3, 3)


def test_frozen_layers_have_no_gradient():
    net = L.serial(L.ConvTranspose(2, stride=2, trainable=False, bias_variance=0.1), L.ReLU(),
                   L.ConvLocal(2, trainable=False, bias_variance=0.1), L.ReLU(), L.Flatten(), L.Dense(1.0))
    model = net.finite(4, input_shape=(1, 3))
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert len(frozen) == 4  # both layers' weights and biases


# --- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: L.ConvTranspose(3, padding="circular"), "ConvTranspose padding must be 'same' or 'valid'"),
    (lambda: L.ConvLocal(3, padding="full"), "padding must be one of"),
    (lambda: L.ConvTranspose(0), "kernel_size"),
    (lambda: L.ConvLocal(2, stride=0), "stride"),
    (lambda: L.ConvTranspose(2, stride=(1, 1.5)), "stride"),
    (lambda: L.ConvTranspose(2, weight_variance=0.0), "weight_variance"),
    (lambda: L.ConvLocal(2, bias_variance=-1.0), "bias_variance"),
    (lambda: L.ConvTranspose(2, parameterization="standard"), "ConvTranspose supports parameterization='ntk' only"),
    (lambda: L.ConvLocal(2, parameterization="standard"), "ConvLocal supports parameterization='ntk' only"),
    (lambda: L.serial(L.Dense(1.0), L.ConvTranspose(2), L.Flatten(), L.Dense(1.0)).finite(2, in_features=3),
     "ConvTranspose needs spatial inputs"),
    (lambda: L.serial(L.Flatten(), L.ConvLocal(2)), "ConvLocal needs spatial inputs.*outputs of Flatten"),
    (lambda: gpntk.NTKKernel(L.serial(L.ConvTranspose((2, 2)), L.Flatten(), L.Dense(1.0)), input_shape=(1, 4)),
     "ConvTranspose has kernel_size=\\(2, 2\\) \\(2 axes\\)"),
    (lambda: gpntk.NTKKernel(L.serial(L.ConvLocal(5, padding="valid"), L.Flatten(), L.Dense(1.0)), input_shape=(1, 4)),
     "ConvLocal has kernel_size"),
])
def test_bad_arguments_and_placements_are_refused(make, match):
    with pytest.raises(ArchitectureError, match=match):
        make()


def test_keops_refuses_with_a_reason():
    pytest.importorskip("pykeops")
    from gpntk.contrib.keops import keops_supported

    for layer in (L.ConvTranspose(2), L.ConvLocal(2)):
        net = L.serial(layer, L.ReLU(), L.Flatten(), L.Dense(1.0))
        assert layer.name in keops_supported(net)
        assert keops_supported(net, (2, 5)) is not None


# --- transforms and placements -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["transpose-gap", "local-gap"])
def test_torch_func_transforms_agree_with_autograd(name):
    make, shape = NETS[name]
    kernel = gpntk.NTKKernel(make(), input_shape=shape)
    x1, x2 = _inputs(shape, 3, seed=3), _inputs(shape, 2, seed=4)

    def f(a):
        return kernel(a, x2).to_dense()

    reference = torch.autograd.functional.jacobian(f, x1)
    torch.testing.assert_close(torch.func.jacrev(f)(x1), reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.func.jacfwd(f)(x1), reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.func.vmap(f)(torch.stack([x1, 2 * x1])), torch.stack([f(x1), f(2 * x1)]))


PLACEMENTS = {
    # ConvLocal in a residual-style sum whose other branch is a Conv, pooled: both branches full
    "local-branch-sum": L.serial(
        L.FanOut(2),
        L.parallel([L.ConvLocal(3, weight_variance=2.0, bias_variance=0.1)], [L.Conv(3, weight_variance=1.5)]),
        L.FanInSum(), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.0, 0.1),
    ),
    # a pooled branch beside a flattened one: the shared input is full, ConvLocal reduces it
    "local-beside-pooling": L.serial(
        L.FanOut(2),
        L.parallel([L.ConvLocal(2, weight_variance=2.0), L.ReLU(), L.GlobalAvgPool()],
                   [L.ConvTranspose(2, stride=2, weight_variance=2.0), L.ReLU(), L.Flatten()]),
        L.FanInConcat(), L.Dense(1.0, 0.1),
    ),
    # after average pooling (full), then a transposed convolution before global pooling
    "pool-then-transpose": L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2),
        L.ConvLocal(2, padding="same", weight_variance=2.0), L.ReLU(),
        L.ConvTranspose(3, stride=2, weight_variance=2.0, bias_variance=0.1), L.Erf(), L.GlobalAvgPool(), L.Dense(1.0),
    ),
}


@pytest.mark.parametrize("name", PLACEMENTS)
def test_placements_in_branches_and_after_pooling(name):
    net, shape = PLACEMENTS[name], (2, 6)
    x = _inputs(shape, 4, seed=5)
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        kernel = cls(net, input_shape=shape)
        with torch.no_grad():
            full = kernel(x).to_dense()
            torch.testing.assert_close(kernel(x, diag=True), full.diagonal(), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(full).all() and torch.linalg.eigvalsh(full).min() > -1e-10
    model = net.finite(5, input_shape=shape, generator=torch.Generator().manual_seed(0)).double()
    assert model(x).shape == (4, 1)


@pytest.mark.parametrize("pool", [L.Flatten, L.GlobalAvgPool])
def test_positions_no_tap_reaches_stay_finite_and_pickle(pool):
    """k < s ("valid") leaves positions with variance exactly 0 (no bias): kernels and gradients stay finite."""
    import pickle

    net = L.serial(
        L.ConvTranspose(2, stride=3, padding="valid", weight_variance=2.0), L.ReLU(),
        L.ConvLocal(2, weight_variance=1.0), L.Erf(), pool(), L.Dense(1.0),
    )
    x = _inputs((2, 4), 3, seed=6).requires_grad_()
    for cls in (gpntk.NNGPKernel, gpntk.NTKKernel):
        kernel = cls(net, input_shape=(2, 4))
        k = kernel(x).to_dense()
        (grad,) = torch.autograd.grad(k.sum(), x)
        assert torch.isfinite(k).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(kernel(x, diag=True), k.diagonal(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pickle.loads(pickle.dumps(kernel))(x).to_dense(), k)
