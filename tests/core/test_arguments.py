"""Every argument means what it says (issue 14, item 7).

numpy integers and floats work wherever Python ones do (layer and activation arguments, depth,
widths, kernel and Monte Carlo arguments, ``finite(width)``, Lanczos options) and give the same
results; strings, bools, complex numbers, NaN and out-of-range values are refused with an error
naming the argument; float16 / bfloat16 inputs are refused with a TypeError naming the dtype
instead of returning NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk._validation import integer_argument, real_argument
from gpntk.activations import Erf, Gaussian, LeakyReLU, Monomial, Polynomial, RectifiedMonomial
from gpntk.errors import ArchitectureError


def _x(n: int = 4, d: int = 3, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- the shared helpers -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [5, np.int64(5), np.int32(5), np.uint8(5), torch.tensor(5), np.array(5)])
def test_integer_argument_accepts_integers_of_any_library(value):
    result = integer_argument("n", value, minimum=1)
    assert result == 5 and type(result) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), "5", b"5", 5.0, np.float64(5.0), 5 + 0j, torch.tensor(5.0),
                                   None, [5], np.array([5, 6])])
def test_integer_argument_refuses_what_only_looks_like_an_integer(value):
    with pytest.raises(ValueError, match="n must be an integer"):
        integer_argument("n", value)


@pytest.mark.parametrize("value", [0.5, np.float64(0.5), np.float32(0.5), np.float16(0.5), torch.tensor(0.5),
                                   np.array(0.5), torch.tensor([0.5])])
def test_real_argument_accepts_reals_of_any_library(value):
    assert real_argument("a", value) == 0.5
    assert real_argument("a", np.int64(2)) == 2.0


@pytest.mark.parametrize("value", [True, "0.5", "12", 0.5 + 0j, np.complex128(0.5), torch.tensor(0.5j), math.nan,
                                   math.inf, -math.inf, None, [0.5], torch.tensor([0.5, 1.0])])
def test_real_argument_refuses_non_reals(value):
    with pytest.raises(ValueError, match="a must be (a number|finite)"):
        real_argument("a", value)


def test_real_argument_bounds():
    with pytest.raises(ValueError, match="eps must be positive"):
        real_argument("eps", 0.0, minimum=0, strict=True)
    assert real_argument("eps", 0.0, minimum=0) == 0.0
    assert real_argument("t", math.inf, finite=False) == math.inf
    with pytest.raises(ValueError):
        real_argument("t", math.nan, finite=False)


# --- numpy numbers work wherever Python numbers do, with the same result ----------------------
def test_numpy_numbers_in_layers_give_the_python_kernel():
    x = _x()
    python = gpntk.NTKKernel(L.mlp(3, "relu", weight_variance=2.0, bias_variance=0.1))(x).to_dense()
    numpy_net = L.mlp(np.int64(3), "relu", weight_variance=np.float64(2.0), bias_variance=np.float32(0.1))
    numpy_kernel = gpntk.NTKKernel(numpy_net)(x).to_dense()
    torch.testing.assert_close(numpy_kernel, python, rtol=1e-7, atol=0)  # float32(0.1) differs by 1.5e-9
    serial = L.serial(L.Dense(np.int64(2), np.float64(0.5)), L.Erf(), L.Dense(np.float32(1.5)))
    reference = L.serial(L.Dense(2, 0.5), L.Erf(), L.Dense(1.5))
    torch.testing.assert_close(gpntk.NNGPKernel(serial)(x).to_dense(), gpntk.NNGPKernel(reference)(x).to_dense())


@pytest.mark.parametrize("make, plain", [
    (lambda: Erf(np.float64(2.0), np.int64(1), np.float32(0.5)), lambda: Erf(2.0, 1, 0.5)),
    (lambda: LeakyReLU(np.float64(0.2)), lambda: LeakyReLU(0.2)),
    (lambda: Gaussian(np.float64(1.5), np.int64(-1)), lambda: Gaussian(1.5, -1)),
    (lambda: Monomial(np.int64(3)), lambda: Monomial(3)),
    (lambda: RectifiedMonomial(np.int64(2)), lambda: RectifiedMonomial(2)),
    (lambda: Polynomial(np.array([0.5, 1.0, 0.25])), lambda: Polynomial([0.5, 1.0, 0.25])),
    (lambda: Polynomial([np.int64(1), np.float64(2.0)]), lambda: Polynomial([1, 2.0])),
    (lambda: L.Elementwise(torch.tanh, degree=np.int64(32)), lambda: L.Elementwise(torch.tanh, degree=32)),
    (lambda: L.LayerNorm(eps=np.float64(1e-6)), lambda: L.LayerNorm(eps=1e-6)),
])
def test_numpy_numbers_in_activations(make, plain):
    x = _x()

    def kernel(activation):
        return gpntk.NTKKernel(L.serial(L.Dense(1.5, 0.1), activation, L.Dense(1.0)))(x).to_dense()

    torch.testing.assert_close(kernel(make()), kernel(plain()), rtol=1e-7, atol=0)


def test_numpy_integers_in_finite_networks_and_monte_carlo():
    net = L.mlp(2, "relu")
    module = net.finite(np.int64(16), in_features=np.int64(3), out_features=np.int32(2),
                        generator=torch.Generator().manual_seed(0))
    reference = net.finite(16, in_features=3, out_features=2, generator=torch.Generator().manual_seed(0))
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)
    mean, _ = gpntk.monte_carlo_kernel(net, _x(), width=np.int64(8), n_samples=np.int64(2), out_features=np.int64(1))
    expected, _ = gpntk.monte_carlo_kernel(net, _x(), width=8, n_samples=2, out_features=1)
    seeded, _ = gpntk.monte_carlo_kernel(net, _x(), width=8, n_samples=2, seed=np.int64(3))
    torch.testing.assert_close(seeded, gpntk.monte_carlo_kernel(net, _x(), width=8, n_samples=2, seed=3)[0])
    torch.testing.assert_close(mean, expected, rtol=0, atol=0)
    from gpntk.core.finite import ChannelNorm, NTKLinear

    layer = NTKLinear(np.int64(3), np.int64(4), np.float64(1.0), np.float32(0.5))
    assert layer.weight.shape == (4, 3) and layer.bias_std == 0.5
    assert ChannelNorm(np.float64(1e-5)).eps == 1e-5


def test_numpy_integers_in_kernel_arguments():
    model = torch.nn.Linear(3, 2).double()
    x = _x()
    numpy_output = gpntk.EmpiricalNTKKernel(model, output=np.int64(1))(x).to_dense()
    torch.testing.assert_close(numpy_output, gpntk.EmpiricalNTKKernel(model, output=1)(x).to_dense())


def test_numpy_numbers_in_demo_problems():
    from gpntk.cli.demo import make_problem, make_sine_problem

    for make in (make_sine_problem, make_problem):
        plain = make(n_train=np.int64(10), seed=np.int64(2), noise=np.float64(0.5))
        reference = make(n_train=10, seed=2, noise=0.5)
        for a, b in zip(plain, reference):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_numpy_numbers_in_lanczos_options():
    from gpntk.posterior.lanczos import check_options

    check_options(np.float64(1e-6), np.int64(50), np.int32(5))
    with pytest.raises(ValueError, match="tolerance"):
        check_options("1e-6", 50, 5)
    with pytest.raises(ValueError, match="max_iterations"):
        check_options(1e-6, 50.0, 5)


# --- misread arguments are refused ----------------------------------------------------------
def test_polynomial_string_is_not_a_list_of_digits():
    with pytest.raises(ArchitectureError, match="sequence of numbers"):
        Polynomial("12")
    with pytest.raises(ArchitectureError, match="sequence of numbers"):
        Polynomial(b"12")
    with pytest.raises(ArchitectureError, match="sequence of numbers"):
        Polynomial({1.0, 2.0})
    with pytest.raises(ArchitectureError, match="sequence of numbers"):
        Polynomial(3.0)
    with pytest.raises(ArchitectureError, match=r"coef\[1\] must be a number"):
        Polynomial([1.0, "2"])
    with pytest.raises(ArchitectureError, match=r"coef\[0\] must be a number"):
        Polynomial([True])
    with pytest.raises(ArchitectureError, match=r"coef\[0\] must be a number"):
        Polynomial([1j])


@pytest.mark.parametrize("eps", [math.nan, -1e-5, 0.0, math.inf, "1e-5", True])
def test_layer_norm_eps_must_be_a_positive_number(eps):
    with pytest.raises(ArchitectureError, match="eps"):
        L.LayerNorm(eps=eps)


@pytest.mark.parametrize("name, make", [
    ("depth", lambda v: L.mlp(v, "relu")),
    ("weight_variance", lambda v: L.Dense(weight_variance=v)),
    ("bias_variance", lambda v: L.Dense(bias_variance=v)),
    ("degree", lambda v: Monomial(v)),
    ("a", lambda v: Erf(a=v)),
    ("negative_slope", lambda v: LeakyReLU(v)),
])
@pytest.mark.parametrize("value", [True, "2", 2 + 0j])
def test_bools_strings_complex_are_refused(name, make, value):
    with pytest.raises(ArchitectureError, match="must be"):
        make(value)


@pytest.mark.parametrize("value", [True, "8", 8.0, 8 + 0j])
def test_finite_width_must_be_an_integer(value):
    with pytest.raises(ValueError, match="width"):
        L.mlp(1, "relu").finite(value, in_features=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_refused_naming_the_dtype(dtype):
    net = L.mlp(2, "relu")
    x = 100 * _x(dtype=dtype)  # |x| ~ 100: the squared norm overflows float16
    for kernel in (gpntk.NTKKernel(net), gpntk.NNGPKernel(net)):
        with pytest.raises(TypeError, match=str(dtype)):
            kernel(x).to_dense()
        with pytest.raises(TypeError, match=str(dtype)):
            kernel(x, diag=True)
    with pytest.raises(TypeError, match=str(dtype)):
        gpntk.TrainedEnsemble(net, x, torch.zeros(x.shape[0], dtype=dtype))
    model = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match=str(dtype)):
        gpntk.EmpiricalNTKKernel(model)(x).to_dense()
    with pytest.raises(TypeError, match=str(dtype)):  # a half-precision network, float32 inputs
        gpntk.EmpiricalNTKKernel(model.to(dtype))(x.float()).to_dense()


def test_complex_inputs_are_refused():
    x = _x().to(torch.complex128)
    with pytest.raises(TypeError, match="floating-point"):
        gpntk.NTKKernel(L.mlp(1, "relu"))(x).to_dense()


# --- the empirical functions check their inputs like the kernels -----------------------------
@pytest.mark.parametrize("function", ["empirical_ntk", "empirical_nngp"])
def test_empirical_functions_refuse_bad_inputs(function):
    """Half precision, complex and non-finite inputs raise (they returned float16 or NaN kernels)."""
    net = L.mlp(2).finite(16, in_features=3)
    x = torch.randn(4, 3)
    call = getattr(gpntk, function)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=str(dtype)):
            call(net.to(dtype), x.to(dtype))
        with pytest.raises(TypeError, match="model has parameters of dtype"):
            call(net.to(dtype), x)
    with pytest.raises(TypeError, match="floating-point"):
        call(net.float(), x.to(torch.complex64))
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        call(net.float(), bad)
    with pytest.raises(ValueError, match="x2 contains"):
        call(net.float(), x, bad)


def test_monte_carlo_kernel_refuses_half_precision():
    with pytest.raises(TypeError, match="float16"):
        gpntk.monte_carlo_kernel(L.mlp(2), torch.randn(4, 3).half(), width=8, n_samples=2)
