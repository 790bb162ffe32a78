"""The KeOps backend on networks in standard parameterization: products and gradients against dense.

One architecture (every layer standard, a frozen and a bias-free one, a NTK-parameterized layer in
between), ``K(X, Z)``: the NTK's own term of a standard layer, :math:`n \\Sigma_{in} + \\beta`, is
written with ``in_width`` as an exact integer literal. Compiles are slow (tens of seconds each).
"""

from __future__ import annotations

import pytest
import torch

pykeops = pytest.importorskip("pykeops")
pytestmark = pytest.mark.slow  # cold KeOps compiles take minutes; the fast tier: pytest -m "not slow"

from test_keops import C, D, _dense, _leaf_hyper, _points, _relative, keops_build_folder  # noqa: E402, F401

from gpntk import layers as L  # noqa: E402
from gpntk.contrib.keops import keops_covariance, keops_supported  # noqa: E402

SP = {"parameterization": "standard"}


def _standard():
    return L.serial(
        L.Dense(1.7, 0.2, in_width=D, **SP), L.ReLU(),
        L.Dense(2.1, 0.0, in_width=30, **SP), L.Erf(),
        L.Dense(1.3, 0.1, trainable=False, in_width=20, **SP), L.ReLU(),
        L.Dense(1.2, 0.1), L.ReLU(),
        L.Dense(1.4, 0.3, in_width=40, **SP),
    )


@pytest.mark.parametrize("output", ["ntk", "nngp"])
def test_standard_parameterization_equals_dense(output):
    net = _standard()
    assert keops_supported(net) is None
    x1 = _points(60, 21).requires_grad_(True)
    x2 = _points(45, 22).requires_grad_(True)
    hyper = _leaf_hyper(net, x1)
    u, v = _points(60, 23, features=C), _points(45, 24, features=C).requires_grad_(True)
    inputs = [x1, x2, v, *hyper.values()]
    out = keops_covariance(x1, x2, net=net, output=output, hyper=hyper) @ v
    reference = _dense(net, x1, x2, hyper, output) @ v
    assert _relative(out, reference) < 1e-10
    grads = torch.autograd.grad((u * out).sum(), inputs, allow_unused=True)
    # the readout's bias variance does not enter a standard readout's NTK (n Σ_in + 1): no dense gradient
    expected = torch.autograd.grad((u * reference).sum(), inputs, allow_unused=True)
    assert (expected[-1] is None) == (output == "ntk")
    for got, want, given in zip(grads, expected, inputs):
        got = torch.zeros_like(given) if got is None else got
        assert torch.isfinite(got).all()
        if want is None:
            assert (got == 0).all()
        else:
            assert _relative(got, want) < 1e-8
