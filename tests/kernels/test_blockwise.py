"""The matrix-free (blockwise) kernel backend: products, bilinear derivatives, GPyTorch CG, backend choice."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from _models import ExactGP

import gpntk
from gpntk import layers as L
from gpntk import settings
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels import backends, dense, engine
from gpntk.kernels.blockwise import BlockwiseKernelOperator, kernel_matmul

DT = torch.float64
BLOCK = 4096  # small blocks: many of them, ragged edges, on and off the diagonal

ARCHITECTURES = {
    "mlp": (lambda: L.mlp(3, "relu", weight_variance=1.7, bias_variance=0.2), None),
    "erf": (lambda: L.mlp(2, "erf", weight_variance=2.5, bias_variance=0.3), None),
    "cnn": (
        lambda: L.serial(
            L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.5, 0.05)
        ),
        (2, 5),
    ),
}


def _inputs(n: int, features: int, seed: int) -> torch.Tensor:
    return torch.randn(n, features, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _setup(name: str, n1: int = 150, n2: int = 110):
    build, input_shape = ARCHITECTURES[name]
    net = build()
    features = 6 if input_shape is None else input_shape[0] * input_shape[1]
    return net, input_shape, _inputs(n1, features, 0), _inputs(n2, features, 1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["K(X,X)", "K(X,Z)"])
def test_products_equal_dense(name, symmetric):
    net, input_shape, x1, x2 = _setup(name)
    x2 = x1 if symmetric else x2
    hyper = Hyperparameters.collect(net, like=x1)
    rhs = _inputs(x2.shape[0], 3, 2)
    nngp, ntk = dense.nngp_and_ntk(net, x1, x2, input_shape=input_shape)
    out_nngp, out_ntk = kernel_matmul(
        net, x1, x2, hyper, rhs, kinds=("nngp", "ntk"), input_shape=input_shape, block_elements=BLOCK
    )
    assert _relative(out_nngp, nngp @ rhs) < 1e-12
    assert _relative(out_ntk, ntk @ rhs) < 1e-12
    assert not out_ntk.requires_grad


def test_products_with_batched_hyperparameters_and_vectors():
    net = L.mlp(2, "relu")
    kernel = gpntk.NTKKernel(net, batch_shape=torch.Size([2]), backend="blockwise", block_elements=BLOCK)
    net = kernel.net  # a batched kernel works on its own copy; kernels on that copy share it
    net.layers[0].weight_variance = torch.tensor([[[1.0]], [[2.5]]])
    x = _inputs(90, 4, 3)
    operator = kernel(x).evaluate_kernel()
    assert isinstance(operator.covar_mat, BlockwiseKernelOperator)
    rhs = _inputs(90, 2, 4)
    reference = gpntk.NTKKernel(net, batch_shape=torch.Size([2]), backend="dense")(x).to_dense()
    assert reference.shape == (2, 90, 90)
    assert _relative(operator @ rhs, reference @ rhs) < 1e-12
    assert _relative(operator @ rhs[:, 0], reference @ rhs[:, 0]) < 1e-12  # a vector
    assert _relative(operator.mT @ rhs, reference.mT @ rhs) < 1e-12
    assert _relative(operator.to_dense(), reference) < 1e-14


@pytest.mark.parametrize("inputs_need_grad", [False, True])
@pytest.mark.parametrize("symmetric", [True, False], ids=["K(X,X)", "K(X,Z)"])
def test_bilinear_derivative_equals_dense_autograd(symmetric, inputs_need_grad):
    net, input_shape, x1, x2 = _setup("mlp")
    x1 = x1.clone().requires_grad_(inputs_need_grad)
    x2 = x1 if symmetric else x2.clone().requires_grad_(inputs_need_grad)
    hyper = {
        name: value.detach().clone().requires_grad_() for name, value in Hyperparameters.collect(net, like=x1).items()
    }
    operator = BlockwiseKernelOperator.from_hyperparameters(
        x1, x2, hyper, net=net, output="ntk", input_shape=input_shape, block_elements=BLOCK
    )
    left, right = _inputs(x1.shape[0], 3, 5), _inputs(x2.shape[0], 3, 6)
    grads = operator._bilinear_derivative(left, right)
    _, ntk = dense.evaluate(net, x1, x2, hyper)
    wrt = ([x1] if symmetric else [x1, x2]) if inputs_need_grad else []
    expected = torch.autograd.grad((left * (ntk @ right)).sum(), wrt + list(hyper.values()))
    ours = list(grads[2:])
    if inputs_need_grad:
        ours = ([grads[0] + grads[1]] if symmetric else [grads[0], grads[1]]) + ours
    else:
        assert grads[0] is None and grads[1] is None
    assert len(ours) == len(expected)
    for got, want in zip(ours, expected):
        assert _relative(got, want) < 1e-11


def test_spatial_bilinear_derivative():
    net, input_shape, x1, _ = _setup("cnn", n1=40)
    hyper = {
        name: value.detach().clone().requires_grad_() for name, value in Hyperparameters.collect(net, like=x1).items()
    }
    operator = BlockwiseKernelOperator.from_hyperparameters(
        x1, x1, hyper, net=net, output="nngp", input_shape=input_shape, block_elements=BLOCK
    )
    left, right = _inputs(40, 2, 7), _inputs(40, 2, 8)
    grads = operator._bilinear_derivative(left, right)[2:]
    nngp, _ = dense.evaluate(net, x1, x1, hyper, input_shape=input_shape, track_ntk=False)
    expected = torch.autograd.grad((left * (nngp @ right)).sum(), list(hyper.values()))
    for got, want in zip(grads, expected):
        assert _relative(got, want) < 1e-11


def test_blocks_never_hold_the_matrix(monkeypatch):
    """Every recursion call of a blockwise product or derivative sees at most one block of pairs."""
    net, input_shape, x, _ = _setup("mlp", n1=300)
    seen = []
    original = engine.block_kernels

    def recording(net, x1, x2, *args):
        seen.append(x1.shape[-2] * x2.shape[-2])
        return original(net, x1, x2, *args)

    monkeypatch.setattr(engine, "block_kernels", recording)
    hyper = {
        name: value.detach().clone().requires_grad_() for name, value in Hyperparameters.collect(net, like=x).items()
    }
    operator = BlockwiseKernelOperator.from_hyperparameters(x, x, hyper, net=net, output="ntk", block_elements=BLOCK)
    operator._matmul(_inputs(300, 2, 9))
    products = len(seen)
    operator._bilinear_derivative(_inputs(300, 2, 10), _inputs(300, 2, 11))
    assert max(seen) <= BLOCK
    blocks_per_side = -(-300 // 64)  # square blocks of isqrt(4096) = 64 points
    assert products == blocks_per_side * (blocks_per_side + 1) // 2  # upper triangle only
    assert len(seen) == 2 * products


def _gp_loss_and_grads(backend: str, n: int = 240):
    torch.manual_seed(0)
    x = _inputs(n, 5, 12)
    y = torch.sin(2 * x[:, 0]) + 0.1 * _inputs(n, 1, 13)[:, 0]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.5  # well conditioned: CG converges to its tolerance
    kernel = gpytorch.kernels.ScaleKernel(
        gpntk.NTKKernel(L.mlp(2, "relu", weight_variance=1.5, bias_variance=0.1), backend=backend, block_elements=BLOCK)
    ).double()
    model = ExactGP(x, y, kernel, likelihood)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    model.train()
    with (
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.cg_tolerance(1e-11),
        gpytorch.settings.max_cg_iterations(2 * n),
        gpytorch.settings.num_trace_samples(8),
    ):
        torch.manual_seed(1)  # the same probe vectors for both backends
        loss = -mll(model(x), y)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.eval()
    test_x = _inputs(30, 5, 14)
    with (
        torch.no_grad(),
        gpytorch.settings.max_cholesky_size(0),
        gpytorch.settings.eval_cg_tolerance(1e-11),
        gpytorch.settings.max_cg_iterations(2 * n),
    ):
        prediction = likelihood(model(test_x))
        mean, variance = prediction.mean, prediction.variance
    return loss.detach(), grads, mean, variance


@pytest.mark.filterwarnings("ignore:CG terminated")
def test_exact_gp_with_conjugate_gradients_matches_dense_backend():
    """GPyTorch's CG marginal likelihood, its gradients and predictions agree between the backends.

    The products of the two backends differ by round-off (1e-15, tested above). GPyTorch's
    predictive CG solves stall at a residual of about 1e-6 (its own warning), so predictions can
    only agree to that accuracy; the marginal likelihood and its gradients agree to 1e-9.
    """
    loss_b, grads_b, mean_b, var_b = _gp_loss_and_grads("blockwise")
    loss_d, grads_d, mean_d, var_d = _gp_loss_and_grads("dense")
    assert abs(loss_b - loss_d) <= 1e-9 * abs(loss_d)
    assert grads_b.keys() == grads_d.keys()
    for name in grads_d:
        assert abs(grads_b[name] - grads_d[name]).max() <= 1e-8 * max(1.0, abs(grads_d[name]).max()), name
    assert _relative(mean_b, mean_d) < 1e-5
    assert _relative(var_b, var_d) < 1e-5


def test_backend_choice(monkeypatch):
    net = L.mlp(2, "relu")
    x, z = _inputs(1000, 3, 15), _inputs(5, 3, 16)
    hyper = Hyperparameters.collect(net, like=x)
    choose = backends.choose_backend
    # importing BoTorch raises GPyTorch's default max_cholesky_size: pin GPyTorch's own default
    with gpytorch.settings.max_cholesky_size(800):
        assert choose(net, x, x, hyper, None) == "dense"  # 10**6 numbers fit
        monkeypatch.setattr(settings, "DENSE_MAX_ELEMENTS", 10_000)
        assert choose(net, x, x, hyper, None) == "blockwise"  # never KeOps under "auto": only on request
        assert choose(net, x, z, hyper, None) == "dense"  # 5000 numbers
        with gpytorch.settings.max_cholesky_size(2000):  # GPyTorch would factorize it: keep it dense
            assert choose(net, x, x, hyper, None) == "dense"
        with settings.kernel_backend("dense"):
            assert choose(net, x, x, hyper, None) == "dense"
            assert choose(net, x, x, hyper, None, backend="blockwise") == "blockwise"  # the kernel's own choice wins
        monkeypatch.setattr(settings, "DENSE_MAX_ELEMENTS", 2**27)
        with settings.kernel_backend("blockwise"):
            assert choose(net, x, x, hyper, None) == "blockwise"
            assert choose(net, x[:1], x, hyper, None) == "dense"  # single rows stay dense
            operator = gpntk.NTKKernel(net)(x).evaluate_kernel()
            assert isinstance(operator.covar_mat, BlockwiseKernelOperator)


def test_backend_errors():
    with pytest.raises(ValueError, match="kernel_backend mode must be"):
        settings.kernel_backend("sparse")
    with pytest.raises(ValueError, match="kernel_backend mode must be"):
        gpntk.NTKKernel(L.mlp(1), backend="gpu")
    cnn = L.serial(L.Conv(3), L.ReLU(), L.GlobalAvgPool(), L.Dense())
    with pytest.raises(ValueError, match="keops"):
        gpntk.NTKKernel(cnn, input_shape=(2, 5), backend="keops")


def test_to_dense_does_not_multiply_by_identity():
    """``to_dense`` of the lazy kernel evaluates the kernel (same values as the blockwise product with I)."""
    net = L.mlp(2, "relu")
    x = _inputs(120, 3, 17)
    lazy = gpntk.NTKKernel(net, backend="blockwise", block_elements=BLOCK)(x).evaluate_kernel()
    eye = torch.eye(120, dtype=DT)
    assert _relative(lazy.to_dense(), lazy @ eye) < 1e-12


def test_blocked_dense_gradients_for_equal_values_in_two_tensors():
    """K(x, x') with x' equal in value to x but another tensor: blocks are not mirrored when autograd
    follows x', so the gradient equals that of the one-block evaluation (and of slightly shifted inputs)."""
    net = L.mlp(2, "erf", 2.0, 0.1)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(12, 12, generator=g, dtype=torch.float64)
    hyper = Hyperparameters.collect(net, like=x1)
    grads = {}
    for name, block_elements, shift in (("one block", None, 0.0), ("blocks", 16, 0.0), ("shifted", 16, 1e-12)):
        x2 = (x1 + shift).requires_grad_()
        _, ntk = dense.evaluate(net, x1, x2, hyper, block_elements=block_elements)
        (grads[name],) = torch.autograd.grad((ntk * weights).sum(), x2)
    torch.testing.assert_close(grads["blocks"], grads["one block"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads["blocks"], grads["shifted"], rtol=1e-6, atol=1e-6)
