"""Fused (``torch.compile``) kernel evaluation: same numbers as eager, the policy, and the fallback."""

from __future__ import annotations

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk import settings
from gpntk.kernels import dense

pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.slow]


@pytest.fixture
def fresh_compiler(monkeypatch):
    """Each test starts with no compiled function and no recorded failure."""
    monkeypatch.setattr(dense, "_compiled_kernels", None)
    monkeypatch.setattr(dense, "_compile_failed", False)
    monkeypatch.setattr(dense, "_large_calls", {})


@pytest.fixture
def traced_only(fresh_compiler, monkeypatch):
    """Trace with dynamo and AOTAutograd but skip C++ code generation (seconds instead of minutes)."""
    monkeypatch.setattr(dense, "_COMPILE_BACKEND", "aot_eager")


def _both(net, x1, x2=None, input_shape=None):
    return [cls(net, input_shape=input_shape)(x1, x2).to_dense() for cls in (gpntk.NNGPKernel, gpntk.NTKKernel)]


def test_inductor_compiled_kernels_equal_eager(fresh_compiler):
    """The real backend (C++ code generation), once, on a small network without gradients."""
    net = L.mlp(1, "relu", 2.0, 0.1)
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with settings.fusion(False):
            eager = _both(net, x)
        with settings.fusion(True):
            fused = _both(net, x)
    assert dense._compiled_kernels is not None and not dense._compile_failed
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_traced_kernels_and_gradients_equal_eager(traced_only):
    net = L.mlp(2, "relu", 2.0, 0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, requires_grad=True)
    y = torch.randn(30, 5, generator=g)
    with settings.fusion(False):
        eager = _both(net, x, y)
        (eager_grad,) = torch.autograd.grad(eager[1].square().sum(), x)
    with settings.fusion(True):
        fused = _both(net, x, y)
        (fused_grad,) = torch.autograd.grad(fused[1].square().sum(), x)
    assert dense._compiled_kernels is not None and not dense._compile_failed
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager_grad, fused_grad, rtol=1e-10, atol=1e-10)


def test_spatial_architectures_run_eagerly(fresh_compiler):
    net = L.serial(
        L.Conv(3, weight_variance=2.0, bias_variance=0.1), L.ReLU(), L.AvgPool(2), L.GlobalAvgPool(), L.Dense(2.0)
    )
    x = torch.randn(6, 2 * 4 * 4, generator=torch.Generator().manual_seed(1))
    with settings.fusion(True):
        _both(net, x, input_shape=(2, 4, 4))
    assert dense._compiled_kernels is None


def test_auto_policy_compiles_only_repeated_large_evaluations_without_gradients():
    big, after = settings.FUSION_MIN_ELEMENTS, settings.FUSION_AFTER_CALLS
    with settings.fusion("auto"):
        assert settings.fusion.enabled_for(big, needs_grad=False, previous_calls=after)
        assert not settings.fusion.enabled_for(big, needs_grad=False, previous_calls=after - 1)
        assert not settings.fusion.enabled_for(big - 1, needs_grad=False, previous_calls=after)
        assert not settings.fusion.enabled_for(10 * big, needs_grad=True, previous_calls=after)
    with settings.fusion(True):
        assert settings.fusion.enabled_for(1, needs_grad=True)
    with settings.fusion(False):
        assert not settings.fusion.enabled_for(10 * big, needs_grad=False)


def test_auto_compiles_from_the_third_large_evaluation_of_a_network(traced_only, monkeypatch):
    monkeypatch.setattr(settings, "FUSION_MIN_ELEMENTS", 100)
    net, other = L.mlp(1, "relu"), L.mlp(1, "erf")
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), settings.fusion("auto"):
        for _ in range(settings.FUSION_AFTER_CALLS):
            _both(net, x)  # one NNGP and one NTK evaluation each time: counted separately
        assert dense._compiled_kernels is None
        _both(other, x)  # another network has its own count
        assert dense._compiled_kernels is None
        fused = _both(net, x)
        assert dense._compiled_kernels is not None
    with settings.fusion(False):
        for a, b in zip(_both(net, x), fused):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_small_evaluations_do_not_compile(fresh_compiler):
    with settings.fusion("auto"):
        _both(L.mlp(1), torch.randn(10, 3))
    assert dense._compiled_kernels is None


def test_fusion_mode_is_checked_and_restored():
    before = settings.fusion.current()
    with pytest.raises(ValueError, match="fusion mode must be 'auto', True or False, got 'yes'"):
        settings.fusion("yes")
    with pytest.raises(ValueError, match="got 1"):
        settings.fusion(1)
    with settings.fusion(False):
        assert settings.fusion.current() is False
    assert settings.fusion.current() == before


def test_compiler_failure_warns_once_and_falls_back(fresh_compiler, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = L.mlp(1, "erf")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    expected = _both(net, x)
    with settings.fusion(True):
        with pytest.warns(RuntimeWarning, match="torch.compile failed .*no C\\+\\+ compiler.*eagerly"):
            first = _both(net, x)
        second = _both(net, x)  # no second warning: compilation is not retried
    assert dense._compile_failed
    for a, b, c in zip(expected, first, second):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
