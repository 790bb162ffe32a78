"""gpntk.empirical: the structured empirical NTK agrees with the full torch.func Jacobian, the
generic path handles any module, and the Monte Carlo helper validates and reproduces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpntk
from gpntk import layers as L
from gpntk.core.finite import NTKLinear
from gpntk.empirical.structured import structured_applicable

DTYPE = torch.float64


def _x(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _mixed_net() -> L.Serial:
    shared = L.Dense(2.0, 0.1)
    return L.serial(
        shared, L.Erf(), L.Dense(1.5, 0.0, trainable=False), L.ReLU(), shared, L.GELU(),
        L.Dense(1.2, 0.0), L.Tanh(), L.Dense(1.0, 0.3),
    )


@pytest.mark.parametrize("out_features", [1, 3])
@pytest.mark.parametrize("reduce", ["mean", "none"])
@pytest.mark.parametrize("same", [True, False])
def test_structured_matches_jacobian(out_features, reduce, same):
    model = _mixed_net().finite(24, in_features=5, out_features=out_features,
                                generator=torch.Generator().manual_seed(0)).to(DTYPE)
    assert structured_applicable(model)
    x1 = _x(6, 5, 1)
    x2 = None if same else _x(4, 5, 2)
    fast = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="structured")
    slow = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="jacobian")
    assert fast.shape == slow.shape == ((6, 6 if same else 4) + (() if reduce == "mean" else (out_features,) * 2))
    torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gpntk.empirical_ntk(model, x1, x2, reduce=reduce), fast, rtol=0, atol=0)


class _Reused(nn.Module):
    """One NTKLinear applied twice, to inputs with an extra position dimension, plus an nn.Linear."""

    gpntk_rowwise = True

    def __init__(self):
        super().__init__()
        self.inner = NTKLinear(5, 5, weight_std=1.3, bias_std=0.4, generator=torch.Generator().manual_seed(0))
        self.readout = nn.Linear(5, 2)

    def forward(self, x):
        h = self.inner(torch.tanh(self.inner(x)))
        return self.readout(h).reshape(x.shape[0], -1)


@pytest.mark.parametrize("reduce", ["mean", "none"])
def test_structured_handles_reuse_positions_and_nn_linear(reduce):
    torch.manual_seed(0)
    model = _Reused().to(DTYPE)
    x1 = torch.randn(5, 3, 5, dtype=DTYPE)
    x2 = torch.randn(2, 3, 5, dtype=DTYPE)
    fast = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="structured")
    slow = gpntk.empirical_ntk(model, x1, x2, reduce=reduce, method="jacobian")
    torch.testing.assert_close(fast, slow, rtol=1e-11, atol=1e-11)


def test_generic_modules_fall_back_to_the_jacobian():
    torch.manual_seed(0)

    class Custom(nn.Module):  # unknown to the structured path (not marked row-wise)
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 3, dtype=DTYPE))

        def forward(self, x):
            return torch.sin(x @ self.a.T).sum(-1)

    model = Custom()
    assert not structured_applicable(model)
    x = _x(5, 3, 0)
    ntk = gpntk.empirical_ntk(model, x)
    jac = torch.autograd.functional.jacobian(lambda a: torch.sin(x @ a.T).sum(-1), model.a).reshape(5, -1)
    torch.testing.assert_close(ntk, jac @ jac.T)
    with pytest.raises(ValueError, match="structured"):
        gpntk.empirical_ntk(model, x, method="structured")
    # a module that mixes rows is not row-wise either
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DTYPE)
    assert not structured_applicable(bn)
    running = bn[1].running_mean.clone()
    assert gpntk.empirical_ntk(bn, x).shape == (5, 5)
    assert torch.equal(bn[1].running_mean, running)  # the model's buffers are left alone


def test_empirical_ntk_works_under_no_grad():
    model = L.mlp(2, "relu").finite(16, in_features=3).to(DTYPE)
    x = _x(4, 3, 0)
    expected = gpntk.empirical_ntk(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gpntk.empirical_ntk(model, x), expected, rtol=0, atol=0)


def test_empirical_nngp():
    model = L.mlp(2, "erf").finite(16, in_features=3, out_features=4).to(DTYPE)
    x1, x2 = _x(5, 3, 0), _x(2, 3, 1)
    f1, f2 = model(x1).detach(), model(x2).detach()
    torch.testing.assert_close(gpntk.empirical_nngp(model, x1, x2), f1 @ f2.T / 4)
    full = gpntk.empirical_nngp(model, x1, x2, reduce="none")
    assert full.shape == (5, 2, 4, 4)
    torch.testing.assert_close(full, torch.einsum("ia,jb->ijab", f1, f2))
    torch.testing.assert_close(gpntk.empirical_nngp(model, x1), f1 @ f1.T / 4)


def test_argument_errors():
    net = L.mlp(1, "relu")
    model = net.finite(8, in_features=3)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="reduce"):
        gpntk.empirical_ntk(model, x, reduce="sum")
    with pytest.raises(ValueError, match="reduce"):
        gpntk.empirical_nngp(model, x, reduce="sum")
    with pytest.raises(ValueError, match="method"):
        gpntk.empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        gpntk.empirical_ntk(model, torch.randn(3))
    with pytest.raises(ValueError, match="no trainable parameters"):
        gpntk.empirical_ntk(L.serial(L.Dense(trainable=False)).finite(4, in_features=3), x)
    with pytest.raises(ValueError, match="n_samples"):
        gpntk.monte_carlo_kernel(net, x, width=4, n_samples=1)
    with pytest.raises(ValueError, match="kind"):
        gpntk.monte_carlo_kernel(net, x, width=4, n_samples=2, kind="ntkk")
    with pytest.raises(ValueError, match="width"):
        gpntk.monte_carlo_kernel(net, x, width=0, n_samples=2)


def test_choice_errors_name_every_choice_and_the_value():
    model = L.mlp(1, "relu").finite(8, in_features=3)
    x = torch.randn(4, 3)
    cases = [
        (lambda: gpntk.empirical_ntk(model, x, reduce="sum"), "reduce must be 'mean' or 'none', got 'sum'"),
        (lambda: gpntk.empirical_nngp(model, x, reduce=None), "reduce must be 'mean' or 'none', got None"),
        (lambda: gpntk.empirical_ntk(model, x, method=["auto"]),
         "method must be 'auto', 'structured' or 'jacobian', got ['auto']"),
        (lambda: gpntk.monte_carlo_kernel(L.mlp(1, "relu"), x, width=4, n_samples=2, kind="NTK"),
         "kind must be 'ntk' or 'nngp', got 'NTK'"),
        (lambda: gpntk.EmpiricalNTKKernel(model, kind="ntkk"), "kind must be 'ntk' or 'nngp', got 'ntkk'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def test_monte_carlo_is_reproducible_and_seeded():
    net = L.mlp(2, "relu")
    x1, x2 = _x(4, 3, 0), _x(3, 3, 1)
    for kind in ("ntk", "nngp"):
        a = gpntk.monte_carlo_kernel(net, x1, x2, width=16, n_samples=4, kind=kind, out_features=2, seed=3)
        b = gpntk.monte_carlo_kernel(net, x1, x2, width=16, n_samples=4, kind=kind, out_features=2, seed=3)
        c = gpntk.monte_carlo_kernel(net, x1, x2, width=16, n_samples=4, kind=kind, out_features=2, seed=4)
        assert a[0].shape == a[1].shape == (4, 3) and a[0].dtype == DTYPE
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
        assert (a[1] > 0).all()


class _TanhWithoutVmap(torch.autograd.Function):
    """tanh whose backward reads a value (``.item()``), which ``vmap`` cannot batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        assert grad.abs().sum().item() < 1e300
        return grad * (1 - torch.tanh(x) ** 2)


class _RowwiseTanhWithoutVmap(torch.nn.Module):
    gpntk_rowwise = True

    def forward(self, x):
        return _TanhWithoutVmap.apply(x)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_structured_ntk_falls_back_to_one_backward_per_channel_anywhere_in_the_network(where):
    """An operation vmap cannot batch, in the middle of a network as at its end: same NTK as with nn.Tanh."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()

    def net(activation):
        if where == "middle":
            return torch.nn.Sequential(first, activation, second)
        return torch.nn.Sequential(first, torch.nn.Tanh(), second, activation)

    x = torch.randn(5, 4, dtype=torch.float64)
    got = gpntk.empirical_ntk(net(_RowwiseTanhWithoutVmap()), x)
    expected = gpntk.empirical_ntk(net(torch.nn.Tanh()), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
