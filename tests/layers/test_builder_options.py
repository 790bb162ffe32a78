"""Priors, constraints and unknown keyword arguments of the layer builders; the default σb²; default priors."""

from __future__ import annotations

import math

import gpytorch
import pytest
import torch
from gpytorch.constraints import GreaterThan, Interval
from gpytorch.priors import GammaPrior, LogNormalPrior

import gpntk
from gpntk import layers as L


def _priors(module: torch.nn.Module) -> dict[str, gpytorch.priors.Prior]:
    return {name: prior for name, _, prior, _, _ in module.named_priors()}


def test_mlp_takes_priors_and_constraints():
    prior, bias_prior = GammaPrior(2.0, 1.0), LogNormalPrior(math.log(0.1), 1.0)
    shared = L.mlp(2, "relu", weight_variance_prior=prior, bias_variance_prior=bias_prior,
                   weight_variance_constraint=Interval(0.5, 8.0), bias_variance_constraint=GreaterThan(1e-4))
    dense = shared.layers[0]
    assert _priors(shared) == {"layers.0.weight_variance_prior": prior, "layers.0.bias_variance_prior": bias_prior}
    assert type(dense.raw_weight_variance_constraint) is Interval
    assert dense.raw_bias_variance_constraint.lower_bound.item() == pytest.approx(1e-4)
    # the prior is evaluated on the constrained value, and counted once for the shared layer
    model = gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(shared))
    # what ExactMarginalLogLikelihood adds: one term per prior
    terms = [prior.log_prob(closure(module)).sum() for _, module, prior, closure, _ in model.named_priors()]
    expected = prior.log_prob(torch.tensor(2.0)) + bias_prior.log_prob(torch.tensor(0.1))
    torch.testing.assert_close(sum(terms), expected)
    assert len(list(model.named_priors())) == 2
    # shared=False: each layer its own copy of the prior (same distribution, other objects)
    unshared = L.mlp(2, "relu", weight_variance_prior=prior, shared=False)
    priors = _priors(unshared)
    assert sorted(priors) == [f"layers.{i}.weight_variance_prior" for i in (0, 2, 4)]
    assert len({id(p) for p in priors.values()}) == 3
    for p in priors.values():
        torch.testing.assert_close(p.log_prob(torch.tensor(1.3)), prior.log_prob(torch.tensor(1.3)))


def test_unknown_keyword_arguments_name_the_builder_and_the_argument():
    with pytest.raises(TypeError, match=r"mlp\(\) got an unexpected keyword argument 'weight_varience_prior' "
                       r"\(did you mean 'weight_variance_prior'\?\)"):
        L.mlp(2, "relu", weight_varience_prior=GammaPrior(2.0, 1.0))
    with pytest.raises(TypeError, match=r"mlp\(\) got an unexpected keyword argument 'slope'.*negative_slope"):
        L.mlp(2, "leaky_relu", slope=0.2)
    assert isinstance(L.mlp(2, "leaky_relu", negative_slope=0.2).layers[1], L.LeakyReLU)
    for builder, call in (
        ("Dense", lambda: L.Dense(2.0, weight_prior=GammaPrior(2.0, 1.0))),
        ("Conv", lambda: L.Conv(3, weight_prior=GammaPrior(2.0, 1.0))),
        ("ConvTranspose", lambda: L.ConvTranspose(3, weight_prior=GammaPrior(2.0, 1.0))),
        ("ConvLocal", lambda: L.ConvLocal(3, weight_prior=GammaPrior(2.0, 1.0))),
        ("GlobalSelfAttention", lambda: L.GlobalSelfAttention(1, weight_prior=GammaPrior(2.0, 1.0))),
        ("gntk", lambda: L.gntk(1, weight_prior=GammaPrior(2.0, 1.0))),
    ):
        with pytest.raises(TypeError, match=rf"{builder}\b.*unexpected keyword argument 'weight_prior'"):
            call()


@pytest.mark.parametrize("builder", [L.Conv, L.ConvTranspose, L.ConvLocal])
def test_convolutions_take_priors_and_constraints(builder):
    prior = GammaPrior(3.0, 2.0)
    layer = builder(3, weight_variance=1.5, bias_variance=0.2, weight_variance_prior=prior,
                    bias_variance_constraint=Interval(0.01, 1.0))
    assert _priors(layer) == {"weight_variance_prior": prior}
    assert type(layer.raw_bias_variance_constraint) is Interval
    assert layer.bias_variance.item() == pytest.approx(0.2)


def test_attention_and_gntk_take_priors_and_constraints():
    prior = GammaPrior(3.0, 2.0)
    attention = L.GlobalSelfAttention(1, bias_variance=0.1, priors={"key_variance": prior},
                                      constraints={"bias_variance": Interval(0.01, 1.0)})
    assert _priors(attention) == {"key_variance_prior": prior}
    net = L.gntk(
        2, 1, jumping_knowledge=False, weight_variance_prior=prior, readout_variance_prior=GammaPrior(2.0, 2.0),
        weight_variance_constraint=Interval(0.5, 5.0),
    )
    priors = _priors(net)
    dense = [m for m in net.modules() if isinstance(m, L.Dense)]
    assert len(dense) == 3 and len(priors) == 3  # two hidden Dense and the readout, each with its own prior
    assert sum(type(d.raw_weight_variance_constraint) is Interval for d in dense) == 2


def test_invalid_constraints_and_options_for_layers_without_bias():
    with pytest.raises(TypeError, match="weight_variance_constraint must be a gpytorch.constraints.Interval"):
        L.Dense(weight_variance_constraint="positive")
    with pytest.raises(gpntk.ArchitectureError, match="bias_variance_constraint was given but bias_variance is 0"):
        L.Dense(bias_variance=0.0, bias_variance_constraint=GreaterThan(0.0))
    with pytest.raises(gpntk.ArchitectureError, match="shared must be True or False"):
        L.mlp(2, "relu", shared="yes")


def test_dense_and_mlp_agree_on_the_default_bias():
    dense, net = L.Dense(), L.mlp(1)
    assert dense.has_bias and net.layers[0].has_bias
    assert dense.bias_variance.item() == pytest.approx(net.layers[0].bias_variance.item()) == pytest.approx(0.1)
    # σb² = 0 is the layer without bias (Neural Tangents' stax.Dense default): no parameter at all
    assert "raw_bias_variance" not in dict(L.Dense(2.0, 0.0).named_parameters())
    with pytest.raises(ValueError, match=r"built without bias .* build the layer with a positive initial value"):
        L.Dense(2.0, 0.0).bias_variance = 0.1


def test_default_priors_centre_log_normal_priors_on_the_current_values():
    readout = L.Dense(1.0, 0.3, bias_variance_prior=GammaPrior(1.0, 1.0))
    net = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dense(1.5, 0.0), L.Erf(), readout)
    assert L.default_priors(net, weight_scale=0.4, bias_scale=2.0) is net
    priors = _priors(net)
    assert sorted(priors) == [
        "layers.0.bias_variance_prior", "layers.0.weight_variance_prior", "layers.2.weight_variance_prior",
        "layers.4.bias_variance_prior", "layers.4.weight_variance_prior",
    ]
    assert isinstance(priors["layers.4.bias_variance_prior"], GammaPrior)  # a prior given by the user is kept
    # log v ~ N(log v0, s²): the density of a log-normal, written out
    for key, v0, s in (("layers.0.weight_variance_prior", 2.0, 0.4), ("layers.0.bias_variance_prior", 0.1, 2.0),
                       ("layers.2.weight_variance_prior", 1.5, 0.4)):
        v = torch.tensor(0.7)
        log_v = torch.log(v)
        expected = -log_v - math.log(s * math.sqrt(2 * math.pi)) - (log_v - math.log(v0)) ** 2 / (2 * s**2)
        torch.testing.assert_close(priors[key].log_prob(v).squeeze(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_scale must be positive"):
        L.default_priors(L.mlp(1), weight_scale=0.0)
    with pytest.raises(ValueError, match="no learnable variance"):
        L.default_priors(L.serial(L.Flatten()))
    with pytest.raises(TypeError, match="pass kernel.net"):
        L.default_priors(gpntk.NTKKernel(L.mlp(1)))


def test_default_priors_keep_variances_away_from_zero():
    """A huge optimiser step on a raw parameter must not make a variance 0 (log-normal undefined there)."""
    from gpytorch.constraints import Interval

    user = Interval(0.5, 4.0)
    net = L.serial(L.Dense(2.0, 0.1), L.ReLU(), L.Dense(1.5, 0.2, weight_variance_constraint=user))
    L.default_priors(net)
    first, last = net.layers[0], net.layers[2]
    assert first.weight_variance.item() == pytest.approx(2.0) and first.bias_variance.item() == pytest.approx(0.1)
    assert last.raw_weight_variance_constraint is user  # a user's constraint is kept
    for dtype in (torch.float32, torch.float64):
        first.to(dtype)
        with torch.no_grad():
            first.raw_weight_variance.fill_(-1e4)
            first.raw_bias_variance.fill_(-1e4)
        assert first.weight_variance.item() == pytest.approx(2e-6, rel=1e-3)  # 1e-6 of the prior's centre
        assert first.bias_variance.item() == pytest.approx(1e-7, rel=1e-3)
        for name in ("weight_variance", "bias_variance"):
            prior = getattr(first, f"{name}_prior")
            assert torch.isfinite(prior.log_prob(getattr(first, name).to(prior.loc.dtype))).all()
