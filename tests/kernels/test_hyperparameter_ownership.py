"""A network's layers own its hyperparameters; kernels on one network share them, nothing else writes them.

Batched kernels work on their own copy, ``+`` of two kernels on one network is one kernel (the
network's priors counted once), compositions that would count a prior twice warn, state dicts
round-trip exactly or raise, and GPyTorch arguments gpntk does not use raise.
"""

from __future__ import annotations

import warnings

import gpytorch
import pytest
import torch
from gpytorch.kernels import AdditiveKernel, RBFKernel, ScaleKernel
from gpytorch.priors import GammaPrior

import gpntk
from gpntk import layers as L

DTYPE = torch.float64


def dense(kernel, x1, x2=None) -> torch.Tensor:
    with torch.no_grad():
        return kernel(x1, x1 if x2 is None else x2).to_dense()


# --- batched kernels never change a network someone else holds --------------------------------------
def test_batched_kernel_leaves_the_shared_network_alone():
    net = L.mlp(2, "relu", 2.0, 0.1)
    x = torch.randn(6, 3, dtype=DTYPE)
    unbatched = gpntk.NTKKernel(net)
    before = dense(unbatched, x)
    batched = gpntk.NNGPKernel(net, batch_shape=torch.Size([2]))
    # the original network keeps its scalar hyperparameters and the model built on it still works
    assert net.layers[0].raw_weight_variance.shape == (1, 1)
    torch.testing.assert_close(dense(unbatched, x), before, rtol=0, atol=0)
    # the batched kernel has its own batched copy
    assert batched.net is not net
    assert batched.net.layers[0].raw_weight_variance.shape == (2, 1, 1)
    batched.net.layers[0].weight_variance = torch.tensor([1.0, 3.0]).view(2, 1, 1)
    torch.testing.assert_close(dense(unbatched, x), before, rtol=0, atol=0)
    # each batch is the kernel of a network with that batch's values (an independent reference)
    K = dense(batched, x)
    for b, wv in enumerate([1.0, 3.0]):
        torch.testing.assert_close(K[b], dense(gpntk.NNGPKernel(L.mlp(2, "relu", wv, 0.1)), x))
    # a second batched kernel on the same network: independent of the first
    other = gpntk.NTKKernel(net, batch_shape=torch.Size([3]))
    assert other.net.layers[0].raw_weight_variance.shape == (3, 1, 1)


def test_batched_kernels_on_a_batched_network_share_it():
    """A network that already has the batch shape (another batched kernel's .net) is shared, not copied."""
    first = gpntk.NTKKernel(L.mlp(1, "erf"), batch_shape=torch.Size([2]))
    second = gpntk.NNGPKernel(first.net, batch_shape=torch.Size([2]))
    assert second.net is first.net


# --- + of two kernels on one network: one kernel, priors once ---------------------------------------
def prior_net() -> L.Serial:
    return L.serial(
        L.Dense(2.0, 0.1, weight_variance_prior=GammaPrior(3.0, 1.5)), L.ReLU(),
        L.Dense(1.5, 0.2, bias_variance_prior=GammaPrior(2.0, 4.0)),
    )


def prior_log_prob(model: gpytorch.Module) -> torch.Tensor:
    """The prior term GPyTorch's ExactMarginalLogLikelihood adds (its own loop)."""
    return sum(prior.log_prob(closure(module)).sum() for _, module, prior, closure, _ in model.named_priors())


def test_sum_on_one_network_counts_each_prior_once():
    net = prior_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpntk.CompositionWarning)
        kernel = gpntk.NTKKernel(net) + gpntk.NNGPKernel(net)
    assert isinstance(kernel, gpntk.NeuralKernelSum)
    expected = sum(
        prior.log_prob(value).sum()
        for prior, value in [
            (GammaPrior(3.0, 1.5), net.layers[0].weight_variance),
            (GammaPrior(2.0, 4.0), net.layers[2].bias_variance),
        ]
    )
    torch.testing.assert_close(prior_log_prob(kernel), expected)
    # and it is the sum of the two kernels (each evaluated on its own)
    x1, x2 = torch.randn(7, 3, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)
    reference = dense(gpntk.NTKKernel(net), x1, x2) + dense(gpntk.NNGPKernel(net), x1, x2)
    torch.testing.assert_close(dense(kernel, x1, x2), reference, rtol=1e-12, atol=1e-12)
    diag = kernel(x1, diag=True)
    torch.testing.assert_close(diag, dense(kernel, x1).diagonal(), rtol=1e-12, atol=1e-12)


def test_neural_kernel_sum_weights_and_gradients():
    net = L.mlp(2, "erf", 2.0, 0.3)
    kernel = gpntk.NeuralKernelSum(net, ntk_weight=0.5, nngp_weight=2.0)
    x = torch.randn(6, 2, dtype=DTYPE)
    reference = 0.5 * dense(gpntk.NTKKernel(net), x) + 2.0 * dense(gpntk.NNGPKernel(net), x)
    torch.testing.assert_close(dense(kernel, x), reference, rtol=1e-12, atol=1e-12)
    # sums keep adding weights
    assert (kernel + gpntk.NTKKernel(net)).ntk_weight == 1.5
    # the gradient with respect to σw² is the sum of the two kernels' gradients
    kernel(x).to_dense().sum().backward()
    grad = net.layers[0].raw_weight_variance.grad.clone()
    net.zero_grad()
    (0.5 * gpntk.NTKKernel(net)(x).to_dense().sum() + 2.0 * gpntk.NNGPKernel(net)(x).to_dense().sum()).backward()
    torch.testing.assert_close(grad, net.layers[0].raw_weight_variance.grad)
    with pytest.raises(ValueError, match="ntk_weight"):
        gpntk.NeuralKernelSum(net, ntk_weight=-1.0)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda net: ScaleKernel(gpntk.NTKKernel(net)) + gpntk.NNGPKernel(net), id="scale+nngp"),
        pytest.param(lambda net: AdditiveKernel(gpntk.NTKKernel(net), gpntk.NNGPKernel(net)), id="additive"),
        pytest.param(lambda net: gpntk.NTKKernel(net) * gpntk.NNGPKernel(net), id="product"),
        pytest.param(lambda net: RBFKernel() * gpntk.NTKKernel(net) + ScaleKernel(gpntk.NTKKernel(net)), id="nested"),
    ],
)
def test_composition_counting_a_prior_twice_warns_once(build):
    net = prior_net()
    with pytest.warns(gpntk.CompositionWarning, match="counts it 2 times") as caught:
        kernel = build(net)
    assert sum(issubclass(w.category, gpntk.CompositionWarning) for w in caught) == 1
    # the warning is true: GPyTorch's prior term is twice the prior's log density
    single = gpntk.NTKKernel(prior_net())
    torch.testing.assert_close(prior_log_prob(kernel), 2 * prior_log_prob(single))


def test_model_holding_two_kernels_on_one_network_warns():
    net = prior_net()

    class Model(gpytorch.Module):
        def __init__(self):
            super().__init__()
            self.first = gpntk.NTKKernel(net)
            self.second = gpntk.NNGPKernel(net)

    with pytest.warns(gpntk.CompositionWarning, match="Model"):
        Model()


def test_no_warning_without_priors_or_sharing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", gpntk.CompositionWarning)
        net = L.mlp(2, "relu")
        ScaleKernel(gpntk.NTKKernel(net)) + gpntk.NNGPKernel(net)  # no priors: nothing counted twice
        ScaleKernel(gpntk.NTKKernel(prior_net())) + gpntk.NNGPKernel(prior_net())  # two networks
        shared = prior_net()
        kernel = gpntk.NTKKernel(shared)
        AdditiveKernel(kernel, kernel)  # one module listed twice: torch lists it once
        L.mlp(2, "relu", shared=True)


# --- state dicts -------------------------------------------------------------------------------------
def test_state_dict_with_conflicting_values_for_a_shared_parameter_raises():
    source = L.mlp(2, "relu", shared=False)
    source.layers[0].weight_variance = 1.3
    source.layers[4].bias_variance = 0.7
    target = L.mlp(2, "relu", shared=True)
    with pytest.raises(RuntimeError, match=r"layers\.0\.raw_weight_variance and layers\.2\.raw_weight_variance"):
        target.load_state_dict(source.state_dict())


def test_state_dict_round_trips_exactly():
    x = torch.randn(5, 3, dtype=DTYPE)
    shared = L.mlp(2, "relu", shared=True).double()
    shared.layers[0].weight_variance = 1.7
    # shared -> shared, and shared -> unshared (every key holds the same values)
    for target in (L.mlp(2, "relu", shared=True).double(), L.mlp(2, "relu", shared=False).double()):
        target.load_state_dict(shared.state_dict())
        torch.testing.assert_close(dense(gpntk.NTKKernel(target), x), dense(gpntk.NTKKernel(shared), x), rtol=0, atol=0)
    # unshared with equal values -> shared
    equal = L.mlp(2, "relu", shared=False)
    L.mlp(2, "relu", shared=True).load_state_dict(equal.state_dict())
    # a model holding two kernels on one network: keys of both must agree
    model = AdditiveKernel(ScaleKernel(gpntk.NTKKernel(shared)), gpntk.NNGPKernel(shared))
    state = model.state_dict()
    state["kernels.1.net.layers.0.raw_weight_variance"] = state["kernels.1.net.layers.0.raw_weight_variance"] + 1
    with pytest.raises(RuntimeError, match="one shared parameter"):
        model.load_state_dict(state)


# --- arguments gpntk does not use ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel, gpntk.NeuralKernelSum])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"ard_num_dims": 3},
        {"lengthscale_prior": GammaPrior(2.0, 1.0)},
        {"lengthscale_constraint": None},
        {"eps": 1e-3},
        {"foo": 1},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_unsupported_kernel_arguments_raise(cls, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=rf"{cls.__name__} does not take {name}="):
        cls(L.mlp(1), **kwargs)


def test_neural_kernel_sum_matrix_free():
    """The blockwise backend gives the same matrix and products as the dense one."""
    net = L.mlp(2, "relu", 2.0, 0.1)
    x = torch.randn(40, 3, dtype=DTYPE)
    rhs = torch.randn(40, 2, dtype=DTYPE)
    reference = 0.5 * dense(gpntk.NTKKernel(net), x) + 2.0 * dense(gpntk.NNGPKernel(net), x)
    kernel = gpntk.NeuralKernelSum(net, ntk_weight=0.5, nngp_weight=2.0, backend="blockwise", block_elements=256)
    with torch.no_grad():
        operator = kernel(x).evaluate_kernel()
        torch.testing.assert_close(operator @ rhs, reference @ rhs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(operator.to_dense(), reference, rtol=1e-12, atol=1e-12)


def test_layer_reused_in_nested_blocks_warns_when_the_kernel_is_built():
    """A prior-carrying layer reached through two sub-blocks of one network is counted twice by GPyTorch."""
    shared = L.Dense(2.0, 0.1, weight_variance_prior=GammaPrior(3.0, 1.5))
    net = L.serial(L.serial(shared, L.ReLU()), L.serial(shared, L.ReLU()), L.Dense(1.0, 0.1))
    with pytest.warns(gpntk.CompositionWarning, match="counts it 2 times"):
        kernel = gpntk.NTKKernel(net)
    torch.testing.assert_close(prior_log_prob(kernel), 2 * GammaPrior(3.0, 1.5).log_prob(shared.weight_variance).sum())
