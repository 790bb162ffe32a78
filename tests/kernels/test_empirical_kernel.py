"""EmpiricalNTKKernel: the empirical NTK / NNGP of any torch module as a GPyTorch kernel.

Checked against an independent per-row autograd Jacobian and against gpntk.empirical, for an MLP
and a Conv1d network; diagonal, batches, symmetry and PSD; inside an ExactGP (the network's weights
are no GP parameters); dtype/device moves, pickling; errors; GPyTorch's own kernel test-suite;
and the average over random finite networks approaching the infinite-width NTK.
"""

from __future__ import annotations

import copy
import pickle
import unittest

import gpytorch
import pytest
import torch
from _models import ExactGP, Float64Defaults
from gpytorch.kernels import ScaleKernel
from gpytorch.test.base_kernel_test_case import BaseKernelTestCase
from torch import nn

import gpntk
from gpntk.empirical.structured import structured_applicable
from gpntk.kernels.empirical import EmpiricalNTKKernel

DTYPE = torch.float64
D = 5


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _mlp(out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, out)).to(DTYPE)


def _conv(out: int = 3, seed: int = 1) -> nn.Module:
    """Rows of D features as one-channel signals: Conv1d, then Flatten and a dense readout."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, D)), nn.Conv1d(1, 4, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * (D - 2), out)
    ).to(DTYPE)


def _finite(out: int = 2, width: int = 32) -> nn.Module:
    """A network built by ``net.finite`` (the structured, layer-by-layer path of gpntk.empirical)."""
    net = gpntk.layers.mlp(2, "relu")
    return net.finite(width, in_features=D, out_features=out, generator=torch.Generator().manual_seed(0)).to(DTYPE)


def _reference_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``(n1, n2, k, k)`` from one ``torch.autograd.grad`` call per row and output channel."""
    params = [p for p in model.parameters() if p.requires_grad]

    def jacobian(x):
        rows = []
        for i in range(x.shape[0]):
            out = model(x[i : i + 1]).reshape(-1)
            rows.append(torch.stack([
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params, retain_graph=True)])
                for a in range(out.numel())
            ]))
        return torch.stack(rows)

    return torch.einsum("iap,jbp->ijab", jacobian(x1), jacobian(x2))


def _dense(kernel, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return kernel(*args, **kwargs).to_dense()


# --- values -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_mlp, _conv], ids=["mlp", "conv1d"])
def test_matches_reference_jacobian_per_channel_and_mean(make):
    model = make()
    x1, x2 = _x(6, D, seed=1), _x(4, D, seed=2)
    reference = _reference_ntk(model, x1, x2)  # (6, 4, 3, 3)
    per_channel = reference.diagonal(dim1=-2, dim2=-1)  # (6, 4, 3)
    mean = _dense(EmpiricalNTKKernel(model), x1, x2)
    torch.testing.assert_close(mean, per_channel.mean(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, gpntk.empirical_ntk(model, x1, x2), rtol=1e-12, atol=1e-12)
    channels = [_dense(EmpiricalNTKKernel(model, output=i), x1, x2) for i in range(3)]
    for i, channel in enumerate(channels):
        torch.testing.assert_close(channel, per_channel[..., i], rtol=1e-10, atol=1e-12)
    # the channels really differ, so the mean is not a channel
    assert (channels[0] - channels[1]).abs().max() > 1e-3 * channels[0].abs().max()


def test_structured_networks_match_the_jacobian():
    model = _finite(out=2)
    x1, x2 = _x(5, D, seed=3), _x(3, D, seed=4)
    reference = _reference_ntk(model, x1, x2).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(_dense(EmpiricalNTKKernel(model), x1, x2), reference.mean(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        _dense(EmpiricalNTKKernel(model, output=1), x1, x2), reference[..., 1], rtol=1e-10, atol=1e-12
    )


class _Positions(nn.Module):
    """Row-wise, with affine layers applied at 3 positions per row (the structured path's other branches)."""

    gpntk_rowwise = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inner = nn.Linear(2, 2)  # 3 x 3 position pairs > 2 x 2 weights: per-row weight gradients
        self.mix = nn.Linear(2, 5)  # 3 x 3 position pairs <= 2 x 5 weights: position-pair products
        self.readout = nn.Linear(15, 2)

    def forward(self, x):
        h = self.mix(torch.tanh(self.inner(x.reshape(x.shape[0], 3, 2))))
        return self.readout(torch.tanh(h).reshape(x.shape[0], -1))


def test_structured_layers_at_several_positions():
    model = _Positions().to(DTYPE)
    assert structured_applicable(model)
    x1, x2 = _x(5, 6, seed=24), _x(5, 6, seed=25)
    reference = _reference_ntk(model, x1, x2).diagonal(dim1=-2, dim2=-1).mean(-1)
    kernel = EmpiricalNTKKernel(model)
    torch.testing.assert_close(_dense(kernel, x1, x2), reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernel(x1, x2, diag=True), reference.diagonal(), rtol=1e-10, atol=1e-12)
    own = _reference_ntk(model, x1, x1).diagonal(dim1=-2, dim2=-1).mean(-1).diagonal()
    torch.testing.assert_close(kernel(x1, diag=True), own, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("squeeze", [True, False], ids=["(n,)", "(n,1)"])
def test_scalar_output_models(squeeze):
    base = _mlp(out=1)

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = base

        def forward(self, x):
            out = self.body(x)
            return out.squeeze(-1) if squeeze else out

    model = Scalar()
    x = _x(5, D, seed=5)
    expected = _reference_ntk(base, x, x)[..., 0, 0]
    torch.testing.assert_close(_dense(EmpiricalNTKKernel(model), x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_dense(EmpiricalNTKKernel(model, output=0), x), expected, rtol=1e-10, atol=1e-12)
    f = base(x).detach()[:, 0]
    torch.testing.assert_close(_dense(EmpiricalNTKKernel(model, kind="nngp"), x), torch.outer(f, f))


@pytest.mark.parametrize("make", [_mlp, _conv], ids=["mlp", "conv1d"])
def test_nngp_is_the_outer_product_of_outputs(make):
    model = make()
    x1, x2 = _x(6, D, seed=6), _x(4, D, seed=7)
    with torch.no_grad():
        f1, f2 = model(x1), model(x2)
    torch.testing.assert_close(_dense(EmpiricalNTKKernel(model, kind="nngp"), x1, x2), f1 @ f2.T / 3)
    torch.testing.assert_close(
        _dense(EmpiricalNTKKernel(model, kind="nngp", output=2), x1, x2), torch.outer(f1[:, 2], f2[:, 2])
    )


@pytest.mark.parametrize("kind", ["ntk", "nngp"])
@pytest.mark.parametrize("make", [_mlp, _conv, _finite], ids=["mlp", "conv1d", "finite"])
@pytest.mark.parametrize("output", [None, 1])
def test_diag_equals_diagonal_of_full_matrix(kind, make, output):
    kernel = EmpiricalNTKKernel(make(), kind=kind, output=output)
    x, other = _x(7, D, seed=8), _x(7, D, seed=9)
    for x2 in (x, other):
        diag = kernel(x, x2, diag=True)
        assert diag.shape == (7,)
        torch.testing.assert_close(diag, _dense(kernel, x, x2).diagonal(), rtol=1e-10, atol=1e-12)
    if kind == "ntk":
        assert bool((kernel(x, diag=True) > 0).all())


def test_forward_gives_gpytorch_a_tensor():
    """A tensor (multiplied exactly by GPyTorch), equal to the entries computed one pair at a time."""
    kernel = EmpiricalNTKKernel(_conv())
    x = _x(6, D, seed=10)
    full = kernel.forward(x, x)
    assert type(full) is torch.Tensor
    pairs = kernel.forward(x.unsqueeze(-2), x.unsqueeze(-2)).squeeze(-1).squeeze(-1)  # a batch of 1 x 1 blocks
    torch.testing.assert_close(pairs, full.diagonal(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kernel(x, diag=True), full.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [_mlp, _finite], ids=["mlp", "finite"])
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_symmetric_positive_semidefinite(make, kind):
    kernel = EmpiricalNTKKernel(make(), kind=kind)
    K = _dense(kernel, _x(25, D, seed=11))
    torch.testing.assert_close(K, K.T, rtol=0, atol=0)
    eig = torch.linalg.eigvalsh(K)
    assert eig.max() > 0
    assert eig.min() >= -1e-10 * eig.max()


# --- batches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ntk", "nngp"])
def test_batched_inputs(kind):
    kernel = EmpiricalNTKKernel(_mlp(), kind=kind)
    x = _x(2, 6, D, seed=12)
    K = _dense(kernel, x)
    assert K.shape == (2, 6, 6)
    for b in range(2):
        torch.testing.assert_close(K[b], _dense(kernel, x[b]), rtol=1e-12, atol=1e-12)
    assert (K[0] - K[1]).abs().max() > 1e-3
    torch.testing.assert_close(kernel(x, diag=True), K.diagonal(dim1=-2, dim2=-1), rtol=1e-10, atol=1e-12)
    # broadcasting batch dimensions: (2, 1, 6, d) against (3, 4, d)
    x2 = _x(3, 4, D, seed=13)
    cross = _dense(kernel, x.unsqueeze(1), x2)
    assert cross.shape == (2, 3, 6, 4)
    torch.testing.assert_close(cross[1, 2], _dense(kernel, x[1], x2[2]), rtol=1e-12, atol=1e-12)


def test_batch_shape_broadcasts_and_indexes():
    model = _mlp()
    kernel = EmpiricalNTKKernel(model, batch_shape=torch.Size([3]))
    x = _x(5, D, seed=14)
    K = _dense(kernel, x)
    assert K.shape == (3, 5, 5)
    torch.testing.assert_close(K, _dense(EmpiricalNTKKernel(model), x).expand(3, 5, 5))
    assert kernel(x, diag=True).shape == (3, 5)
    assert kernel[0].batch_shape == torch.Size([]) and kernel[0].model is model
    assert kernel.expand_batch(2, 3).batch_shape == torch.Size([2, 3])


# --- GPyTorch integration ---------------------------------------------------------------------
def test_exact_gp_learns_only_its_own_hyperparameters():
    model = _mlp(out=1)
    kernel = EmpiricalNTKKernel(model)
    assert list(kernel.parameters()) == [] and list(kernel.named_hyperparameters()) == []
    assert len(kernel.state_dict()) == 0
    train_x = _x(12, D, seed=15)
    train_y = torch.sin(train_x.sum(-1))
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(DTYPE)
    gp = ExactGP(train_x, train_y, ScaleKernel(kernel), likelihood, mean_module=gpytorch.means.ZeroMean()).to(DTYPE)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    network_ids = {id(p) for p in model.parameters()}
    assert not network_ids & {id(p) for p in mll.parameters()}
    weights = [p.detach().clone() for p in model.parameters()]
    before = {name: p.detach().clone() for name, p in mll.named_parameters()}
    assert set(before) == {"likelihood.noise_covar.raw_noise", "model.covar_module.raw_outputscale"}

    gp.train()
    optimizer = torch.optim.Adam(mll.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss = -mll(gp(train_x), train_y)
    loss.backward()
    optimizer.step()

    for name, p in mll.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p.detach(), w)
        assert p.grad is None
    # predictions work and the network came out in train mode, as it went in
    gp.eval()
    with torch.no_grad():
        pred = likelihood(gp(_x(4, D, seed=16)))
    assert pred.mean.shape == (4,) and bool((pred.variance > 0).all())
    assert model.training


def test_network_is_evaluated_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1)).to(DTYPE)
    model.train()
    kernel = EmpiricalNTKKernel(model)
    x = _x(6, D, seed=17)
    K1, K2 = _dense(kernel, x), _dense(kernel, x)
    torch.testing.assert_close(K1, K2, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(K1, gpntk.empirical_ntk(model, x))
    model.train()
    _dense(kernel, x)
    assert model.training and model[2].training


def test_double_and_to_move_the_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2))  # float32
    kernel = EmpiricalNTKKernel(model)
    assert kernel.dtype == torch.float32
    assert kernel.double() is kernel
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert kernel.dtype == torch.float64
    # through a GPyTorch container too
    ScaleKernel(kernel).to(torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert kernel.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_the_network_and_device_mismatch_is_an_error():
    model = _mlp()
    kernel = EmpiricalNTKKernel(model)
    x = _x(5, D, seed=23)
    expected = _dense(kernel, x)
    kernel.cuda()
    assert next(model.parameters()).is_cuda and kernel.device.type == "cuda"
    torch.testing.assert_close(_dense(kernel, x.cuda()).cpu(), expected)
    with pytest.raises(ValueError, match="network is on cuda"):
        _dense(kernel, x)


def test_dtype_rule_network_dtype_in_inputs_dtype_out():
    torch.manual_seed(0)
    model32 = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 2))
    model64 = copy.deepcopy(model32).double()
    x = _x(6, D, seed=18)
    K32 = _dense(EmpiricalNTKKernel(model32), x)  # float64 inputs, float32 network
    assert K32.dtype == torch.float64
    assert next(model32.parameters()).dtype == torch.float32  # the network is not converted
    K64 = _dense(EmpiricalNTKKernel(model64), x)
    torch.testing.assert_close(K32, K64, rtol=1e-5, atol=1e-6)
    assert not torch.equal(K32, K64)  # computed in float32
    K = _dense(EmpiricalNTKKernel(model64), x.float())
    assert K.dtype == torch.float32


def test_converting_the_lazy_operator_leaves_the_network_alone():
    model = _mlp()
    x = _x(5, D, seed=22)
    op = EmpiricalNTKKernel(model).forward(x, x)
    for converted in (op.to(torch.float32), op.type(torch.float32), op.float()):
        assert converted.to_dense().dtype == torch.float32
    assert op.cpu().to_dense().dtype == DTYPE
    assert all(p.dtype == DTYPE for p in model.parameters())
    torch.testing.assert_close(op.to(torch.float32).to_dense(), op.to_dense().float())


def test_gradient_reaches_the_inputs_but_not_the_weights():
    """The kernel is differentiable in x (checked against finite differences in test_empirical_autodiff)."""
    x = _x(4, D, seed=19).requires_grad_(True)
    model = _mlp()
    K = EmpiricalNTKKernel(model)(x).to_dense()
    assert K.requires_grad
    K.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.grad is None for p in model.parameters())


def test_pickle_and_deepcopy_round_trip():
    kernel = EmpiricalNTKKernel(_conv(), output=2)
    x = _x(5, D, seed=20)
    expected = _dense(kernel, x)
    for clone in (pickle.loads(pickle.dumps(kernel)), copy.deepcopy(kernel)):
        assert clone.model is not kernel.model and clone.output == 2 and clone.kind == "ntk"
        torch.testing.assert_close(_dense(clone, x), expected, rtol=0, atol=0)


# --- errors -----------------------------------------------------------------------------------
def test_errors():
    model = _mlp()
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        EmpiricalNTKKernel(frozen)
    with pytest.raises(ValueError, match="no trainable parameters"):
        EmpiricalNTKKernel(nn.ReLU())
    EmpiricalNTKKernel(frozen, kind="nngp")  # the NNGP needs no trainable parameters
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EmpiricalNTKKernel(lambda x: x)
    with pytest.raises(ValueError, match="kind must be"):
        EmpiricalNTKKernel(model, kind="rbf")
    for bad in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="output must be"):
            EmpiricalNTKKernel(model, output=bad)
    with pytest.raises(ValueError, match="output=3 but Sequential has 3 output channels"):
        _dense(EmpiricalNTKKernel(model, output=3), _x(4, D, seed=0))
    with pytest.raises(ValueError, match=r"inputs with 4 features .*x1 \(3, 4\).*expect 4 input features"):
        _dense(EmpiricalNTKKernel(model), _x(3, 4, seed=0))
    with pytest.raises(ValueError, match="4 features"):
        EmpiricalNTKKernel(model)(_x(3, 4, seed=0), diag=True)
    bad_x = _x(3, D, seed=0)
    bad_x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x1 contains 1 NaN or infinite"):
        _dense(EmpiricalNTKKernel(model), bad_x)
    with pytest.raises(ValueError, match="x2 contains 1 NaN or infinite"):
        _dense(EmpiricalNTKKernel(model), _x(3, D, seed=0), bad_x)
    with pytest.raises(ValueError, match="one row per input"):
        _dense(EmpiricalNTKKernel(nn.Sequential(nn.Linear(D, 2), nn.Flatten(0))), _x(3, D, seed=0))


# --- GPyTorch's kernel test-suite -------------------------------------------------------------
class _Moments(nn.Module):
    """Any number of features -> (mean, mean square, max): lets one network see the suite's varied inputs."""

    def forward(self, x):
        return torch.stack([x.mean(-1), x.square().mean(-1), x.amax(-1)], dim=-1)


class TestEmpiricalKernelSuite(Float64Defaults, BaseKernelTestCase, unittest.TestCase):
    seed = 0

    def create_kernel_no_ard(self, **kwargs):
        generator = torch.Generator().manual_seed(0)
        model = nn.Sequential(_Moments(), nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
        return EmpiricalNTKKernel(model, **kwargs)


# --- finite networks approach the infinite-width NTK ------------------------------------------
def test_average_over_finite_networks_approaches_the_infinite_width_ntk():
    net = gpntk.layers.mlp(1, "relu")
    d = 3
    x = _x(8, d, seed=21)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(20):
        model = net.finite(512, in_features=d, generator=generator).to(DTYPE)
        samples.append(_dense(EmpiricalNTKKernel(model), x))
    average = torch.stack(samples).mean(0)
    exact = _dense(gpntk.NTKKernel(net), x)

    def relative_error(K):
        return float(torch.linalg.matrix_norm(K - exact) / torch.linalg.matrix_norm(exact))

    # one network is ~7% off (fluctuations ~ 1/sqrt(width)); the average of 20 is ~2.4% off
    assert relative_error(average) < 0.035
    single = sum(relative_error(K) for K in samples) / len(samples)
    assert single > 2 * relative_error(average)
