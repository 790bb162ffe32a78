"""The KeOps backend (:mod:`gpntk.contrib.keops`): products and gradients against the dense backend.

Compiling a KeOps formula takes tens of seconds on a CPU, so the tests share a handful of
architectures, one input dimension and one number of right-hand sides (formulas depend on the
architecture's structure, ``d`` and the number of columns, not on hyperparameter values or batch
shapes); compiled formulas are cached in ``.cache/keops`` (ignored by git), so later runs are fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import gpytorch
import pytest
import torch

pykeops = pytest.importorskip("pykeops")
pytestmark = pytest.mark.slow  # cold KeOps compiles take minutes; the fast tier: pytest -m "not slow"

from linear_operator.operators import KernelLinearOperator  # noqa: E402
from pykeops.torch import LazyTensor  # noqa: E402

from gpntk import layers as L  # noqa: E402
from gpntk.contrib.keops import keops_covariance, keops_formula, keops_supported  # noqa: E402
from gpntk.core.hyperparameters import Hyperparameters  # noqa: E402
from gpntk.kernels import dense  # noqa: E402

DT = torch.float64
D = 5  # input dimension of every test (one compiled formula per architecture and mode)
C = 3  # right-hand sides (padded to 4 columns)
BUILD_FOLDER = Path(__file__).resolve().parents[2] / ".cache" / "keops"


def _set_build_folder(path: str) -> None:
    """``pykeops.set_build_folder(path)`` without recording ``path`` as the user's default (CPU)."""
    import keopscore

    if pykeops.config.pykeops_cuda.get_use_cuda():  # pragma: no cover - GPU machines
        pykeops.set_build_folder(path)
        return
    try:
        keopscore.set_build_folder(path, write_save_file=False)
    except TypeError:  # pragma: no cover - other keopscore versions
        pykeops.set_build_folder(path)
        return
    from pykeops.common.keops_io import keops_binder

    for binder in keops_binder.values():
        binder.reset(new_save_folder=pykeops.get_build_folder())


@pytest.fixture(scope="module", autouse=True)
def keops_build_folder():
    previous = pykeops.get_build_folder()
    BUILD_FOLDER.mkdir(parents=True, exist_ok=True)
    _set_build_folder(str(BUILD_FOLDER))
    yield
    _set_build_folder(previous)


def _mixed():
    """Every supported layer kind in one chain (one formula), with frozen and bias-free layers."""
    return L.serial(
        L.Dense(1.6, 0.1), L.LeakyReLU(0.2),
        L.Dense(1.3, trainable=False), L.Abs(),
        L.Dense(0.9, 0.05), L.Identity(), L.Erf(a=1.3, b=0.7, c=0.2),
        L.Dense(1.1, 0.2), L.RectifiedMonomial(1),
        L.Dense(0.8, 0.1), L.Sin(a=1.2, b=0.9, c=0.3),
        L.Dense(1.2, 0.1), L.Exp(a=0.9, b=0.4),
        L.Dense(0.7, 0.3), L.ABReLU(-0.4, 1.1),
        L.Dense(1.5),
    )


def _mixed_sign():
    """Sign and the step function (their derivative vanishes: the NTK restarts after them)."""
    return L.serial(
        L.Dense(1.4, 0.1), L.ReLU(), L.Dense(1.2, 0.2), L.Sign(), L.Dense(0.9, 0.1), L.Cos(a=1.1, b=0.8),
        L.Dense(1.3, 0.05), L.RectifiedMonomial(0), L.Dense(1.0, 0.1), L.Rbf(gamma=0.3), L.Dense(1.1, 0.2),
    )


ARCHITECTURES = {
    "relu-1": lambda: L.mlp(1, "relu", weight_variance=2.0, bias_variance=0.1),
    "relu-3": lambda: L.serial(
        L.Dense(1.7, 0.2), L.ReLU(), L.Dense(2.1, 0.05), L.ReLU(), L.Dense(1.4, 0.3), L.ReLU(), L.Dense(1.9, 0.1)
    ),
    "erf-1": lambda: L.mlp(1, "erf", weight_variance=2.5, bias_variance=0.3),
    "erf-3": lambda: L.serial(
        L.Dense(2.2, 0.3), L.Erf(), L.Dense(1.8, 0.1), L.Erf(a=1.2, b=0.8), L.Dense(2.6, 0.2), L.Erf(),
        L.Dense(1.5, 0.4),
    ),
    "mixed": _mixed,
}


def _points(n: int, seed: int, features: int = D) -> torch.Tensor:
    return torch.randn(n, features, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _dense(net, x1, x2, hyper, output):
    nngp, ntk = dense.evaluate(net, x1, x2, hyper, track_ntk=output == "ntk")
    return ntk if output == "ntk" else nngp


def _leaf_hyper(net, like, batch=None):
    hyper = Hyperparameters.collect(net, like=like)
    out = {}
    for i, (name, value) in enumerate(hyper.items()):
        value = value.detach()
        if batch is not None:  # different values in every batch entry
            scale = 1 + 0.15 * torch.arange(batch, dtype=DT).reshape(batch, 1, 1) * (-1) ** i
            value = value * scale
        out[name] = value.clone().requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------------------------
# which architectures have a formula


def test_supported_architectures():
    for build in (*ARCHITECTURES.values(), _mixed_sign, lambda: L.Dense(2.0, 0.1)):
        assert keops_supported(build()) is None
    assert keops_supported(L.mlp(2, "relu"), (7,)) is None


@pytest.mark.parametrize(
    "build, input_shape, names",
    [
        (
            lambda: L.serial(
                L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.GlobalAvgPool(), L.Dense(1.0)
            ),
            (2, 6),
            ["spatial"],
        ),
        (lambda: L.serial(L.Dense(2.0), L.Tanh(), L.Dense(1.0)), None, ["Tanh"]),
        (lambda: L.serial(L.Dense(2.0), L.GELU(), L.Dense(1.0)), None, ["GELU"]),
        (lambda: L.serial(L.Dense(2.0), L.RectifiedMonomial(2), L.Dense(1.0)), None, ["RectifiedMonomial", "degree"]),
        (lambda: L.serial(L.Dense(2.0), L.LayerNorm(), L.ReLU(), L.Dense(1.0)), None, ["LayerNorm"]),
        (
            lambda: L.serial(
                L.FanOut(2), L.parallel(L.Dense(1.0), L.Dense(2.0)), L.FanInSum(), L.ReLU(), L.Dense(1.0)
            ),
            None,
            ["FanOut"],
        ),
    ],
    ids=["conv", "tanh", "gelu", "monomial-2", "layernorm", "branches"],
)
def test_unsupported_architectures_say_why(build, input_shape, names):
    net = build()
    reason = keops_supported(net, input_shape)
    assert isinstance(reason, str)
    for name in names:
        assert name in reason
    if input_shape is None:
        x = _points(4, 0)
        with pytest.raises(ValueError, match=re.escape(reason)):
            keops_covariance(x, x, net=net, output="ntk", hyper=Hyperparameters.collect(net, like=x))


# ----------------------------------------------------------------------------------------------------
# products


@pytest.mark.parametrize("same", [False, True], ids=["K(X,Z)", "K(X,X)"])
@pytest.mark.parametrize("output", ["ntk", "nngp"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_matmul_equals_dense(name, output, same):
    net = ARCHITECTURES[name]()
    x1 = _points(90, 0)
    x2 = x1 if same else _points(70, 1)
    hyper = Hyperparameters.collect(net, like=x1)
    v = _points(x2.shape[0], 2, features=C)
    K = keops_covariance(x1, x2, net=net, output=output, hyper=hyper)
    assert isinstance(K, LazyTensor)
    assert tuple(K.shape) == (90, x2.shape[0])
    out = K @ v
    reference = _dense(net, x1, x2, hyper, output) @ v
    assert out.shape == reference.shape
    assert _relative(out, reference) < 1e-10


@pytest.mark.parametrize("output", ["ntk", "nngp"])
def test_sign_and_step_functions(output):
    net = _mixed_sign()
    x1, x2 = _points(60, 3), _points(50, 4)
    hyper = Hyperparameters.collect(net, like=x1)
    v = _points(50, 5, features=C)
    out = keops_covariance(x1, x2, net=net, output=output, hyper=hyper) @ v
    assert _relative(out, _dense(net, x1, x2, hyper, output) @ v) < 1e-10


def test_identical_points_are_exact():
    """Duplicated points give exactly the per-point diagonal (no arccos at 1 - eps, whose error is ~1e-8)."""
    net = ARCHITECTURES["relu-3"]()
    x = _points(40, 6)
    x2 = x.clone()  # same points, another tensor
    hyper = Hyperparameters.collect(net, like=x)
    eye = torch.eye(40, dtype=DT)
    # columns 0..3 of the identity read off the first four columns of K
    K = keops_covariance(x, x2, net=net, output="ntk", hyper=hyper)
    columns = K @ eye[:, :C]
    diagonal = dense.kernel_diagonal(x, x, net=net, output="ntk", hyper=hyper)
    assert _relative(torch.diagonal(columns[:C]), diagonal[:C]) < 1e-14


def test_transpose_and_vector_products():
    net = ARCHITECTURES["relu-3"]()
    x1, x2 = _points(50, 7), _points(40, 8)
    hyper = Hyperparameters.collect(net, like=x1)
    reference = _dense(net, x1, x2, hyper, "ntk")
    K = keops_covariance(x1, x2, net=net, output="ntk", hyper=hyper)
    u = _points(50, 9, features=C)
    assert _relative(K.t() @ u, reference.T @ u) < 1e-10
    # four columns share the formula of three (columns are padded to a power of two)
    w = _points(40, 10, features=4)
    assert _relative(K @ w, reference @ w) < 1e-10


# ----------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("same", [False, True], ids=["K(X,Z)", "K(X,X)"])
@pytest.mark.parametrize("name, output", [("relu-3", "ntk"), ("erf-3", "nngp"), ("mixed", "ntk")])
def test_gradients_equal_dense(name, output, same):
    net = ARCHITECTURES[name]()
    x1 = _points(60, 11).requires_grad_(True)
    x2 = x1 if same else _points(45, 12).requires_grad_(True)
    hyper = _leaf_hyper(net, x1)
    n2 = x2.shape[0]
    u, v = _points(60, 13, features=C), _points(n2, 14, features=C).requires_grad_(True)
    inputs = [x1, v, *hyper.values()] + ([] if same else [x2])

    out = keops_covariance(x1, x2, net=net, output=output, hyper=hyper) @ v
    grads = torch.autograd.grad((u * out).sum(), inputs)
    reference = _dense(net, x1, x2, hyper, output) @ v
    expected = torch.autograd.grad((u * reference).sum(), inputs)
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        assert _relative(got, want) < 1e-8


def test_batched_hyperparameters():
    """Hyperparameters of batch shape (2,) (a two-output BoTorch model), with and without batched inputs."""
    net = ARCHITECTURES["relu-3"]()
    x1 = _points(50, 15).requires_grad_(True)
    x2 = _points(40, 16)
    hyper = _leaf_hyper(net, x1, batch=2)
    v = _points(40, 17, features=C)
    u = _points(100, 18, features=C).reshape(2, 50, C)
    K = keops_covariance(x1, x2, net=net, output="ntk", hyper=hyper)
    assert tuple(K.shape) == (2, 50, 40)
    out = K @ v
    reference = _dense(net, x1, x2, hyper, "ntk") @ v
    assert out.shape == reference.shape == (2, 50, C)
    assert _relative(out, reference) < 1e-10
    inputs = [x1, *hyper.values()]
    grads = torch.autograd.grad((u * out).sum(), inputs)
    expected = torch.autograd.grad((u * reference).sum(), inputs)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert _relative(got, want) < 1e-8
    # batched inputs and right-hand sides broadcast against the hyperparameters
    xb = torch.stack([_points(50, 19), _points(50, 20)])
    vb = torch.stack([v, 2 * v])
    out = keops_covariance(xb, x2, net=net, output="ntk", hyper=hyper) @ vb
    assert _relative(out, _dense(net, xb, x2, hyper, "ntk") @ vb) < 1e-10


def _covar(x1, x2, *, net, output, backend, **hyper):
    if backend == "keops":
        return keops_covariance(x1, x2, net=net, output=output, hyper=hyper)
    return _dense(net, x1, x2, hyper, output)


@pytest.mark.parametrize("output", ["ntk"])
def test_marginal_likelihood_gradients_through_gpytorch(output):
    """An exact GP whose covariance is a KernelLinearOperator over the KeOps matrix, solved by CG.

    Both backends run the same CG and Lanczos iterations (same probe vectors); with a noise large
    enough for CG to converge fully, their log likelihoods and gradients agree to rounding.
    """
    net = ARCHITECTURES["relu-3"]()
    x = _points(120, 21)
    y = torch.sin(x.sum(-1))
    results = {}
    for backend in ("keops", "dense"):
        hyper = _leaf_hyper(net, x)
        noise = torch.tensor(30.0, dtype=DT)  # the kernel's eigenvalues span [0.2, 300]
        K = KernelLinearOperator(x, x, covar_func=_covar, net=net, output=output, backend=backend, **hyper)
        covariance = K.add_diagonal(noise.expand(120))
        distribution = gpytorch.distributions.MultivariateNormal(torch.zeros(120, dtype=DT), covariance)
        with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.num_trace_samples(C), \
                gpytorch.settings.cg_tolerance(1e-6), gpytorch.settings.max_cg_iterations(200), \
                gpytorch.settings.max_lanczos_quadrature_iterations(120):
            torch.manual_seed(0)
            value = distribution.log_prob(y)
            grads = torch.autograd.grad(value, list(hyper.values()))
        results[backend] = (value, grads)
    value, grads = results["keops"]
    value_dense, grads_dense = results["dense"]
    assert abs((value - value_dense) / value_dense) < 1e-8
    for got, want in zip(grads, grads_dense):
        assert _relative(got, want) < 1e-8


# ----------------------------------------------------------------------------------------------------
# formula size


def _operations(text: str) -> int:
    return text.count("(")


@pytest.mark.parametrize("mode", ["matmul", "grad_i", "grad_j"])
@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_formula_grows_linearly_with_depth(activation, mode):
    """Each layer adds the same number of operations to the formula (no re-expansion of shared terms)."""
    sizes = []
    for depth in range(1, 11):
        net = L.mlp(depth, activation, shared=False)
        keys = list(Hyperparameters.collect(net))
        sizes.append(_operations(keops_formula(net, keys, output="ntk", d=D, mode=mode, c=4)))
    increments = [b - a for a, b in zip(sizes, sizes[1:])]
    # constant per layer, up to the parameters and features vectors growing with depth (their indices)
    assert max(increments) <= 1.1 * min(increments), sizes
    assert sizes[-1] < 12 * sizes[0], sizes


def test_compiled_formula_grows_linearly():
    """keopscore's own expression (after Factorize): one arccos per layer, node count linear in depth."""
    import keopscore.formulas.GetReduction as reduction_module
    from keopscore.formulas.variables import Var

    from gpntk.contrib.keops.formula import _build, _plan

    counts, arccos = [], []
    for depth in range(1, 8):
        net = L.mlp(depth, "relu")
        structure = _plan(net, list(Hyperparameters.collect(net)), "ntk").structure
        formula = _build(structure, "matmul", D, 4)[1]
        aliases = {name: Var(position, dim, cat) for position, (name, cat, dim) in enumerate(formula.aliases)}
        formula = eval(formula.text, dict(vars(reduction_module)), aliases)  # as keopscore's parser does
        stack, nodes, acos = [formula], 0, 0
        while stack:
            node = stack.pop()
            nodes += 1
            acos += type(node).__name__ == "Acos"
            stack.extend(node.children)
        counts.append(nodes)
        arccos.append(acos)
    assert arccos == list(range(1, 8))
    increments = [b - a for a, b in zip(counts, counts[1:])]
    # the same number of nodes per layer (the first layer differs a little: no NTK before it)
    assert len(set(increments[1:])) == 1 and abs(increments[0] - increments[1]) <= 0.1 * increments[1], counts


@pytest.mark.parametrize("output", ["ntk", "nngp"])
def test_overflow_raises(output):
    """A product whose kernel overflows float64 (inputs of scale 1e160) raises instead of returning NaN."""
    import gpntk

    net = ARCHITECTURES["relu-1"]()
    x = _points(90, 0) * 1e160
    kernel = (gpntk.NTKKernel if output == "ntk" else gpntk.NNGPKernel)(net, backend="keops")
    with pytest.raises(FloatingPointError, match="overflowed"):
        kernel(x) @ _points(90, 2, features=C)


# ----------------------------------------------------------------------------------------------------
# issue 16: Gabor and SigmoidLike (an Erf) through their pair formulas; the other new activations say why not


@pytest.mark.parametrize("output", ["nngp", "ntk"])
def test_gabor_and_sigmoid_like(output):
    net = L.serial(L.Dense(1.6, 0.1), L.Gabor(), L.Dense(1.3, 0.2), L.SigmoidLike(), L.Dense(1.5, 0.1))
    assert keops_supported(net) is None
    x1, x2 = _points(7, 0), _points(6, 1)
    hyper = _leaf_hyper(net, x1)
    v = _points(6, 2, features=C)
    out = keops_covariance(x1, x2, net=net, output=output, hyper=hyper) @ v
    expected = _dense(net, x1, x2, hyper, output) @ v
    assert _relative(out, expected) < 1e-12
    grads = torch.autograd.grad(out.sum(), list(hyper.values()))
    expected_grads = torch.autograd.grad(expected.sum(), list(hyper.values()))
    for got, want in zip(grads, expected_grads):
        assert _relative(got, want) < 1e-10
