"""First-order forms of the arc-cosine functions (``gpntk.activations.first_order``).

Under ``first_order_tangents`` the values are bitwise the plain ones and first derivatives are
the closed forms of Price's theorem (dJ1/drho = J0, dJ0/drho = 1/sqrt(1 - rho^2), 0 at |rho| = 1),
checked against central finite differences of the plain functions; outside it nothing changes.
"""

from __future__ import annotations

import math

import pytest
import torch

from gpntk.activations import first_order
from gpntk.activations.angular import arccos_j, arccos_j1_j0

RHO = torch.tensor([-1.0, -0.999999, -0.7, -0.2, 0.0, 0.3, 0.5, 0.93, 0.9999999, 1.0], dtype=torch.float64)
INTERIOR = RHO[1:-1]


def _jvp(fn, rho):
    return torch.func.jvp(fn, (rho,), (torch.ones_like(rho),))


def _central_difference(fn, rho, h=1e-6):
    return (fn(rho + h) - fn(rho - h)) / (2 * h)


def test_the_switch_is_off_outside_its_block_and_restored_after_an_error():
    assert not first_order.active()
    with first_order.first_order_tangents():
        assert first_order.active()
    assert not first_order.active()
    with pytest.raises(RuntimeError), first_order.first_order_tangents():
        raise RuntimeError("inside")
    assert not first_order.active()


def test_values_are_bitwise_the_plain_ones():
    plain = (*arccos_j1_j0(RHO), *(arccos_j(RHO, p) for p in range(4)))
    with first_order.first_order_tangents():
        linear = (*arccos_j1_j0(RHO), *(arccos_j(RHO, p) for p in range(4)))
        primal = _jvp(lambda r: arccos_j1_j0(r)[0], RHO)[0]
    for a, b in zip(linear, plain):
        assert torch.equal(a, b)
    assert torch.equal(primal, plain[0])


def test_first_derivatives_are_the_closed_forms_and_match_finite_differences():
    with first_order.first_order_tangents():
        (j1, j0), (dj1, dj0) = _jvp(arccos_j1_j0, RHO)
        dj = [_jvp(lambda r, p=p: arccos_j(r, p), RHO)[1] for p in range(4)]
    torch.testing.assert_close(dj1, j0, rtol=0, atol=0)
    inside = RHO.abs() < 1
    expected_dj0 = torch.where(inside, 1 / (1 - RHO.square()).clamp_min(1e-300).sqrt(), torch.zeros_like(RHO))
    torch.testing.assert_close(dj0, expected_dj0, rtol=1e-14, atol=0)
    torch.testing.assert_close(dj[0], expected_dj0, rtol=1e-14, atol=0)
    torch.testing.assert_close(dj[1], arccos_j(RHO, 0), rtol=0, atol=0)
    for p in (1, 2, 3):  # Price: dJ_p/drho = p^2 J_{p-1}
        torch.testing.assert_close(dj[p], p * p * arccos_j(RHO, p - 1), rtol=1e-15, atol=0)
    # against the plain functions, away from the kink at |rho| = 1
    middle = INTERIOR[(INTERIOR.abs() < 0.99)]
    with first_order.first_order_tangents():
        (_, _), (dj1_mid, dj0_mid) = _jvp(arccos_j1_j0, middle)
    torch.testing.assert_close(dj1_mid, _central_difference(lambda r: arccos_j1_j0(r)[0], middle), rtol=1e-8, atol=0)
    torch.testing.assert_close(dj0_mid, _central_difference(lambda r: arccos_j1_j0(r)[1], middle), rtol=1e-8, atol=0)


def test_reverse_mode_gives_the_same_first_derivatives():
    rho = INTERIOR.clone().requires_grad_()
    with first_order.first_order_tangents():
        j1, j0 = arccos_j1_j0(rho)
    g1, g0 = (torch.autograd.grad(j.sum(), rho, retain_graph=True)[0] for j in (j1, j0))
    torch.testing.assert_close(g1, j0.detach(), rtol=0, atol=0)
    torch.testing.assert_close(g0, 1 / (1 - INTERIOR.square()).sqrt(), rtol=1e-14, atol=0)


def test_compiled_forms_equal_eager():
    def tangents(r):
        return _jvp(arccos_j1_j0, r)

    with first_order.first_order_tangents():
        eager = tangents(RHO)
        compiled = torch.compile(tangents, backend="aot_eager", fullgraph=True)(RHO)
    for a, b in zip(compiled, eager):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-15, atol=0)
    assert math.isfinite(float(eager[1][1].abs().max()))


def test_compiled_code_follows_the_switch():
    """torch.compile guards on the switch: one graph per setting, each reused."""
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda r: _jvp(arccos_j1_j0, r), backend=backend)
    compiled(INTERIOR)
    with first_order.first_order_tangents():
        compiled(INTERIOR)
    compiled(INTERIOR)
    with first_order.first_order_tangents():
        compiled(INTERIOR)
    assert len(graphs) == 2
