r"""Fully-connected (``Dense``) layers in NTK or standard parameterization."""

from __future__ import annotations

import torch
from gpytorch.constraints import Interval
from gpytorch.priors import Prior
from torch import nn

from ..core.finite import ChannelsLast, NTKLinear
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Shape, Signature
from ..core.standard import StandardLinear
from ..core.state import KernelState
from .affine import DEFAULT_BIAS_VARIANCE, Affine

__all__ = ["Dense"]


class Dense(Affine):
    r"""Fully-connected affine layer in NTK (default) or standard parameterization.

    .. math::
        \Sigma \leftarrow \sigma_w^2\, \Sigma + \sigma_b^2, \qquad
        \Theta \leftarrow \sigma_w^2\, \Theta + \Sigma_{\text{new}}

    (Jacot et al. 2018; Lee et al. 2019). The term :math:`\Sigma_{\text{new}}` is the
    contribution of the layer's own weights and biases to the tangent kernel, so a frozen layer
    (``trainable=False``) maps :math:`\Theta \leftarrow \sigma_w^2 \Theta`. Freezing every layer
    but the readout turns the NTK into the NNGP. On spatial inputs it acts on the channels at every
    position (a 1×1 convolution), as in Neural Tangents.

    :param weight_variance: :math:`\sigma_w^2 > 0`.
    :param bias_variance: :math:`\sigma_b^2 \ge 0`, default 0.1 (as :func:`~gpntk.layers.mlp`). A
        bias exists exactly when :math:`\sigma_b^2 > 0`, the convention of the reference
        kernels; zero builds a layer without bias, whose variance stays zero (it has no
        parameter: setting ``bias_variance`` later raises, build the layer with a positive value
        to learn a bias). The default has a bias because a bias-free ReLU network's kernels
        vanish at :math:`x = 0` and scale with :math:`\|x\|\,\|x'\|`
        (:math:`k(cx, x') = c\, k(x, x')` for :math:`c > 0`), a poor prior for regression and for
        Bayesian optimisation on centred inputs. Neural Tangents' ``stax.Dense`` has no bias by
        default: pass ``bias_variance=0.0`` to reproduce it (``Conv``, ``ConvTranspose``,
        ``ConvLocal`` keep no bias by default, the CNTK convention of Arora et al. 2019).
    :param trainable: whether the layer is trained (contributes to the NTK).
    :param parameterization: ``"ntk"`` (default) or ``"standard"``: :math:`h = W x + b` with
        :math:`W \sim \mathcal N(0, \sigma_w^2/n)`, whose NTK map is
        :math:`\Theta \leftarrow n \Sigma + \sigma_w^2 \Theta + \beta` (:math:`\Sigma` the
        input covariance, :math:`\beta = 1` with a bias, 0 without; Sohl-Dickstein et al. 2020,
        see :mod:`gpntk.layers.affine`); the NNGP map is unchanged.
    :param in_width: ``n``, the number of input features (the input dimension ``d`` for a first
        layer, the previous layer's width, ``C·H·W`` after ``Flatten``, ``C`` on spatial inputs):
        required for ``"standard"``, refused for ``"ntk"``.
    :param weight_variance_prior: optional GPyTorch prior on :math:`\sigma_w^2`.
    :param bias_variance_prior: optional GPyTorch prior on :math:`\sigma_b^2`.
    :param weight_variance_constraint: constraint on the raw weight variance (default
        :class:`~gpytorch.constraints.Positive`).
    :param bias_variance_constraint: constraint on the raw bias variance (default
        :class:`~gpytorch.constraints.Positive`).

    Hyperparameters are stored GPyTorch-style as ``raw_weight_variance`` /
    ``raw_bias_variance`` of shape ``(*batch_shape, 1, 1)`` and exposed through the properties
    ``weight_variance`` / ``bias_variance``. Using one ``Dense`` object in several places shares
    its hyperparameters (not its finite-width weights).
    """

    standard_parameterization = True

    def __init__(
        self,
        weight_variance: float = 1.0,
        bias_variance: float = DEFAULT_BIAS_VARIANCE,
        trainable: bool = True,
        *,
        parameterization: str = "ntk",
        in_width: int | None = None,
        weight_variance_prior: Prior | None = None,
        bias_variance_prior: Prior | None = None,
        weight_variance_constraint: Interval | None = None,
        bias_variance_constraint: Interval | None = None,
    ):
        super().__init__(
            weight_variance, bias_variance, trainable, parameterization=parameterization, in_width=in_width,
            weight_variance_prior=weight_variance_prior, bias_variance_prior=bias_variance_prior,
            weight_variance_constraint=weight_variance_constraint, bias_variance_constraint=bias_variance_constraint,
        )

    def check(self, signature: Signature) -> Signature:
        self.check_in_width(signature)
        return signature.after(self, gaussian=True, channels="hidden", independent=True)

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        return self.affine_map(state, hyper)

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        weight_std, bias_std = self.finite_stds()
        features = out_features if is_output else width
        spatial = in_shape is not None and len(in_shape) > 1
        in_features = self.finite_fan_in(in_shape[0] if in_shape is not None else None)
        module: nn.Module
        if self.in_width is not None:
            module = StandardLinear(self.in_width, features, weight_std, bias_std, self.trainable, generator)
        else:
            module = NTKLinear(in_features, features, weight_std, bias_std, self.trainable, generator)
        if spatial:
            assert in_shape is not None
            return ChannelsLast(module), (features, *in_shape[1:])
        return module, (features,)

    def __repr__(self) -> str:
        return f"Dense({self.variance_repr()})"
