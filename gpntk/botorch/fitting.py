r"""The network's hyperparameters fitted by the marginal likelihood of the matching Gaussian process.

A trained ensemble has no likelihood of its own to maximise. Its hyperparameters (σw², σb² of
each layer) are those of its prior: at :math:`t = \infty` in the regimes ``"nngp"`` and
``"ntkgp"`` the ensemble *is* the posterior of the zero-mean GP with covariance :math:`K` (the
NNGP or the NTK) and noise variance ``diag_reg``. :func:`fit_network` fits that GP (GPyTorch
``ExactGP``, ``ZeroMean``, the kernel of ``net`` without an output scale, a Gaussian likelihood
with one noise variance per output) by BoTorch's ``fit_gpytorch_mll`` and returns a copy of the
network with the fitted values, and the fitted noise. There is no separate output scale: the
network's own variances set the kernel's scale (for a ReLU MLP of depth L the NNGP scales as
:math:`\sigma_w^{2(L+1)}`), so the fitted values are those of a network.

With several outputs the kernel is shared (as by the ensemble, one network with ``m`` outputs)
and the marginal likelihoods of the outputs are summed.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal
from warnings import WarningMessage

import gpytorch
import torch
from botorch.exceptions.warnings import OptimizationWarning
from botorch.fit import DEFAULT_WARNING_HANDLER, fit_gpytorch_mll
from botorch.models.transforms.input import InputTransform
from botorch.models.transforms.outcome import OutcomeTransform
from gpytorch.constraints import GreaterThan
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import GaussianLikelihood
from gpytorch.means import ZeroMean
from gpytorch.mlls import ExactMarginalLogLikelihood
from torch import Tensor

from ..core.layer import Layer
from ..errors import NumericalWarning
from ..kernels import NNGPKernel, NTKKernel
from .model import _check_training_data

__all__ = ["FittedNetwork", "fit_network", "MatchingGP", "accepting_abnormal_stops"]

#: the smallest noise variance the fit may reach (outcome-transformed space)
MIN_NOISE = 1e-6


class MatchingGP(gpytorch.models.ExactGP):
    r"""The zero-mean GP with the kernel of a network and Gaussian noise, over ``m`` outputs as a batch.

    Inputs ``(m, n, d)`` (the same points per output), targets ``(m, n)``; the kernel's
    hyperparameters are shared by the outputs, the noise is per output.
    """

    def __init__(
        self, train_x: Tensor, train_y: Tensor, kernel: gpytorch.kernels.Kernel, likelihood: GaussianLikelihood
    ):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = ZeroMean(batch_shape=train_y.shape[:-1])
        self.covar_module = kernel

    def transform_inputs(self, X: Tensor, input_transform: Any = None) -> Tensor:
        """The data is transformed before the GP is built (BoTorch's fitting routines call this)."""
        return X

    def forward(self, x: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))


def accepting_abnormal_stops(accepted: list[str]) -> Callable[[WarningMessage], bool]:
    """A ``fit_gpytorch_mll`` warning handler that accepts L-BFGS-B's ABNORMAL stops (recording them) and
    otherwise decides as BoTorch's default handler.

    L-BFGS-B stops ABNORMAL when its line search finds no decrease, typically where the marginal
    likelihood is flat along a direction (σb² or the noise at their lower bounds, σw² against the
    noise on tiny designs). BoTorch's default retries from values sampled from the priors, but a
    network without priors restarts from the same values and fails the same way every attempt.
    """

    def handler(w: WarningMessage) -> bool:
        if issubclass(w.category, OptimizationWarning) and "ABNORMAL" in str(w.message):
            accepted.append(str(w.message))
            return True
        return bool(DEFAULT_WARNING_HANDLER(w))

    return handler


@dataclass(frozen=True)
class FittedNetwork:
    """What :func:`fit_network` returns.

    :ivar net: a copy of the network with the fitted hyperparameters.
    :ivar noise: the fitted noise variance per output ``(m,)``, in the outcome-transformed space
        (``diag_reg=float(noise)`` for one output makes ``TrainedEnsembleModel(..., regime="ntkgp"``
        or ``"nngp"``, ``t=math.inf)`` the fitted GP's posterior).
    :ivar gp: the fitted GP (:class:`MatchingGP`, in eval mode) on the transformed data.
    """

    net: Layer
    noise: Tensor
    gp: MatchingGP

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The fitted values by parameter name (the network's ``weight_variance``/``bias_variance`` per layer)."""
        values: dict[str, float] = {}
        for name, module in self.net.named_modules():
            for attribute in ("weight_variance", "bias_variance"):
                value = getattr(module, attribute, None)
                if torch.is_tensor(value) and value.numel() == 1:
                    values[f"{name}.{attribute}" if name else attribute] = float(value.detach())
        return values


def fit_network(  # long: transforms, the GP, the fit and the result, one sequence
    train_X: Tensor,
    train_Y: Tensor,
    net: Layer,
    kernel: Literal["ntk", "nngp"] = "ntk",
    input_transform: InputTransform | None = None,
    outcome_transform: OutcomeTransform | None = None,
    min_noise: float = MIN_NOISE,
    **fit_kwargs: Any,
) -> FittedNetwork:
    r"""Fit the hyperparameters of ``net`` by the marginal likelihood of the zero-mean GP with its ``kernel``.

    :param train_X: ``(n, d)``, before ``input_transform``.
    :param train_Y: ``(n, m)``, before ``outcome_transform``.
    :param net: the architecture; it is not modified (a fitted copy is returned).
    :param kernel: ``"ntk"`` (the prior of the ``"ntkgp"`` regime, and the kernel whose regression
        is the ``"ntk"`` regime's mean) or ``"nngp"`` (the prior of the ``"nngp"`` regime).
    :param input_transform: a copy is fitted on ``train_X`` and applied, so that the GP sees the
        inputs exactly as :class:`~gpntk.botorch.TrainedEnsembleModel` with the same transform does
        (the transform passed in is not modified).
    :param outcome_transform: likewise for ``train_Y``.
    :param min_noise: lower bound of the noise variance.
    :param fit_kwargs: passed to ``botorch.fit.fit_gpytorch_mll``. Unless a ``warning_handler`` is
        given, an L-BFGS-B stop with status ABNORMAL (no decrease found by the line search) is
        accepted with a :class:`~gpntk.NumericalWarning` (see :func:`accepting_abnormal_stops`).

    Use the result as ``TrainedEnsembleModel(train_X, train_Y, fitted.net, ...)``.
    """
    train_X, train_Y = _check_training_data(train_X, train_Y)
    if kernel not in ("ntk", "nngp"):
        raise ValueError(f"kernel must be 'ntk' or 'nngp', got {kernel!r}")
    if not isinstance(net, Layer):
        raise TypeError(f"net must be an architecture from gpntk.layers, got {type(net).__name__}")
    with torch.no_grad():
        X = train_X
        if input_transform is not None:
            transform = copy.deepcopy(input_transform).to(train_X)
            transform.train()
            X = transform(train_X)
        Y = train_Y
        if outcome_transform is not None:
            outcome = copy.deepcopy(outcome_transform)
            outcome.train()
            Y, _ = outcome(train_Y, X=X)
    m = Y.shape[-1]
    fitted_net = copy.deepcopy(net).to(train_X)
    covariance = (NTKKernel if kernel == "ntk" else NNGPKernel)(fitted_net)
    likelihood = GaussianLikelihood(batch_shape=torch.Size([m]), noise_constraint=GreaterThan(min_noise)).to(train_X)
    inputs = X.detach().unsqueeze(0).expand(m, *X.shape)
    gp = MatchingGP(inputs, Y.detach().mT.contiguous(), covariance, likelihood).to(train_X)
    accepted: list[str] = []
    fit_kwargs.setdefault("warning_handler", accepting_abnormal_stops(accepted))
    fit_gpytorch_mll(ExactMarginalLogLikelihood(likelihood, gp), **fit_kwargs)
    if accepted:
        warnings.warn(
            "fit_network: L-BFGS-B stopped ABNORMAL (its line search found no decrease) and the values reached are "
            "kept; they may not be a stationary point of the marginal likelihood (a flat direction, e.g. a "
            f"variance at its lower bound). Check FittedNetwork.hyperparameters and .noise. ({accepted[0][:200]})",
            NumericalWarning,
            stacklevel=2,
        )
    gp.eval()
    return FittedNetwork(fitted_net, likelihood.noise.detach().reshape(m).clone(), gp)
