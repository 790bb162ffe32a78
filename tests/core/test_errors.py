"""Bad input fails early with an error that names the problem."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from torch import nn

import gpntk
from gpntk import ArchitectureError
from gpntk import layers as L
from gpntk.activations import activation_from_name

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture(params=[gpntk.NTKKernel, gpntk.NNGPKernel], ids=["ntk", "nngp"])
def kernel(request):
    return request.param(L.mlp(2, "relu"))


def evaluate(kernel, *args, **kwargs):
    """Call the kernel and force the (otherwise lazy) evaluation."""
    out = kernel(*args, **kwargs)
    return out if torch.is_tensor(out) else out.to_dense()


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs(kernel, bad_value):
    x = torch.randn(4, 3)
    bad = x.clone()
    bad[2, 1] = bad_value
    with pytest.raises(ValueError, match=r"x1 contains 1 NaN or infinite value"):
        evaluate(kernel, bad, x)
    with pytest.raises(ValueError, match=r"x2 contains 1 NaN or infinite value"):
        evaluate(kernel, x, bad)
    with pytest.raises(ValueError, match=r"x1 contains 1 NaN or infinite value"):
        evaluate(kernel, bad)
    with pytest.raises(ValueError, match=r"x1 contains 1 NaN or infinite value"):
        kernel(bad, diag=True)
    with pytest.raises(ValueError, match=r"x2 contains 1 NaN or infinite value"):
        kernel(x, bad, diag=True)


def test_non_finite_inputs_inside_a_gp_model():
    train_x = torch.randn(6, 2)
    train_x[0, 0] = math.nan
    model = gpytorch.models.ExactGP(train_x, torch.randn(6), gpytorch.likelihoods.GaussianLikelihood())
    covar = gpntk.NTKKernel(L.mlp(1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        covar(model.train_inputs[0]).to_dense()


def test_mismatched_feature_dimensions(kernel):
    x1, x2 = torch.randn(4, 3), torch.randn(5, 2)
    # GPyTorch's Kernel.__call__ checks this first, with its own message
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        evaluate(kernel, x1, x2)
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        kernel(x1, torch.randn(4, 2), diag=True)
    # our forward names the feature counts (reached e.g. through KernelLinearOperator slicing)
    with pytest.raises(ValueError, match=r"x1 has 3 features but x2 has 2"):
        kernel.forward(x1, x2)


def test_diag_needs_as_many_points_in_x1_and_x2(kernel):
    with pytest.raises(ValueError, match=r"diag=True.*same|as many points.*got 4 and 3"):
        kernel(torch.randn(4, 3), torch.randn(3, 3), diag=True)


def test_mixed_float_dtypes(kernel):
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"x1 is torch.float32 but x2 is torch.float64"):
        evaluate(kernel, x.float(), x)
    with pytest.raises(TypeError, match=r"x1 is torch.float64 but x2 is torch.float32"):
        evaluate(kernel, x, x.float())
    with pytest.raises(TypeError, match=r"x1 is torch.float32 but x2 is torch.float64"):
        kernel(x.float(), x, diag=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_non_float_inputs(kernel, dtype):
    ints = torch.ones(4, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x1 must be a floating-point tensor, got dtype {dtype}"):
        evaluate(kernel, ints)
    with pytest.raises(TypeError, match=rf"x2 must be a floating-point tensor, got dtype {dtype}"):
        evaluate(kernel, torch.randn(4, 3), ints)
    with pytest.raises(TypeError, match="floating-point"):
        kernel(ints, diag=True)


def test_input_shape_mismatch():
    cnn = L.serial(L.Conv(2, weight_variance=2.0), L.ReLU(), L.Flatten(), L.Dense())
    kernel = gpntk.NTKKernel(cnn, input_shape=(2, 3))
    with pytest.raises(ValueError, match=r"input_shape \(2, 3\) needs 6 features per row, got 5"):
        evaluate(kernel, torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"input_shape \(2, 3\) needs 6 features per row, got 5"):
        kernel(torch.randn(4, 5), diag=True)
    evaluate(kernel, torch.randn(4, 6))  # the right size works


@pytest.mark.parametrize("bad", [(0, 2), (-1,), (), 3, "abc", (2.5, 3), (2, "x"), (True, 3)], ids=repr)
def test_invalid_input_shape(bad):
    with pytest.raises(ValueError, match="input_shape must be a sequence of positive integers"):
        gpntk.NTKKernel(L.mlp(1), input_shape=bad)


def test_inputs_without_points_dimension(kernel):
    with pytest.raises(ValueError, match=r"x1 must have shape \(\.\.\., n, d\)"):
        kernel.forward(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="zero features"):
        evaluate(kernel, torch.randn(3, 0))


def test_incompatible_batch_shapes():
    kernel = gpntk.NTKKernel(L.mlp(1), batch_shape=torch.Size([2]))
    with pytest.raises(RuntimeError, match="incompatible with data shapes"):
        evaluate(kernel, torch.randn(3, 4, 2))
    with pytest.raises(RuntimeError, match="Incompatible data shapes"):
        evaluate(gpntk.NTKKernel(L.mlp(1)), torch.randn(2, 3, 2), torch.randn(3, 3, 2))


def test_last_dim_is_batch_with_structured_inputs_is_refused_at_call_time():
    """Rows of images, sequences or graphs have no separate features: refused when called, not when evaluated."""
    net = L.serial(L.Conv(1, 3, padding="same"), L.Erf(), L.GlobalAvgPool(), L.Dense())
    kernel = gpntk.NTKKernel(net, input_shape=(1, 5))
    x = torch.randn(4, 5)
    for call in (lambda: kernel(x, x, last_dim_is_batch=True), lambda: kernel(x, diag=True, last_dim_is_batch=True),
                 lambda: kernel.forward(x, x, last_dim_is_batch=True)):
        with pytest.raises(ValueError, match=r"input_shape=\(1, 5\) cannot take last_dim_is_batch=True"):
            call()


# --------------------------------------------------------------------------------------------
# Dense hyperparameters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight_variance=-1.0), r"weight_variance is a variance and must be positive, got -1\.0"),
        (dict(weight_variance=0.0), r"weight_variance is a variance and must be positive, got 0\.0"),
        (dict(weight_variance=math.nan), r"weight_variance must be finite, got nan"),
        (dict(weight_variance=math.inf), r"weight_variance must be finite, got inf"),
        (dict(weight_variance="big"), r"weight_variance must be a number, got 'big'"),
        (dict(bias_variance=-0.1), r"bias_variance is a variance and must be non-negative, got -0\.1"),
        (dict(bias_variance=math.nan), r"bias_variance must be finite, got nan"),
        (dict(trainable="yes"), r"trainable must be True or False"),
        (dict(parameterization="standard"), r"Dense with parameterization='standard' needs in_width"),
        (dict(parameterization="mup", in_width=3), r"Dense parameterization must be 'ntk' or 'standard', got 'mup'"),
        (dict(in_width=3), r"Dense got in_width=3 with parameterization='ntk'"),
        (dict(parameterization="standard", in_width=0), r"in_width must be a positive integer, got 0"),
        (dict(parameterization="standard", in_width=2.0), r"in_width must be a positive integer, got 2\.0"),
        (dict(parameterization="standard", in_width=True), r"in_width must be a positive integer"),
    ],
)
def test_dense_rejects_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ArchitectureError, match=message):
        L.Dense(**kwargs)


def test_architecture_error_is_a_value_error():
    assert issubclass(ArchitectureError, ValueError)


def test_mlp_forwards_invalid_variances():
    with pytest.raises(ArchitectureError, match="weight_variance"):
        L.mlp(2, "relu", weight_variance=-2.0)
    with pytest.raises(ArchitectureError, match="bias_variance"):
        L.mlp(2, "relu", bias_variance=-0.1)


@pytest.mark.parametrize("name", ["weight_variance", "bias_variance"])
@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, math.inf, torch.tensor([[-0.5]])], ids=str)
def test_setting_an_invalid_variance_through_the_property(name, value):
    layer = L.Dense(weight_variance=2.0, bias_variance=0.1)
    before = getattr(layer, name).clone()
    with pytest.raises(ValueError, match=rf"{name} must be positive and finite"):
        setattr(layer, name, value)
    torch.testing.assert_close(getattr(layer, name), before)  # unchanged


def test_setting_bias_of_a_layer_without_bias():
    layer = L.Dense(weight_variance=2.0, bias_variance=0.0)
    with pytest.raises(ValueError, match=r"built without bias"):
        layer.bias_variance = 0.5


def test_invalid_priors():
    with pytest.raises(TypeError, match="weight_variance_prior must be a gpytorch.priors.Prior, got str"):
        L.Dense(weight_variance_prior="gamma")
    with pytest.raises(ArchitectureError, match="bias_variance_prior was given but bias_variance is 0"):
        L.Dense(bias_variance=0.0, bias_variance_prior=gpytorch.priors.GammaPrior(1.0, 1.0))


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------
def test_two_nonlinearities_in_a_row():
    with pytest.raises(ArchitectureError, match=r"Erf needs Gaussian pre-activations.*not ReLU"):
        L.serial(L.Dense(), L.ReLU(), L.Erf(), L.Dense())
    with pytest.raises(ArchitectureError, match=r"Tanh .*not GELU"):
        L.serial(L.Dense(), L.GELU(), L.Tanh())


def test_activation_right_after_the_input():
    """A block may start with an activation (it can be nested after a Dense), a network may not."""
    starts_with_relu = L.serial(L.ReLU(), L.Dense())
    with pytest.raises(ArchitectureError, match=r"ReLU needs Gaussian pre-activations.*not the input"):
        gpntk.NTKKernel(starts_with_relu)
    with pytest.raises(ArchitectureError, match=r"ReLU needs Gaussian pre-activations.*not the input"):
        starts_with_relu.finite(8)
    with pytest.raises(ArchitectureError, match=r"Erf .*follow an affine layer.*not the input"):
        gpntk.NNGPKernel(L.serial(L.Erf(), L.Dense(), L.ReLU(), L.Dense()))
    # the same block nested after a Dense is a valid network
    gpntk.NTKKernel(L.serial(L.Dense(), starts_with_relu))


def test_architecture_errors_happen_at_build_time_not_in_the_kernel():
    """serial() checks when built: nothing invalid can reach a kernel."""
    with pytest.raises(ArchitectureError):
        L.serial(L.Dense(), L.Abs(), L.Sign())
    # a nested serial is checked in its context too: what it hands on is what its last layer does
    block = L.serial(L.Dense(), L.ReLU())
    with pytest.raises(ArchitectureError, match=r"Erf .*not ReLU"):
        L.serial(block, L.Erf(), L.Dense())
    L.serial(block, L.Dense())  # valid


@pytest.mark.parametrize("name", ["relux", "Rectifier", "", "tanhh"])
def test_unknown_activation_names(name):
    with pytest.raises(ArchitectureError, match=rf"unknown activation {name!r}; known names: .*relu"):
        L.mlp(2, name)
    with pytest.raises(ArchitectureError, match=rf"unknown activation {name!r}"):
        activation_from_name(name)


def test_activation_names_are_forgiving_but_not_arbitrary():
    assert isinstance(activation_from_name("ReLU"), L.ReLU)
    assert isinstance(activation_from_name("leaky-relu"), L.LeakyReLU)
    with pytest.raises(ArchitectureError, match="activation must be a name or an Activation layer, got 3"):
        activation_from_name(3)
    with pytest.raises(TypeError, match=r"mlp\(\) got an unexpected keyword argument 'slope'"):
        L.mlp(1, "relu", slope=0.1)
    with pytest.raises(ArchitectureError, match="keyword arguments are only accepted with an activation name"):
        L.mlp(1, L.Erf(), a=2.0)


@pytest.mark.parametrize("thing", [nn.ReLU(), nn.Linear(2, 2), "relu", 3, None], ids=repr)
def test_non_layers_in_serial(thing):
    with pytest.raises(ArchitectureError, match=rf"serial\(\) takes gpntk layers, got {type(thing).__name__}"):
        L.serial(L.Dense(), thing, L.Dense())


def test_empty_serial():
    with pytest.raises(ArchitectureError, match="at least one layer"):
        L.serial()


@pytest.mark.parametrize("depth", [-1, -5, 1.5, True, "3", None], ids=repr)
def test_invalid_depth(depth):
    with pytest.raises(ArchitectureError, match=rf"depth must be a non-negative integer, got {depth!r}"):
        L.mlp(depth, "relu")


@pytest.mark.parametrize("cls", [gpntk.NTKKernel, gpntk.NNGPKernel])
@pytest.mark.parametrize("net", [nn.Linear(3, 1), nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "relu", None], ids=repr)
def test_kernel_of_a_non_layer(cls, net):
    message = rf"{cls.__name__} needs an architecture built from gpntk.layers, got {type(net).__name__}"
    with pytest.raises(TypeError, match=message):
        cls(net)


def test_incompatible_batch_shapes_on_a_shared_net():
    """Batched kernels copy the network, so kernels of different batch shapes on one net coexist."""
    net = L.mlp(1)
    first = gpntk.NTKKernel(net, batch_shape=torch.Size([2]))
    second = gpntk.NNGPKernel(net, batch_shape=torch.Size([3]))
    assert net.layers[0].raw_weight_variance.shape == (1, 1)
    assert first.net.layers[0].raw_weight_variance.shape == (2, 1, 1)
    assert second.net.layers[0].raw_weight_variance.shape == (3, 1, 1)
    # a network that already has a batch shape cannot take another one
    with pytest.raises(ValueError, match=r"batch shape \(2,\).*\(3,\)"):
        gpntk.NNGPKernel(first.net, batch_shape=torch.Size([3]))


# --- invalid architectures (issue 4 layers) -------------------------------------------------------
def _relu_dense():
    return [L.ReLU(), L.Dense(2.0, 0.1)]


@pytest.mark.parametrize(
    "build, input_shape, message",
    [
        (lambda: L.serial(L.Conv(3), L.ReLU(), L.Flatten(), L.Dense()), None,
         r"Conv needs spatial inputs .*input_shape=\(C, W\)"),
        (lambda: L.serial(L.Conv(3), L.ReLU(), L.Flatten(), L.Conv(3), L.Dense()), (1, 8),
         r"Conv needs spatial inputs \(channels first\), but the outputs of Flatten are vectors"),
        (lambda: L.serial(L.Conv(5, padding="valid"), L.ReLU(), L.Flatten(), L.Dense()), (1, 4),
         r"kernel_size \(5,\), larger than its input's spatial shape \(4,\), with padding='valid'"),
        (lambda: L.serial(L.Conv((2, 2)), L.ReLU(), L.Flatten(), L.Dense()), (1, 6),
         r"kernel_size=\(2, 2\) \(2 axes\) but its inputs have spatial shape \(6,\)"),
        (lambda: L.serial(L.Conv(3), L.ReLU(), L.Flatten(), L.ReLU(), L.Dense()), (1, 6),
         r"ReLU needs Gaussian pre-activations.*not Flatten.*put a Dense between Flatten and ReLU"),
        (lambda: L.serial(L.Conv(3), L.ReLU(), L.Dense()), (1, 6),
         r"outputs still have spatial shape \(6,\).*Flatten\(\) or GlobalAvgPool\(\)"),
        (lambda: L.serial(L.GlobalAvgPool(), L.Dense()), None, r"GlobalAvgPool needs spatial inputs"),
        (lambda: L.serial(L.AvgPool(2), L.Flatten(), L.Dense()), None, r"AvgPool needs spatial inputs"),
        (lambda: L.serial(L.Dense(), L.ReLU(), L.LayerNorm(), L.Dense()), None,
         r"LayerNorm needs Gaussian pre-activations.*not ReLU"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.parallel(L.Conv(2, padding="valid"), L.Identity()), L.FanInSum(),
                          L.Flatten(), L.Dense()), (1, 5),
         r"FanInSum gets branches of different spatial shapes \[\(4,\), \(5,\)\]"),
        (lambda: L.serial(L.FanOut(2), L.parallel(L.Dense(), L.Identity()), L.FanInSum(), L.Dense()), None,
         r"FanInSum gets a branch with the network's input features and one with hidden features"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.parallel(L.ReLU(), L.Erf()), L.FanInSum(), L.Dense()), None,
         r"FanInSum of branches \[0, 1\] is not computable.*end all branches but one with Dense or Conv"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.parallel(L.ReLU(), L.Identity()), L.FanInProd(), L.Dense()), None,
         r"FanInProd of branches \[0, 1\] is not computable"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.parallel(L.ReLU(), L.Erf())), None,
         r"the network ends with 2 parallel branches; combine them"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.ReLU(), L.Dense()), None,
         r"ReLU gets the 2 branches of a FanOut; apply parallel"),
        (lambda: L.serial(L.Dense(), L.parallel(L.ReLU(), L.Erf()), L.FanInSum(), L.Dense()), None,
         r"parallel\(\) with 2 branches needs FanOut\(2\) before it, not Dense"),
        (lambda: L.serial(L.Dense(), L.FanOut(3), L.parallel(L.ReLU(), L.Erf()), L.FanInConcat(), L.Dense()), None,
         r"parallel\(\) has 2 branches but gets 3 inputs"),
        (lambda: L.serial(L.Dense(), L.FanInSum(), L.Dense()), None,
         r"FanInSum merges the branches of a FanOut, but gets one input \(Dense\)"),
        (lambda: L.serial(L.Dense(), L.FanOut(2), L.parallel(L.ReLU(), L.Erf()), L.FanInConcat(), L.ReLU(), L.Dense()),
         None, r"ReLU needs Gaussian pre-activations.*not FanInConcat"),
    ],
)
def test_invalid_architectures_are_explained(build, input_shape, message):
    with pytest.raises(gpntk.ArchitectureError, match=message):
        net = build()
        gpntk.NTKKernel(net, input_shape=input_shape)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: L.Conv(3, padding="full"), r"padding must be one of \('same', 'valid', 'circular'\), got 'full'"),
        (lambda: L.Conv(0), r"kernel_size must be a positive integer, got 0"),
        (lambda: L.Conv(3, stride=1.5), r"stride must be a positive integer, got 1.5"),
        (lambda: L.AvgPool((2, -1)), r"kernel_size must be a positive integer, got -1"),
        (lambda: L.FanOut(0), r"FanOut num must be a positive integer, got 0"),
        (lambda: L.parallel(), r"parallel\(\) needs at least one branch"),
        (lambda: L.parallel(L.ReLU(), "relu"), r"parallel\(\) takes gpntk layers or lists of them, got str"),
        (lambda: L.Conv(3, weight_variance=-1.0), r"weight_variance is a variance and must be positive, got -1.0"),
    ],
)
def test_invalid_layer_arguments_are_explained(build, message):
    with pytest.raises(gpntk.ArchitectureError, match=message):
        build()


def test_finite_network_of_a_cnn_needs_the_input_shape():
    cnn = L.serial(L.Conv(3), L.ReLU(), L.Flatten(), L.Dense())
    with pytest.raises(gpntk.ArchitectureError, match="Conv needs spatial inputs"):
        cnn.finite(8)
    with pytest.raises(ValueError, match=r"in_features=10 does not match input_shape \(1, 8\)"):
        cnn.finite(8, in_features=10, input_shape=(1, 8))


def test_finite_branches_of_different_widths_are_explained():
    net = L.serial(L.Dense(), L.FanOut(2), L.parallel([L.ReLU(), L.Dense()], L.Identity()), L.FanInSum())
    gpntk.NTKKernel(net)  # fine as a kernel (per output channel)
    message = r"FanInSum gets branches of finite shapes \[\(1,\), \(8,\)\].*readout Dense"
    with pytest.raises(gpntk.ArchitectureError, match=message):
        net.finite(8, in_features=3)
