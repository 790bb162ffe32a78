"""The recomputing backward of kernel matrices (gpntk.kernels.blocked.RecomputedKernels).

A kernel matrix of several blocks that needs gradients is filled without recording the recursion;
its backward recomputes each block. References: central finite differences (gradcheck,
gradgradcheck), and plain autograd through every block (``recompute_backward(False)``), which is
itself checked against finite differences in test_gradients.py. Small ``block_elements`` make
small kernels span many blocks.
"""

from __future__ import annotations

import gpytorch
import pytest
import torch

import gpntk
from gpntk import layers as L
from gpntk.core.hyperparameters import Hyperparameters
from gpntk.kernels.dense import evaluate

BLOCK = 24  # numbers per block: 4 x 6 pairs of vector inputs, so a 13 x 11 kernel spans 12 blocks


def mlp(activation: str = "relu") -> L.Layer:
    return gpntk.layers.mlp(depth=2, activation=activation, weight_variance=1.7, bias_variance=0.2)


def kernels_of(net: L.Layer, x1, x2, values: tuple[torch.Tensor, ...], input_shape=None, block=BLOCK):
    names = tuple(Hyperparameters.collect(net, like=x1))
    return evaluate(net, x1, x2, dict(zip(names, values)), input_shape=input_shape, block_elements=block)


def hyper_values(net: L.Layer, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(v.detach().clone().requires_grad_() for v in Hyperparameters.collect(net, like=like).values())


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_the_kernel_records_one_recomputing_node(activation):
    net = mlp(activation)
    x = torch.randn(13, 3, dtype=torch.float64, requires_grad=True)
    cov, ntk = kernels_of(net, x, x, hyper_values(net, x))
    assert "RecomputedKernels" in type(ntk.grad_fn).__name__
    with gpntk.settings.recompute_backward(False):
        cov, ntk = kernels_of(net, x, x, hyper_values(net, x))
    assert "RecomputedKernels" not in type(ntk.grad_fn).__name__


@pytest.mark.parametrize("activation", ["relu", "erf"])
@pytest.mark.parametrize("inputs", ["one tensor", "two tensors"])
def test_gradcheck_inputs_and_hyperparameters(activation, inputs):
    net = mlp(activation)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(13, 3, dtype=torch.float64, generator=g).requires_grad_()
    x2 = torch.randn(11, 3, dtype=torch.float64, generator=g).requires_grad_()
    values = hyper_values(net, x1)

    def both(a, b, *v):
        cov, ntk = kernels_of(net, a, a if inputs == "one tensor" else b, v)
        return cov, ntk

    assert torch.autograd.gradcheck(both, (x1, x2, *values), atol=1e-6, rtol=1e-5)


def test_gradgradcheck_second_derivatives():
    net = mlp("erf")
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(7, 2, dtype=torch.float64, generator=g).requires_grad_()
    x2 = torch.randn(6, 2, dtype=torch.float64, generator=g).requires_grad_()
    values = hyper_values(net, x1)
    assert torch.autograd.gradgradcheck(
        lambda a, b, *v: kernels_of(net, a, b, v, block=6)[1], (x1, x2, *values), atol=1e-6, rtol=1e-5
    )


def plain_and_recomputed(fn):
    """``fn()`` returns a scalar and the tensors to differentiate; their gradients, plain and recomputed."""
    results = []
    for on in (False, True):
        with gpntk.settings.recompute_backward(on):
            value, wrt = fn()
            results.append((value.detach(), torch.autograd.grad(value, wrt)))
    return results


@pytest.mark.parametrize("inputs", ["one tensor", "equal tensors", "two tensors"])
def test_gradients_equal_plain_autograd(inputs):
    net = mlp()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, dtype=torch.float64, generator=g).requires_grad_()
    y = {"one tensor": x, "equal tensors": x.detach().clone().requires_grad_(),
         "two tensors": torch.randn(33, 4, dtype=torch.float64, generator=g).requires_grad_()}[inputs]
    weights = torch.randn(2, 40, y.shape[0], dtype=torch.float64, generator=g)
    values = hyper_values(net, x)

    def loss():
        cov, ntk = kernels_of(net, x, y, values, block=100)
        wrt = (x, *values) if y is x else (x, y, *values)
        return (cov * weights[0]).sum() + (ntk * weights[1]).sum(), wrt

    (value0, grads0), (value1, grads1) = plain_and_recomputed(loss)
    torch.testing.assert_close(value1, value0, rtol=1e-13, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_spatial_and_batched_hyperparameters():
    """A CNN with pooling (spatial layouts) and a kernel with a batch of hyperparameters.

    Erf, not ReLU: the ReLU NTK's arccos at positions of correlation one turns rounding into
    relative differences of 1e-10 between any two summation orders (docs/numerics.md).
    """
    net = L.serial(L.Conv(1, 3, padding="same"), L.Erf(), L.GlobalAvgPool(), L.Dense())
    kernel = gpntk.NTKKernel(net, input_shape=(1, 5), batch_shape=torch.Size([2]), block_elements=200).double()
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 5, dtype=torch.float64, generator=g).requires_grad_()
    weights = torch.randn(2, 30, 30, dtype=torch.float64, generator=g)

    def loss():
        return (kernel(x).to_dense() * weights).sum(), (x, *kernel.parameters())

    (value0, grads0), (value1, grads1) = plain_and_recomputed(loss)
    torch.testing.assert_close(value1, value0, rtol=1e-13, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_marginal_likelihood_gradients_on_the_cg_path():
    """An ExactGP's MLL and its hyperparameter gradients (CG path) do not depend on how gradients are taken."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(120, 3, dtype=torch.float64, generator=g)
    y = torch.sin(4 * x[:, 0]) + 0.1 * torch.randn(120, dtype=torch.float64, generator=g)

    class GP(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(mlp(), block_elements=900))

        def forward(self, z):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    model = GP().double()
    model.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)

    def loss():
        torch.manual_seed(0)  # the same CG probe vectors
        with gpytorch.settings.max_cholesky_size(50), gpytorch.settings.cg_tolerance(1e-10):
            return -mll(model(x), y), tuple(model.parameters())

    (value0, grads0), (value1, grads1) = plain_and_recomputed(loss)
    torch.testing.assert_close(value1, value0, rtol=1e-10, atol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_torch_func_and_forward_mode_take_plain_autograd():
    net = mlp("erf")
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(13, 3, dtype=torch.float64, generator=g)
    x2 = torch.randn(11, 3, dtype=torch.float64, generator=g)
    values = hyper_values(net, x1)
    jac = torch.func.jacrev(lambda a: kernels_of(net, a, x2, values)[1])(x1)
    eps = 1e-6
    direction = torch.randn_like(x1)
    numeric = (kernels_of(net, x1 + eps * direction, x2, values)[1]
               - kernels_of(net, x1 - eps * direction, x2, values)[1]) / (2 * eps)
    torch.testing.assert_close(torch.einsum("ijkl,kl->ij", jac, direction), numeric.detach(), rtol=1e-6, atol=1e-7)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x1, direction)
        tangent = fwAD.unpack_dual(kernels_of(net, dual, x2, values)[1]).tangent
    torch.testing.assert_close(tangent, numeric.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("output", ["ntk", "nngp"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_one_stored_output_equals_both_and_keeps_its_gradients(output, requires_grad):
    """``evaluate_output`` stores one matrix only (the NTK without an n x n copy of Σ): the same values
    and gradients (inputs and hyperparameters) as the matching matrix of ``evaluate``."""
    from gpntk.kernels.blocked import fill_blocks
    from gpntk.kernels.dense import evaluate_output
    from gpntk.kernels.fusion import FusionPolicy

    net = mlp()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 3, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    values = hyper_values(net, x)
    names = tuple(Hyperparameters.collect(net, like=x))
    hyper = dict(zip(names, values))
    weights = torch.randn(17, 17, dtype=torch.float64, generator=g)
    cov, ntk = kernels_of(net, x, x, values)
    both = ntk if output == "ntk" else cov
    one = evaluate_output(net, x, x, hyper, output, block_elements=BLOCK)
    assert torch.equal(one, both)
    wrt = [*values, *([x] if requires_grad else [])]
    if output == "ntk":
        assert "RecomputedKernels" in type(one.grad_fn).__name__
        assert one.grad_fn.next_functions  # one output of the Function, recorded
    for a, b in zip(torch.autograd.grad((one * weights).sum(), wrt), torch.autograd.grad((both * weights).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        kept = fill_blocks(net, x, x, hyper, None, True, BLOCK, FusionPolicy(), keep=(False, True))
    assert kept[0] is None and torch.equal(kept[1], ntk)
