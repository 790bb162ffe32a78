"""Hyperparameter gradients in forward mode (gpntk.kernels.tangents.TangentKernels).

A compiled kernel matrix whose hyperparameters, not inputs, need gradients is filled with its
tangents ∂K/∂θ_k. References: plain autograd through every block (``recompute_backward(False)``,
itself checked against finite differences in test_gradients.py), central finite differences, and
the recomputing backward, on kernels with identical rows (coincident pairs, whose tangents come
from the per-point recursion). ``aot_eager`` traces as inductor does, without compiling C++.
"""

from __future__ import annotations

import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.dense import evaluate_output
from gpntk.kernels.fusion import FusionPolicy
from gpntk.kernels.planning import kernel_blocks
from gpntk.kernels.tangents import wants_tangents

BLOCK = 12 * 12


def hyper_of(net: L.Layer, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    values = Hyperparameters.collect(net, like=torch.zeros(1, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    return {
        name: (v.detach().expand(*batch, 1, 1) * (1 + 0.2 * torch.rand(*batch, 1, 1, generator=g, dtype=v.dtype)))
        .clone().requires_grad_()
        for name, v in values.items()
    }


def points(n: int = 29, d: int = 3) -> torch.Tensor:
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[4] = x[0]  # coincident pairs inside and across blocks
    if n > 20:
        x[20] = x[2]
    return x


def kernel(net, x1, x2, hyper, output, compiled=True):
    policy = FusionPolicy(backend="aot_eager")
    with gpntk.settings.fusion(compiled):
        return evaluate_output(net, x1, x2, hyper, output, block_elements=BLOCK, fusion=policy)


def reference_gradients(net, x1, x2, hyper, output, weights):
    with gpntk.settings.recompute_backward(False), gpntk.settings.fusion(False):
        value = kernel(net, x1, x2, hyper, output, compiled=False)
        return value, torch.autograd.grad((value * weights).sum(), list(hyper.values()))


def assert_ntk_gradients_equal_plain_autograd(net, x, hyper, weights, backward):
    """The compiled NTK of ``x`` takes ``backward``; its value and the gradients of ``sum(K * weights)`` are
    plain autograd's (finite)."""
    value = kernel(net, x, x, hyper, "ntk")
    assert type(value.grad_fn).__name__ == backward
    grads = torch.autograd.grad((value * weights).sum(), list(hyper.values()))
    ref_value, ref_grads = reference_gradients(net, x, x, hyper, "ntk", weights)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# each activation family (arc-cosine, closed form, quadrature), output and input form at least once;
# every case traces a compiled jvp, which takes tens of seconds
CASES = [("relu", "ntk", "one tensor"), ("relu", "nngp", "two tensors"), ("erf", "nngp", "one tensor"),
         ("gelu", "ntk", "two tensors")]


@pytest.mark.parametrize(("activation", "output", "inputs"), CASES)
def test_tangent_gradients_equal_plain_autograd(activation, output, inputs):
    net = gpntk.layers.mlp(depth=2, activation=activation, weight_variance=1.7, bias_variance=0.2)
    x1 = points()
    x2 = x1 if inputs == "one tensor" else torch.cat([points(13)[5:], x1[:6]])  # rows shared with x1
    hyper = hyper_of(net)
    weights = torch.randn(x1.shape[0], x2.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    value = kernel(net, x1, x2, hyper, output)
    assert type(value.grad_fn).__name__ == "TangentKernelsBackward"
    grads = torch.autograd.grad((value * weights).sum(), list(hyper.values()))
    ref_value, ref_grads = reference_gradients(net, x1, x2, hyper, output, weights)
    torch.testing.assert_close(value, ref_value, rtol=1e-13, atol=1e-13)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if inputs == "one tensor":  # identical rows: the per-point value at their pairs, rows equal to rounding
        for i, j in ((4, 0), (20, 2)):
            assert value[i, j] == value[i, i] == value[j, j] == value[j, i]
            assert ((value[i] - value[j]).abs().max() / value.abs().max()).item() < 1e-14


def test_tangent_gradients_match_finite_differences():
    net = gpntk.layers.mlp(depth=2, activation="relu", weight_variance=1.5, bias_variance=0.3)
    x = points(19)
    hyper = hyper_of(net)
    weights = torch.randn(19, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    value = kernel(net, x, x, hyper, "ntk")
    grads = torch.autograd.grad((value * weights).sum(), list(hyper.values()))
    for (name, v), g in zip(hyper.items(), grads):
        h = 1e-6
        shifted = []
        for sign in (1, -1):
            moved = {k: (u.detach() + sign * h if k == name else u.detach()) for k, u in hyper.items()}
            with torch.no_grad():
                shifted.append((kernel(net, x, x, moved, "ntk", compiled=False) * weights).sum())
        torch.testing.assert_close(g.squeeze(), (shifted[0] - shifted[1]) / (2 * h), rtol=1e-7, atol=1e-7)


def test_batched_hyperparameters_and_a_frozen_one():
    """Hyperparameters with a batch dimension get one gradient per batch entry; one without gradient is skipped."""
    net = gpntk.layers.mlp(depth=2, activation="erf", weight_variance=1.5, bias_variance=0.3)
    x = points(21)
    hyper = hyper_of(net, batch=(3,))
    frozen = next(iter(hyper))
    hyper[frozen] = hyper[frozen].detach()
    weights = torch.randn(3, 21, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value = kernel(net, x, x, hyper, "ntk")
    assert type(value.grad_fn).__name__ == "TangentKernelsBackward" and value.shape == (3, 21, 21)
    wanted = [v for v in hyper.values() if v.requires_grad]
    grads = torch.autograd.grad((value * weights).sum(), wanted)
    with gpntk.settings.recompute_backward(False), gpntk.settings.fusion(False):
        ref = kernel(net, x, x, hyper, "ntk", compiled=False)
        ref_grads = torch.autograd.grad((ref * weights).sum(), wanted)
    for a, b in zip(grads, ref_grads):
        assert a.shape == (3, 1, 1)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_when_the_tangent_path_is_not_taken():
    net = gpntk.layers.mlp(depth=2, activation="relu")
    x = points()
    hyper = hyper_of(net)

    def node(**options):
        compiled = options.pop("compiled", True)
        x1 = options.pop("x1", x)
        return type(kernel(options.pop("net", net), x1, x1, hyper, "ntk", compiled=compiled).grad_fn).__name__

    assert node() == "TangentKernelsBackward"
    assert node(compiled=False) == "RecomputedKernelsBackward"  # eager: reverse mode
    assert node(x1=x.clone().requires_grad_()) == "RecomputedKernelsBackward"  # input gradients
    # Dropout: identical rows other than a point with itself are different draws after it
    dropout = L.serial(L.Dense(1.0, 0.1), L.ReLU(), L.Dropout(0.8), L.Dense(1.0, 0.1))
    blocks = kernel_blocks(net, x, x, hyper, None, BLOCK)[0]
    assert len(blocks) == 6  # rows 12 + 12 + 5: the blocks on and above the diagonal
    assert wants_tangents(net, x, x, hyper, True, (False, True), blocks)
    assert not wants_tangents(dropout, x, x, hyper_of(dropout), True, (False, True), blocks)
    assert not wants_tangents(net, x, x, hyper, True, (True, True), blocks)  # both matrices kept
    assert not wants_tangents(net, x, x, hyper, True, (False, True), blocks[:1])  # one block: plain autograd
    # memory: two tangents of the blocks computed (mirrored ones stored once), not of all 29 x 29 pairs
    stored = 2 * (12 * 12 + 12 * 12 + 12 * 5 + 12 * 12 + 12 * 5 + 5 * 5)
    old = gpntk.settings.TANGENT_MAX_ELEMENTS
    try:
        gpntk.settings.TANGENT_MAX_ELEMENTS = stored
        assert node() == "TangentKernelsBackward"
        gpntk.settings.TANGENT_MAX_ELEMENTS = stored - 1
        assert node() == "RecomputedKernelsBackward"
    finally:
        gpntk.settings.TANGENT_MAX_ELEMENTS = old


def test_non_finite_tangents_fall_back_to_reverse_mode(monkeypatch):
    """A tangent that is not finite (a pair formula with an infinite derivative in the correlation;
    before the arc-cosine functions' closed-form tangents, x and 2x without biases) makes the
    evaluation take the recomputing backward instead. Forced here by a tangent check that always fails."""
    from gpntk.kernels import tangents

    net = gpntk.layers.mlp(depth=2, activation="relu", weight_variance=1.5, bias_variance=0.3)
    x = points(17)
    hyper = hyper_of(net)
    weights = torch.randn(17, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    check = tangents.check_finite_kernel

    def failing_for_tangents(*values, **options):
        if len(values) > 1:  # the tangents (the kernel alone is checked first)
            raise FloatingPointError("not finite")
        return check(*values, **options)

    monkeypatch.setattr(tangents, "check_finite_kernel", failing_for_tangents)
    assert_ntk_gradients_equal_plain_autograd(net, x, hyper, weights, "RecomputedKernelsBackward")


def test_second_derivatives_through_the_tangent_path():
    net = gpntk.layers.mlp(depth=2, activation="erf", weight_variance=1.5, bias_variance=0.3)
    x = points(14)
    hyper = hyper_of(net)

    def first(*values):
        moved = dict(zip(hyper, values))
        value = kernel(net, x, x, moved, "ntk")
        assert type(value.grad_fn).__name__ == "TangentKernelsBackward"
        return torch.autograd.grad(value.square().sum(), values, create_graph=True)

    def first_plain(*values):
        with gpntk.settings.recompute_backward(False):
            value = kernel(net, x, x, dict(zip(hyper, values)), "ntk", compiled=False)
        return torch.autograd.grad(value.square().sum(), values, create_graph=True)

    values = tuple(hyper.values())
    second = torch.autograd.grad(sum(g.sum() for g in first(*values)), values)
    second_plain = torch.autograd.grad(sum(g.sum() for g in first_plain(*values)), values)
    for a, b in zip(second, second_plain):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_parallel_inputs_keep_the_tangent_path_with_the_reverse_mode_convention():
    """Distinct inputs at correlation ±1 (x, 2x and -x without biases): the closed-form tangents of the
    arc-cosine functions (gpntk.activations.first_order) take dJ0/drho = 0 there, the convention of
    reverse mode, so the tangents stay finite and the gradients equal plain autograd's."""
    net = gpntk.layers.mlp(depth=2, activation="relu", weight_variance=1.5, bias_variance=0.0)
    x = points(17)
    x[5], x[7], x[9] = 2 * x[1], -x[3], 0.5 * x[3]
    weights = torch.randn(17, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert_ntk_gradients_equal_plain_autograd(net, x, hyper_of(net), weights, "TangentKernelsBackward")
