"""Derivatives of the kernels: torch.func transforms, and first and second derivatives against finite differences.

The references are central finite differences in float64. At pairs of identical inputs (x = x',
correlation one) and at correlation minus one the kernels that are smooth there must match them to
second order; where the exact kernel has a kink (the ReLU family's NTK, Sign), gpntk returns the
average of the one-sided derivatives, which is what a central difference measures.
"""

from __future__ import annotations

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.dense import evaluate

#: every closed-form activation, and the quadrature ones
CLOSED_FORM = {
    "relu": L.ReLU, "leaky_relu": lambda: L.LeakyReLU(0.2), "abrelu": lambda: L.ABReLU(-0.5, 1.5), "abs": L.Abs,
    "sign": L.Sign, "erf": L.Erf, "gelu": L.GELU, "sin": L.Sin, "cos": lambda: L.Cos(1.0, 0.8, 0.3),
    "rbf": L.Rbf, "exp": lambda: L.Exp(1.0, 0.5), "gaussian": L.Gaussian,
    "rectified_monomial2": lambda: L.RectifiedMonomial(2), "step": lambda: L.RectifiedMonomial(0),
    "monomial3": lambda: L.Monomial(3), "polynomial": lambda: L.Polynomial([0.1, 1.0, 0.5]),
}
QUADRATURE = {"tanh": L.Tanh, "sigmoid": L.Sigmoid, "softplus": L.Softplus, "silu": L.SiLU}
#: activations whose kernels are twice differentiable at correlation one
SMOOTH = ["erf", "gelu", "sin", "cos", "rbf", "exp", "gaussian", "monomial3", "polynomial", *QUADRATURE]
#: kernels with a kink at correlation one: the NTKs of the ReLU family, and Sign's NNGP
KINKED = ["relu", "leaky_relu", "abrelu", "abs", "sign", "step"]


def network(name: str, bias_variance: float = 0.1, degree: int | None = None, depth: int = 2) -> L.Layer:
    """``depth`` hidden layers of ``name``; quadrature activations with a ``degree``-point rule if given."""
    make = {**CLOSED_FORM, **QUADRATURE}[name]
    if name in QUADRATURE and degree is not None:
        make = lambda: QUADRATURE[name](degree=degree)  # noqa: E731
    hidden = [
        layer for _ in range(depth) for layer in (L.Dense(weight_variance=1.5, bias_variance=bias_variance), make())
    ]
    return L.serial(*hidden, L.Dense(weight_variance=1.0, bias_variance=bias_variance))


def kernel_fn(net: L.Layer, output: str):
    kernel = gpntk.NTKKernel(net) if output == "ntk" else gpntk.NNGPKernel(net)
    for p in kernel.parameters():
        p.requires_grad_(False)
    return lambda x, p: kernel(x.unsqueeze(0), p.unsqueeze(0)).to_dense()[0, 0]


def central_gradient(f, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    eye = torch.eye(x.numel(), dtype=x.dtype)
    return torch.stack([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in eye])


def central_hessian(f, x: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    eye = torch.eye(x.numel(), dtype=x.dtype)
    rows = []
    for a in eye:
        rows.append(
            torch.stack(
                [
                    (f(x + h * a + h * b) - f(x + h * a - h * b) - f(x - h * a + h * b) + f(x - h * a - h * b))
                    / (4 * h * h)
                    for b in eye
                ]
            )
        )
    return torch.stack(rows)


def point() -> torch.Tensor:
    return torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
@pytest.mark.parametrize("output", ["nngp", "ntk"])
def test_torch_func_transforms(name, output):
    """grad, jacrev, jacfwd, hessian and vmap run on every closed-form activation and agree with autograd."""
    f = kernel_fn(network(name), output)
    p = point()
    x = torch.tensor([0.3, 0.9, -0.5], dtype=torch.float64)
    xs = torch.stack([x, -x, p, 2 * x])
    reference = torch.autograd.functional.jacobian(lambda z: f(z, p), x)
    hessian = torch.autograd.functional.hessian(lambda z: f(z, p), x)
    g = lambda z: f(z, p)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(g)(x), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(g)(x), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.jacfwd(g)(x), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.hessian(g)(x), hessian, rtol=1e-9, atol=1e-11)
    values = torch.func.vmap(g)(xs)
    torch.testing.assert_close(values, torch.stack([g(z) for z in xs]), rtol=1e-13, atol=1e-14)
    grads = torch.func.vmap(torch.func.grad(g))(xs)
    assert torch.isfinite(grads).all()
    torch.testing.assert_close(grads[0], reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SMOOTH + ["relu"])
@pytest.mark.parametrize("where", ["generic", "same", "opposite"])
def test_nngp_derivatives_match_finite_differences(name, where):
    """First and second derivatives of k(x, p) in x, at a generic point, at x = p and at x = -p (correlation -1).

    The ReLU NNGP is twice but not three times differentiable at x = ±p (a θ³ term), so there its
    central second difference is only accurate to O(h).
    """
    bias = 0.0 if where == "opposite" else 0.1  # with a bias the first layer's correlation of -p and p is above -1
    f = kernel_fn(network(name, bias), "nngp")
    p = point()
    x = {"generic": torch.tensor([0.3, 0.9, -0.5], dtype=torch.float64), "same": p.clone(), "opposite": -p}[where]
    g = lambda z: f(z, p)  # noqa: E731
    gradient = torch.func.grad(g)(x)
    hessian = torch.func.hessian(g)(x)
    assert torch.isfinite(gradient).all() and torch.isfinite(hessian).all()
    scale = g(p).abs()
    torch.testing.assert_close(gradient, central_gradient(g, x), rtol=1e-7, atol=1e-8 * scale)
    h, tolerance = (1e-5, 5e-5) if name == "relu" else (1e-4, 2e-6)
    torch.testing.assert_close(hessian, central_hessian(g, x, h), rtol=2e-5, atol=tolerance * scale)
    # the autograd (double backward) Hessian agrees with torch.func's
    torch.testing.assert_close(torch.autograd.functional.hessian(g, x), hessian, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", SMOOTH)
def test_ntk_derivatives_at_identical_inputs(name):
    """The NTK of smooth activations: gradient and Hessian at x = p match finite differences."""
    f = kernel_fn(network(name), "ntk")
    p = point()
    g = lambda z: f(z, p)  # noqa: E731
    x = p.clone()
    scale = g(p).abs()
    torch.testing.assert_close(torch.func.grad(g)(x), central_gradient(g, x), rtol=1e-7, atol=1e-8 * scale)
    torch.testing.assert_close(torch.func.hessian(g)(x), central_hessian(g, x), rtol=2e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("name", KINKED)
@pytest.mark.parametrize("output", ["nngp", "ntk"])
def test_kinks_give_the_average_of_one_sided_derivatives(name, output):
    """At x = p the kinked kernels' gradients are the central difference (the average of the one-sided slopes), finite.

    The Hessian there does not exist; it must still be finite (no NaN or 1/sqrt(eps)). The step
    is 1e-4: the kernels lose accuracy at nearly (not exactly) identical inputs, see docs/numerics.md.
    Sign and the step function have one hidden layer here: below a second one their kink becomes a
    square-root cusp (infinite one-sided derivatives), where the central differences converge to
    gpntk's value only like sqrt(h); that case is checked for finiteness below.
    """
    depth = 1 if name in ("sign", "step") else 2
    f = kernel_fn(network(name, depth=depth), output)
    p = point()
    g = lambda z: f(z, p)  # noqa: E731
    x = p.clone()
    gradient = torch.func.grad(g)(x)
    scale = g(p).abs()
    h = 1e-5 if name in ("sign", "step") else 1e-4  # balances the O(h) asymmetry and the rounding
    torch.testing.assert_close(gradient, central_gradient(g, x, h), rtol=1e-4, atol=1e-5 * scale)
    hessian = torch.func.hessian(g)(x)
    assert torch.isfinite(hessian).all()
    assert hessian.abs().max() < 1e3 * scale
    deep = kernel_fn(network(name, depth=3), output)
    assert torch.isfinite(torch.func.hessian(lambda z: deep(z, p))(x)).all()


def test_erf_hessian_at_identical_inputs_is_the_limit():
    """The case measured in the issue: the Erf NNGP Hessian at x = p was 3.5e-5 where the limit is about -0.2."""
    net = L.serial(L.Dense(), L.Erf(), L.Dense())
    f = kernel_fn(net, "nngp")
    p = torch.tensor([0.5, -1.0], dtype=torch.float64)
    g = lambda z: f(z, p)  # noqa: E731
    near = central_hessian(g, p + 1e-3)  # the limit, approached from a generic point
    at = torch.autograd.functional.hessian(g, p.clone())
    torch.testing.assert_close(at, central_hessian(g, p), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(at, near, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_hyperparameter_gradients_at_identical_inputs(name):
    """d Θ(x, x') / d σw² at two identical rows (an off-diagonal entry) and on the diagonal.

    Both equal the finite difference.
    """
    net = network(name)
    x = torch.tensor([[0.7, -0.4, 1.1], [0.7, -0.4, 1.1], [0.2, 0.1, -0.3]], dtype=torch.float64)
    hyper = {key: value.detach() for key, value in Hyperparameters.collect(net, like=x).items()}
    key = "weight_variance_0"

    def ntk(value: torch.Tensor) -> torch.Tensor:
        return evaluate(net, x, x, {**hyper, key: value.reshape(hyper[key].shape)})[1]

    value = hyper[key].reshape(()).clone().requires_grad_(True)
    kernel = ntk(value)
    h = 1e-6
    with torch.no_grad():
        fd = (ntk(value + h) - ntk(value - h)) / (2 * h)
    for i, j in [(0, 1), (0, 0), (0, 2)]:
        (grad,) = torch.autograd.grad(kernel[i, j], value, retain_graph=True)
        torch.testing.assert_close(grad, fd[i, j], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["relu", "erf", "gelu", "gaussian", "tanh", "sin"])
def test_float32_gradients_are_finite_where_the_kernel_is(name):
    """float32 inputs of scale 1e4 (with a duplicated row): a finite kernel has finite gradients."""
    torch.manual_seed(0)
    net = L.mlp(depth=3, activation=name, weight_variance=2.0, bias_variance=0.1)
    x = (torch.randn(8, 3) * 1e4).float()
    x[1] = x[0]
    x.requires_grad_(True)
    for other in (x, x[:4].detach().clone()):
        x.grad = None
        kernel = gpntk.NTKKernel(net)(x, other).to_dense()
        assert torch.isfinite(kernel).all()
        kernel.sum().backward()
        assert torch.isfinite(x.grad).all()
