"""The activations of issue 16 beyond their expectation checks (``NEW_SPECS`` in ``test_activations.py``).

* ``ExpNormalized``: the kernel map against its definition (pairs, diagonal, zero variances,
  clipping), gradcheck, float32, and ``net.finite`` refusing it;
* ``Hermite``: the exact expectation at any variance, equal to Neural Tangents' :math:`q_{12}^d`
  at unit variance only;
* ``GELU(approximate=True)``: the quadrature converges to the oracle's 300-point values, warns at
  large variances, naming the layer;
* ``Elementwise(fn, nngp_fn=..., d_nngp_fn=...)``: Price's theorem by autograd, argument errors,
  the returned shape checked, networks equal to the built-in closed form;
* every new activation: networks in both backends with batched hyperparameters, ``diag=True``
  against the full matrix, gradcheck in inputs and hyperparameters, float32, finite modules,
  names for ``mlp``, and the KeOps backend's reason for not evaluating them.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _reference import build_net, load_case
from torch.autograd import gradcheck, gradgradcheck

import gpntk
from gpntk import layers as L
from gpntk.errors import ApproximationWarning, ArchitectureError

DT = torch.float64
KERNELS = {"ntk": gpntk.NTKKernel, "nngp": gpntk.NNGPKernel}


def _erf_nngp(cov12, var1, var2):
    return 2 / math.pi * torch.asin(2 * cov12 / torch.sqrt((1 + 2 * var1) * (1 + 2 * var2)))


def _erf_d_nngp(cov12, var1, var2):
    return 4 / math.pi / torch.sqrt((1 + 2 * var1) * (1 + 2 * var2) - 4 * cov12**2)


#: one of each new activation (with parameters where they have any)
NEW_ACTIVATIONS = {
    "ExpNormalized": lambda: L.ExpNormalized(gamma=0.7, shift=-0.5),
    "ExpNormalized(clip)": lambda: L.ExpNormalized(gamma=1.3, do_clip=True),
    "Hermite(3)": lambda: L.Hermite(3),
    "Gabor": L.Gabor,
    "SigmoidLike": L.SigmoidLike,
    "GELU(approximate=True)": lambda: L.GELU(approximate=True, degree=32),
    "Elementwise(nngp_fn)": lambda: L.Elementwise(torch.erf, nngp_fn=_erf_nngp),
}
pytestmark = [
    pytest.mark.usefixtures("float64_default"),  # hyperparameters in float64 (gradcheck)
    # GELU(approximate=True, degree=32) below is a cheap stand-in: its accuracy is not the point
    pytest.mark.filterwarnings("ignore:GELU.approximate=True, degree=32.:gpntk.errors.ApproximationWarning"),
]

FINITE = [name for name in NEW_ACTIVATIONS if not name.startswith("ExpNormalized")]


def _net(name: str, depth: int = 2) -> L.Serial:
    layers = []
    for i in range(depth):
        layers += [L.Dense(1.2 + 0.3 * i, 0.1 + 0.05 * i), NEW_ACTIVATIONS[name]()]
    return L.serial(*layers, L.Dense(1.1, 0.05))


def _points(n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --- ExpNormalized ------------------------------------------------------------------------------


def _exp_normalized(q11, q12, q22, gamma, shift, clip):
    rho = q12 / np.sqrt(q11 * q22)
    if clip:
        rho = np.clip(rho, -1, 1)
    factor = np.exp(gamma * (rho + shift))
    return np.sqrt(q11 * q22) * factor, gamma * factor


@pytest.mark.parametrize("clip", [False, True])
def test_exp_normalized_is_its_definition(clip):
    act = L.ExpNormalized(gamma=0.8, shift=-0.3, do_clip=clip)
    q11 = torch.tensor([[0.5], [2.0], [1.0]], dtype=DT)
    q22 = torch.tensor([[1.5, 0.2]], dtype=DT)
    rho = torch.tensor([[0.3, -0.9], [1.0, 0.0], [-1.0, 0.5]], dtype=DT)
    q12 = rho * (q11 * q22).sqrt()
    k, kdot = act.dual(q11, q12, q22, True)
    want_k, want_kdot = _exp_normalized(q11.numpy(), q12.numpy(), q22.numpy(), 0.8, -0.3, clip)
    np.testing.assert_allclose(k.numpy(), want_k, rtol=1e-14)
    np.testing.assert_allclose(kdot.numpy(), want_kdot, rtol=1e-14)
    # the diagonal: rho = 1, q <- q e^{gamma (1 + shift)}
    q = torch.tensor([0.0, 0.3, 4.0], dtype=DT)
    k, kdot = act.dual_diag(q, True)
    torch.testing.assert_close(k, q * math.exp(0.8 * 0.7), rtol=1e-15, atol=0)
    torch.testing.assert_close(kdot, torch.full_like(q, 0.8 * math.exp(0.8 * 0.7)), rtol=1e-15, atol=0)
    # Price's theorem holds for this map too: kdot = d k / d q12
    leaf = q12.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(act.dual(q11, leaf, q22, False)[0].sum(), leaf)
    torch.testing.assert_close(grad, act.dual(q11, q12, q22, True)[1], rtol=1e-13, atol=0)


def test_exp_normalized_clipping_and_zero_variance():
    # a correlation past one (an input that is no covariance): clipped only with do_clip
    q11, q22, q12 = (torch.tensor([[value]], dtype=DT) for value in (1.0, 1.0, 1.2))
    raw, _ = L.ExpNormalized(gamma=1.0).dual(q11, q12, q22, True)
    clipped, _ = L.ExpNormalized(gamma=1.0, do_clip=True).dual(q11, q12, q22, True)
    assert raw.item() == pytest.approx(math.exp(0.2), rel=1e-15)
    assert clipped.item() == pytest.approx(1.0, rel=1e-15)
    # a point of zero variance has covariance 0 with every point, and finite derivatives
    q11 = torch.tensor([[0.0], [1.0]], dtype=DT, requires_grad=True)
    q22 = torch.tensor([[2.0]], dtype=DT)
    q12 = torch.tensor([[0.0], [0.5]], dtype=DT)
    k, kdot = L.ExpNormalized().dual(q11, q12, q22, True)
    assert k[0, 0].item() == 0 and torch.isfinite(kdot).all()
    (grad,) = torch.autograd.grad(k.sum(), q11)
    assert torch.isfinite(grad).all()


def test_exp_normalized_has_no_finite_network():
    net = L.serial(L.Dense(1.0, 0.1), L.ExpNormalized(), L.Dense(1.0))
    with pytest.raises(ArchitectureError, match=r"ExpNormalized\(gamma=1.0, shift=-1.0, do_clip=False\).*net.finite"):
        net.finite(16, in_features=3)
    with pytest.raises(ArchitectureError, match="defined on the kernel"):
        L.ExpNormalized().fn(torch.zeros(2))
    # ... and a Monte Carlo estimate says the same rather than a wrong number
    with pytest.raises(ArchitectureError, match="ExpNormalized"):
        gpntk.monte_carlo_kernel(net, _points(3), width=8, n_samples=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, "ExpNormalized gamma must be non-negative"),
        ({"gamma": "1"}, "ExpNormalized gamma must be a number"),
        ({"shift": math.nan}, "ExpNormalized shift must be finite"),
        ({"do_clip": 1}, "ExpNormalized do_clip must be True or False"),
    ],
)
def test_exp_normalized_arguments(kwargs, message):
    with pytest.raises(ArchitectureError, match=message):
        L.ExpNormalized(**kwargs)


# --- Hermite ------------------------------------------------------------------------------------


def test_hermite_is_exact_at_every_variance():
    """q12^d (Neural Tangents' kernel) at unit variances; the exact expectation elsewhere (Isserlis)."""
    q12 = torch.tensor([[0.3, -0.7]], dtype=DT)
    ones = torch.ones(1, 1, dtype=DT)
    for d in range(6):
        k, kdot = L.Hermite(d).dual(ones, q12, ones.T.expand(1, 2), True)
        torch.testing.assert_close(k, q12**d, rtol=1e-15, atol=1e-16)
        torch.testing.assert_close(kdot, d * q12 ** max(d - 1, 0) if d else torch.zeros_like(q12), rtol=1e-15, atol=0)
    # He_3 / sqrt(6) = (x^3 - 3x) / sqrt(6) as a Polynomial: Isserlis' theorem at other variances
    q11, q22 = torch.tensor([[0.4], [2.5]], dtype=DT), torch.tensor([[1.7, 0.2]], dtype=DT)
    q12 = torch.tensor([[0.5, -0.1], [1.2, 0.3]], dtype=DT)
    expected = L.Polynomial([0.0, -3 / math.sqrt(6), 0.0, 1 / math.sqrt(6)]).dual(q11, q12, q22, True)
    actual = L.Hermite(3).dual(q11, q12, q22, True)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(actual[0], q12**3)  # not the unit-variance shortcut


@pytest.mark.parametrize("degree", [-1, 2.0, "3", True])
def test_hermite_degree_argument(degree):
    with pytest.raises(ArchitectureError, match="Hermite degree must be a non-negative integer"):
        L.Hermite(degree)


# --- GELU(approximate=True) ---------------------------------------------------------------------


def test_gelu_tanh_converges_to_the_oracle():
    """With 300 points, as the oracle, gpntk's quadrature is its 300-point value to rounding."""
    case = load_case("a2_act_gelu_tanh")
    net = build_net(case.layers, lambda name, kwargs: L.GELU(approximate=True, degree=300) if name == "GELU" else None)
    x1, x2 = torch.tensor(case["x1"]), torch.tensor(case["x2"])
    with torch.no_grad():
        for kind, kernel in KERNELS.items():
            ours = kernel(net)(x1, x2).to_dense().numpy()
            err = np.abs(ours - case[f"{kind}_12"]).max() / np.abs(case[f"{kind}_12"]).max()
            assert err < 1e-12, (kind, err)


def test_gelu_tanh_warns_at_large_variances_and_arguments():
    act = L.GELU(approximate=True)
    assert repr(act) == "GELU(approximate=True)" and repr(L.GELU(approximate=True, degree=64)).endswith("degree=64)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        act.dual_diag(torch.tensor([1.0, 3.0], dtype=DT), True)  # converged: no warning
    with pytest.warns(ApproximationWarning, match=r"GELU\(approximate=True\).*Gauss–Hermite"):
        act.dual_diag(torch.tensor([20.0], dtype=DT), True)
    with pytest.raises(ArchitectureError, match="GELU approximate must be True or False"):
        L.GELU(approximate="tanh")
    with pytest.raises(ArchitectureError, match="exact GELU.*takes no degree"):
        L.GELU(degree=64)
    with pytest.raises(ArchitectureError, match="degree must be an integer >= 2"):
        L.GELU(approximate=True, degree=1)
    # the exact GELU is unchanged
    x = torch.linspace(-3, 3, 7, dtype=DT)
    torch.testing.assert_close(L.GELU().fn(x), torch.nn.functional.gelu(x))
    torch.testing.assert_close(act.fn(x), torch.nn.functional.gelu(x, approximate="tanh"), rtol=1e-14, atol=0)


# --- Elementwise with a closed-form dual --------------------------------------------------------


def test_elementwise_closed_form_equals_the_builtin_one():
    x1, x2 = _points(5), _points(4, seed=1)
    builtin = L.serial(L.Dense(1.5, 0.1), L.Erf(), L.Dense(1.2, 0.2), L.Erf(), L.Dense(1.0))
    for make in (
        lambda: L.Elementwise(torch.erf, nngp_fn=_erf_nngp),
        lambda: L.Elementwise(torch.erf, nngp_fn=_erf_nngp, d_nngp_fn=_erf_d_nngp),
    ):
        user = L.serial(L.Dense(1.5, 0.1), make(), L.Dense(1.2, 0.2), make(), L.Dense(1.0))
        for kernel in KERNELS.values():
            ours, theirs = kernel(user), kernel(builtin)
            torch.testing.assert_close(ours(x1, x2).to_dense(), theirs(x1, x2).to_dense(), rtol=1e-12, atol=0)
            torch.testing.assert_close(ours(x1, diag=True), theirs(x1, diag=True), rtol=1e-12, atol=0)
    assert "nngp_fn=_erf_nngp" in repr(L.Elementwise(torch.erf, nngp_fn=_erf_nngp))


def test_elementwise_closed_form_second_derivatives():
    """The autograd derivative of nngp_fn (forward mode) is itself differentiable (NTK gradients)."""
    act = L.Elementwise(torch.erf, nngp_fn=_erf_nngp)
    q11 = torch.tensor([[0.5], [1.3]], dtype=DT, requires_grad=True)
    q22 = torch.tensor([[0.9, 2.0]], dtype=DT, requires_grad=True)
    q12 = torch.tensor([[0.2, -0.4], [0.6, 1.1]], dtype=DT, requires_grad=True)
    assert gradcheck(lambda a, b, c: act.dual(a, b, c, True), (q11, q12, q22))
    assert gradgradcheck(lambda a, b, c: act.dual(a, b, c, True)[1], (q11, q12, q22))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nngp_fn": 3}, "nngp_fn must be callable"),
        ({"nngp_fn": _erf_nngp, "d_nngp_fn": "x"}, "d_nngp_fn must be callable"),
        ({"d_nngp_fn": _erf_d_nngp}, "d_nngp_fn needs nngp_fn"),
        ({"nngp_fn": _erf_nngp, "derivative": torch.cos}, "derivative is for the quadrature"),
        ({"nngp_fn": _erf_nngp, "degree": 200}, "degree is the quadrature's"),
    ],
)
def test_elementwise_closed_form_arguments(kwargs, message):
    with pytest.raises(ArchitectureError, match=message):
        L.Elementwise(torch.erf, **kwargs)


def test_elementwise_closed_form_checks_the_returned_shape():
    act = L.Elementwise(torch.erf, nngp_fn=lambda c, v1, v2: c.sum())
    q = torch.ones(2, 1, dtype=DT)
    with pytest.raises(ValueError, match=r"nngp_fn must return a tensor shaped as its .* \(2, 3\), got shape \(\)"):
        act.dual(q, torch.zeros(2, 3, dtype=DT), torch.ones(1, 3, dtype=DT), False)
    act = L.Elementwise(torch.erf, nngp_fn=_erf_nngp, d_nngp_fn=lambda c, v1, v2: 1.0)
    with pytest.raises(ValueError, match="d_nngp_fn must return a tensor.*got float"):
        act.dual_diag(torch.ones(3, dtype=DT), True)


# --- every new activation in networks ------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_ACTIVATIONS)
def test_backends_batches_and_diag(name):
    """Dense and blockwise backends agree with batched hyperparameters; ``diag=True`` is the diagonal."""
    x1, x2 = _points(6), _points(5, seed=1)
    for kind, kernel_class in KERNELS.items():
        kernel = kernel_class(_net(name), batch_shape=torch.Size([2]), backend="dense")
        kernel.net.layers[0].weight_variance = torch.tensor([[[1.0]], [[2.5]]], dtype=DT)
        dense = kernel(x1, x2).to_dense()
        assert dense.shape == (2, 6, 5) and torch.isfinite(dense).all()
        blockwise = kernel_class(kernel.net, batch_shape=torch.Size([2]), backend="blockwise", block_elements=8)
        torch.testing.assert_close(blockwise(x1, x2).to_dense(), dense, rtol=1e-13, atol=0)
        square = kernel(x1).to_dense()
        torch.testing.assert_close(kernel(x1, diag=True), torch.diagonal(square, dim1=-2, dim2=-1), rtol=1e-12, atol=0)
        # the two batches are two hyperparameter values, each the unbatched kernel
        single = kernel_class(_net(name))
        single.net.layers[0].weight_variance = 2.5
        torch.testing.assert_close(single(x1, x2).to_dense(), dense[1], rtol=1e-13, atol=0, msg=kind)


@pytest.mark.parametrize("name", NEW_ACTIVATIONS)
def test_gradcheck_inputs_and_hyperparameters(name):
    kernel = gpntk.NTKKernel(_net(name))
    x1 = _points(3).requires_grad_(True)
    x2 = _points(2, seed=1).requires_grad_(True)
    assert gradcheck(lambda a, b: kernel(a, b).to_dense(), (x1, x2))
    assert gradcheck(lambda a: kernel(a, diag=True), (x1,))
    names, raws = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in kernel.named_parameters()])

    def with_raw(*values):
        return torch.func.functional_call(kernel, dict(zip(names, values)), (x1.detach(),)).to_dense()

    assert gradcheck(with_raw, raws)


@pytest.mark.parametrize("name", NEW_ACTIVATIONS)
def test_float32(name):
    x = _points(5)
    for kernel_class in KERNELS.values():
        k64 = kernel_class(_net(name))(x).to_dense()
        k32 = kernel_class(_net(name)).float()(x.float()).to_dense()
        assert k32.dtype == torch.float32 and torch.isfinite(k32).all()
        assert (k32.double() - k64).abs().max() <= 1e-4 * k64.abs().max()


@pytest.mark.parametrize("name", FINITE)
def test_finite_network_runs_the_activation(name):
    net = _net(name, depth=1)
    model = net.finite(32, in_features=3, generator=torch.Generator().manual_seed(0)).double()
    act = NEW_ACTIVATIONS[name]()
    hidden = model(_points(4))
    assert hidden.shape == (4, 1) and torch.isfinite(hidden).all()
    activation_modules = [m for m in model.modules() if type(m).__name__ == "ElementwiseActivation"]
    assert len(activation_modules) == 1
    x = torch.linspace(-3, 3, 13, dtype=DT)
    torch.testing.assert_close(activation_modules[0](x), act.fn(x))


def test_names_for_mlp():
    from gpntk.activations import ACTIVATION_NAMES, activation_from_name

    for name, cls in [("gabor", L.Gabor), ("sigmoid_like", L.SigmoidLike), ("SigmoidLike", L.SigmoidLike),
                      ("expnormalized", L.ExpNormalized)]:
        assert type(activation_from_name(name)) is cls
    assert {"gabor", "sigmoidlike", "hermite", "expnormalized"} <= set(ACTIVATION_NAMES)
    assert repr(L.mlp(1, "hermite", degree=2).layers[1]) == "Hermite(degree=2)"
    assert repr(L.mlp(1, "gelu", approximate=True).layers[1]) == "GELU(approximate=True)"
    with pytest.raises(ArchitectureError, match="hermite"):
        L.mlp(1, "hermite")  # no degree


def test_placement_is_checked():
    with pytest.raises(ArchitectureError, match="Gabor needs Gaussian pre-activations"):
        gpntk.NTKKernel(L.serial(L.Dense(1.0), L.ReLU(), L.Gabor(), L.Dense(1.0)))(_points(2))


@pytest.mark.parametrize("name", NEW_ACTIVATIONS)
def test_keops_backend_says_why_not(name):
    """Gabor and SigmoidLike have KeOps formulas (tests/contrib/test_keops.py); the others say why not."""
    pytest.importorskip("pykeops")
    from gpntk.contrib.keops import keops_supported

    reason = keops_supported(_net(name))
    if name in ("Gabor", "SigmoidLike"):
        assert reason is None
    else:
        assert reason is not None and "has no formula for" in reason and name.split("(")[0] in reason


@pytest.mark.parametrize("name", FINITE)
def test_structured_empirical_ntk_equals_the_jacobian_one(name):
    """The finite modules are elementwise, so the structured empirical NTK applies and is exact."""
    model = _net(name).finite(16, in_features=3, out_features=2, generator=torch.Generator().manual_seed(1)).double()
    x1, x2 = _points(4), _points(3, seed=1)
    structured = gpntk.empirical_ntk(model, x1, x2, method="structured")
    jacobian = gpntk.empirical_ntk(model, x1, x2, method="jacobian")
    torch.testing.assert_close(structured, jacobian, rtol=1e-10, atol=1e-12)


def _tanh_gelu_kernel(degree, weight_variance, x):
    net = L.serial(
        L.Dense(weight_variance, 0.1), L.GELU(approximate=True, degree=degree),
        L.Dense(weight_variance, 0.1), L.GELU(approximate=True, degree=degree), L.Dense(1.0),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = gpntk.NTKKernel(net)(x).to_dense()
    return kernel, [w for w in caught if issubclass(w.category, ApproximationWarning)]


@pytest.mark.parametrize(("scale", "weight_variance"), [(0.5, 1.0), (2.0, 4.0)])
def test_gelu_tanh_warns_exactly_when_inaccurate(scale, weight_variance):
    """The default 128-point rule against 300 points: silent where it is accurate, warns where not."""
    x = scale * _points(6)
    kernel, caught = _tanh_gelu_kernel(None, weight_variance, x)
    truth, _ = _tanh_gelu_kernel(300, weight_variance, x)
    error = ((kernel - truth).abs().max() / truth.abs().max()).item()
    if scale < 1:
        assert error < 1e-9 and not caught, error  # measured 4e-16
    else:
        assert error > 1e-7 and caught, error  # measured 3e-2 (first-layer variances up to 38)
        assert "GELU(approximate=True)" in str(caught[0].message)


def test_closed_forms_never_warn():
    x = 3.0 * _points(6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximationWarning)
        for name in ("ExpNormalized", "Hermite(3)", "Gabor", "SigmoidLike", "Elementwise(nngp_fn)"):
            gpntk.NTKKernel(_net(name))(x).to_dense()
