"""Per-point values stored once in compiled kernels (``gpntk.activations.per_point``): same values and derivatives."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch._inductor.utils import run_and_get_code

from gpntk.activations.base import correlation
from gpntk.activations.per_point import per_point

pytestmark = pytest.mark.slow  # compiles


def _variances(zero: bool = False):
    g = torch.Generator().manual_seed(4)
    q11 = torch.rand(6, 1, generator=g, dtype=torch.float64) * 3 + 1e-3
    q22 = torch.rand(1, 5, generator=g, dtype=torch.float64) * 3 + 1e-3
    if zero:
        q11[2] = 0.0
    q12 = (torch.rand(6, 5, generator=g, dtype=torch.float64) - 0.5) * (q11 * q22).sqrt()
    if zero:
        q12[2] = 0.0
    return q11, q12, q22


def _dual(q11: torch.Tensor, q12: torch.Tensor, q22: torch.Tensor) -> torch.Tensor:
    """A ReLU-like pair value built from the correlation: ``sqrt_prod * rho**3 + rho``."""
    rho, sqrt_prod = correlation(q11, q12, q22)
    return sqrt_prod * rho.pow(3) + rho


def test_eager_returns_the_tensors_themselves():
    x, y = torch.randn(3, 1), torch.randn(1, 4)
    a, b = per_point(x, y)
    assert a is x and b is y


def test_inductor_keeps_the_mark_and_the_values():
    """The mark reaches inductor's generated code (an opaque call, not inlined into the pair loop)."""
    q11, q12, q22 = _variances(zero=True)
    eager = _dual(q11, q12, q22)
    compiled, code = run_and_get_code(torch.compile(_dual, backend="inductor", fullgraph=True), q11, q12, q22)
    assert any("gpntk.per_point" in c for c in code)
    torch.testing.assert_close(compiled, eager, rtol=1e-14, atol=0)


def test_compiled_gradients_equal_eager():
    q11, q12, q22 = _variances(zero=True)
    compiled = torch.compile(_dual, backend="aot_eager", fullgraph=True)

    def gradients(fn):
        inputs = [t.clone().requires_grad_(True) for t in (q11, q12, q22)]
        value = fn(*inputs).sin().sum()
        return [value.detach(), *torch.autograd.grad(value, inputs)]

    for a, b in zip(gradients(compiled), gradients(_dual)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_operator_is_the_identity_in_reverse_mode_twice():
    x = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    y = torch.ops.gpntk.per_point(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (g,) = torch.autograd.grad((y.pow(3)).sum(), x, create_graph=True)
    torch.testing.assert_close(g, 3 * x.square())
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, 6 * x.detach())


def test_compiled_forward_mode_keeps_its_tangents():
    """Forward mode cannot pass through the opaque operator (PyTorch would silently drop the tangent), so
    under ``torch.func.jvp`` and under a forward-mode dual level the compiled function marks with a
    matrix product instead, which carries tangents."""
    q11, q12, q22 = _variances()
    tangents = tuple(torch.randn_like(t) for t in (q11, q12, q22))
    _, expected = torch.func.jvp(_dual, (q11, q12, q22), tangents)
    assert expected.abs().max() > 0

    jvp = torch.compile(lambda *p: torch.func.jvp(_dual, p, tangents), backend="aot_eager", fullgraph=True)
    _, tangent = jvp(q11, q12, q22)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-14)

    compiled = torch.compile(_dual, backend="aot_eager", fullgraph=True)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(p, t) for p, t in zip((q11, q12, q22), tangents)]
        tangent = forward_ad.unpack_dual(compiled(*duals)).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-14)


def test_under_jvp_the_mark_is_a_stored_matrix_product_with_the_eager_values_and_tangents():
    """float64 on the CPU: inductor leaves ``v @ [[1]]`` to BLAS (stored once), values bitwise, tangents exact."""
    q11, q12, q22 = _variances(zero=True)
    tangents = tuple(torch.randn_like(t) for t in (q11, q12, q22))
    expected = torch.func.jvp(_dual, (q11, q12, q22), tangents)

    def jvp(*p):
        return torch.func.jvp(_dual, p, tangents)

    compiled, code = run_and_get_code(torch.compile(jvp, backend="inductor", fullgraph=True), q11, q12, q22)
    assert any("extern_kernels.mm" in c or "extern_kernels.addmm" in c for c in code)
    assert not any("gpntk.per_point" in c for c in code)
    torch.testing.assert_close(compiled[0], expected[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(compiled[1], expected[1], rtol=1e-12, atol=1e-14)


def test_the_product_mark_is_exact_and_left_out_for_float32():
    x = torch.tensor([[0.0], [1e-300], [3.0], [1.7976931348623157e308], [-2.5]], dtype=torch.float64)
    marked = torch.compile(lambda v: torch.func.jvp(lambda u: per_point(u)[0], (v,), (torch.ones_like(v),)),
                           backend="aot_eager", fullgraph=True)
    value, tangent = marked(x)
    assert torch.equal(value, x) and torch.equal(tangent, torch.ones_like(x))
    seen = []

    def record(v):
        out = per_point(v)[0]
        seen.append(out is v)
        return out

    torch.compile(lambda v: torch.func.jvp(record, (v,), (v,)), backend="aot_eager", fullgraph=True)(x.float())
    assert seen == [True]  # float32: not marked (a reduced-precision matrix product mode could round it)
