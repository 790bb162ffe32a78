"""Fused (``torch.compile``) kernel evaluation: same numbers as eager, the policy, and the fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk import settings
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels import blocked, dense
from gpntk.kernels import fusion as fusion_module
from gpntk.kernels.dense import nngp_and_ntk
from gpntk.kernels.fusion import FusionPolicy

pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.slow]


@pytest.fixture
def traced_only(monkeypatch):
    """Trace with dynamo and AOTAutograd but skip C++ code generation (seconds instead of minutes)."""
    monkeypatch.setattr(fusion_module, "COMPILE_BACKEND", "aot_eager")


def _kernels(net, input_shape=None):
    return [cls(net, input_shape=input_shape) for cls in (gpntk.NNGPKernel, gpntk.NTKKernel)]


def _values(kernels, x1, x2=None):
    return [kernel(x1, x2).to_dense() for kernel in kernels]


def _compiled(kernels):
    return [kernel.fusion.compiled and not kernel.fusion.failed for kernel in kernels]


def _both(net, x1, x2=None, input_shape=None):
    return _values(_kernels(net, input_shape), x1, x2)


def test_inductor_compiled_kernels_equal_eager():
    """The real backend (C++ code generation), once, on a small network without gradients."""
    net = L.mlp(1, "relu", 2.0, 0.1)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    kernels = _kernels(net)
    with torch.no_grad():
        with settings.fusion(False):
            eager = _values(kernels, x)
        assert _compiled(kernels) == [False, False]
        with settings.fusion(True):
            fused = _values(kernels, x)
    assert _compiled(kernels) == [True, True]
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_traced_kernels_and_gradients_equal_eager(traced_only):
    net = L.mlp(2, "relu", 2.0, 0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, requires_grad=True)
    y = torch.randn(30, 5, generator=g)
    kernels = _kernels(net)
    with settings.fusion(False):
        eager = _values(kernels, x, y)
        (eager_grad,) = torch.autograd.grad(eager[1].square().sum(), x)
    with settings.fusion(True):
        fused = _values(kernels, x, y)
        (fused_grad,) = torch.autograd.grad(fused[1].square().sum(), x)
    assert _compiled(kernels) == [True, True]
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager_grad, fused_grad, rtol=1e-10, atol=1e-10)


def test_spatial_architectures_run_eagerly():
    net = L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2), L.GlobalAvgPool(), L.Dense(2.0)
    )
    x = torch.randn(6, 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    kernels = _kernels(net, input_shape=(2, 4, 4))
    with settings.fusion(True):
        _values(kernels, x)
    assert _compiled(kernels) == [False, False]


def test_auto_policy_compiles_only_repeated_large_evaluations_without_gradients():
    big, after = settings.FUSION_MIN_ELEMENTS, settings.FUSION_AFTER_CALLS
    with settings.fusion("auto"):
        assert settings.fusion.enabled_for(big, needs_grad=False, previous_calls=after)
        assert not settings.fusion.enabled_for(big, needs_grad=False, previous_calls=after - 1)
        assert not settings.fusion.enabled_for(big - 1, needs_grad=False, previous_calls=after)
        assert not settings.fusion.enabled_for(10 * big, needs_grad=True, previous_calls=after)
        # in a fit, evaluations with or without gradients compile from the first, from a lower size on
        fit = settings.FUSION_MIN_ELEMENTS_FIT
        assert fit < big
        for needs_grad in (True, False):
            assert settings.fusion.enabled_for(fit, needs_grad=needs_grad, previous_calls=0, training=True)
            assert not settings.fusion.enabled_for(fit - 1, needs_grad=needs_grad, previous_calls=after, training=True)
    with settings.fusion(True):
        assert settings.fusion.enabled_for(1, needs_grad=True)
    with settings.fusion(False):
        assert not settings.fusion.enabled_for(10 * big, needs_grad=False)


def test_auto_compiles_from_the_third_large_evaluation_of_a_kernel(traced_only, monkeypatch):
    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS", 100)
    net, other = L.mlp(1, "relu"), L.mlp(1, "erf")
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    kernels, others = _kernels(net), _kernels(other)
    with torch.no_grad(), settings.fusion("auto"):
        for _ in range(settings.FUSION_AFTER_CALLS):
            _values(kernels, x)  # one NNGP and one NTK evaluation each time: each kernel counts its own
        assert _compiled(kernels) == [False, False]
        _values(others, x)  # other kernels have their own counts
        assert _compiled(others) == [False, False]
        _both(net, x)  # so do new kernels on the same network: a one-off evaluation never compiles
        fused = _values(kernels, x)
        assert _compiled(kernels) == [True, True]
        assert _compiled(others) == [False, False]
    with settings.fusion(False):
        for a, b in zip(_both(net, x), fused):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_functional_evaluations_count_through_a_shared_policy(traced_only, monkeypatch):
    """``nngp_and_ntk(..., fusion=policy)``: the caller owns the counts (None: a one-off evaluation)."""
    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS", 100)
    net = L.mlp(1, "relu")
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(5))
    policy = FusionPolicy()
    with torch.no_grad(), settings.fusion("auto"):
        for _ in range(settings.FUSION_AFTER_CALLS + 2):
            nngp_and_ntk(net, x)  # a fresh policy each time: never compiles
        for _ in range(settings.FUSION_AFTER_CALLS):
            eager = nngp_and_ntk(net, x, fusion=policy)
        assert not policy.compiled
        fused = nngp_and_ntk(net, x, fusion=policy)
        assert policy.compiled and not policy.failed
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_policies_are_not_shared_by_copies_and_pickles():
    import copy
    import pickle

    kernel = gpntk.NTKKernel(L.mlp(1))
    kernel.fusion.failed = True
    for clone in (copy.deepcopy(kernel), pickle.loads(pickle.dumps(kernel))):
        assert clone.fusion is not kernel.fusion and not clone.fusion.failed
        assert clone.fusion.backend == kernel.fusion.backend


def test_small_evaluations_do_not_compile():
    kernels = _kernels(L.mlp(1))
    with settings.fusion("auto"):
        _values(kernels, torch.randn(10, 3))
    assert _compiled(kernels) == [False, False]


def test_fusion_mode_is_checked_and_restored():
    before = settings.fusion.current()
    with pytest.raises(ValueError, match="fusion mode must be 'auto', True or False, got 'yes'"):
        settings.fusion("yes")
    with pytest.raises(ValueError, match="got 1"):
        settings.fusion(1)
    with settings.fusion(False):
        assert settings.fusion.current() is False
    assert settings.fusion.current() == before


def test_compiler_failure_warns_once_per_kernel_and_falls_back(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = L.mlp(1, "erf")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    expected = _both(net, x)
    kernels = _kernels(net)
    with settings.fusion(True):
        with pytest.warns(gpntk.NumericalWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eagerly"):
            first = _values(kernels, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = _values(kernels, x)  # no second warning: compilation is not retried
    assert [kernel.fusion.failed for kernel in kernels] == [True, True]
    for a, b, c in zip(expected, first, second):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_a_trained_ensemble_compiles_its_own_repeated_large_evaluations(traced_only, monkeypatch):
    """The ensemble owns a policy: its repeated large kernel evaluations compile, with the same values."""
    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS", 100)
    g = torch.Generator().manual_seed(6)
    net = L.mlp(1, "relu", 2.0, 0.1)
    x, y = torch.randn(15, 3, generator=g), torch.randn(15, generator=g)
    tests = [torch.randn(12, 3, generator=g) for _ in range(3)]
    post = gpntk.TrainedEnsemble(net, x, y, learning_rate=0.5)
    policy = post._test_kernels.snapshot.fusion
    with torch.no_grad(), settings.fusion("auto"):
        for test_x in tests:
            fused = post.moments(test_x, t=10.0, regime="nngp")
    assert policy.compiled and not policy.failed
    with settings.fusion(False):
        reference = gpntk.TrainedEnsemble(net, x, y, learning_rate=0.5).moments(tests[-1], t=10.0, regime="nngp")
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_fit_compiles_up_front_and_nothing_else_with_gradients_does(traced_only, monkeypatch):
    """Under auto, a marginal-likelihood fit compiles in its first step (also the conjugate-gradient products of a
    matrix-free kernel, which run without gradients but belong to the step's graph), never in the middle; a kernel
    in eval mode never compiles its gradient evaluations (a one-off gradient, an acquisition function)."""
    import gpytorch

    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS", 100)
    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS_FIT", 100)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(60, 3, generator=g)
    y = torch.sin(3 * x[:, 0])
    for backend in ("blockwise", "dense"):
        kernel = gpntk.NTKKernel(L.mlp(2, "relu"), backend=backend)

        class GP(gpytorch.models.ExactGP):
            def forward(self, z):
                return gpytorch.distributions.MultivariateNormal(torch.zeros_like(z[:, 0]), kernel(z))

        model = GP(x, y, gpytorch.likelihoods.GaussianLikelihood())
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        compiled_after_step = []
        with settings.fusion("auto"), gpytorch.settings.max_cholesky_size(10):
            for _ in range(settings.FUSION_AFTER_CALLS + 2):
                (-mll(model(x), y)).backward()
                compiled_after_step.append(kernel.fusion.compiled)
        assert compiled_after_step == [True] * len(compiled_after_step), backend

    kernel = gpntk.NTKKernel(L.mlp(2, "relu")).eval()
    z = x.clone().requires_grad_()
    with settings.fusion("auto"):
        for _ in range(settings.FUSION_AFTER_CALLS + 2):
            torch.autograd.grad(kernel(z, x).to_dense().sum(), z)
    assert not kernel.fusion.compiled


def test_compiled_recomputing_backward_equals_eager(traced_only):
    """A kernel of many blocks with gradients: compiled forward fill and compiled per-block backward (without a graph
    break: the arc-cosine Functions have a traceable form) give eager's values and gradients."""
    import torch._dynamo

    net = L.mlp(2, "relu", 2.0, 0.1)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(50, 50, generator=g, dtype=torch.float64)
    kernel = gpntk.NTKKernel(net, block_elements=300).double()
    results = []
    for mode in (False, True):
        with settings.fusion(mode):
            value = (kernel(x).to_dense() * weights).sum()
            results.append((value.detach(), torch.autograd.grad(value, (x, *kernel.parameters()))))
    assert kernel.fusion.compiled
    (v0, g0), (v1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-12, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    from gpntk.core.hyperparameters import Hyperparameters
    from gpntk.kernels.engine import block_kernels

    hyper = Hyperparameters.collect(net, like=x)
    explained = torch._dynamo.explain(block_kernels)(net, x[:7], x[7:13], hyper, None, True, False, False, None)
    assert explained.graph_break_count == 0


def _in_place_cases():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(50, 3, generator=g)
    x[37] = x[4]  # a duplicated row: bitwise equal rows of the kernel
    y = torch.randn(23, 3, generator=g)
    return x, y


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_blocks_written_in_place_equal_eager(backend):
    """Compiled blocks write into the output matrices (and their mirrors): the values of the eager fill.

    Several blocks (``block_elements=64``), the kernel of one input (mirrored blocks, a duplicated
    row) and of two, only Θ kept, a batch of inputs; ``inductor`` generates the C++ loops that
    store into strided views of the matrices.
    """
    net = L.mlp(2, "relu", 2.0, 0.1)
    x, y = _in_place_cases()
    batch = torch.stack([x[:20], 2 * x[20:40]])
    evaluations = {
        "same": lambda fusion: dense.evaluate(net, x, x, _hyper(net, x), block_elements=64, fusion=fusion),
        "pair": lambda fusion: dense.evaluate(net, x, y, _hyper(net, x), block_elements=64, fusion=fusion),
        "ntk only": lambda fusion: (
            dense.evaluate_output(net, x, x, _hyper(net, x), "ntk", block_elements=64, fusion=fusion),
        ),
        "batch": lambda fusion: dense.evaluate(net, batch, batch, _hyper(net, x), block_elements=64, fusion=fusion),
    }
    with torch.no_grad():
        for name, evaluate in evaluations.items():
            with settings.fusion(False):
                eager = evaluate(FusionPolicy(backend))
            policy = FusionPolicy(backend)
            with settings.fusion(True):
                fused = evaluate(policy)
            assert policy.compiled and not policy.failed, name
            assert blocked.write_block in policy._compiled, name  # the in-place path ran
            for a, b in zip(eager, fused):
                assert a.shape == b.shape and b.is_contiguous(), name
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)
            if name == "same":
                for k in fused:
                    assert torch.equal(k[37], k[4]) and torch.equal(k[:, 37], k[:, 4])
                    upper = torch.triu(torch.ones(50, 50, dtype=torch.bool), diagonal=8)  # off the diagonal blocks
                    assert torch.equal(k[upper], k.T[upper])  # mirrored blocks: exact transposes


def test_compiled_blocks_written_in_place_raise_on_overflow(traced_only):
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    net = L.mlp(2, "exp")  # the second layer's variance is exp(~5000)
    with torch.no_grad(), settings.fusion(True), pytest.raises(FloatingPointError, match="overflowed"):
        dense.evaluate(net, x, x, _hyper(net, x), block_elements=16, fusion=FusionPolicy())


def _hyper(net, like):
    return Hyperparameters.collect(net, like=like)
