r"""Fully-connected (``Dense``) layers in NTK or standard parameterization."""

from __future__ import annotations

import torch
from torch import nn

from ..core.finite import ChannelsLast, NTKLinear
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Shape, Signature
from ..core.standard import StandardLinear
from ..core.state import KernelState
from .affine import Affine

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
    :param bias_variance: :math:`\sigma_b^2 \ge 0`. Zero builds a layer without bias (the
        variance is then fixed at zero, not learnable).
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
