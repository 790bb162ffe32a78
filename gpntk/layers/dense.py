r"""Fully-connected (``Dense``) layers in NTK parameterization."""

from __future__ import annotations

import torch
from torch import nn

from ..core.finite import ChannelsLast, NTKLinear
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Shape, Signature
from ..core.state import KernelState
from .affine import Affine

__all__ = ["Dense"]


class Dense(Affine):
    r"""Fully-connected affine layer in NTK parameterization.

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
    :param parameterization: only ``"ntk"`` (the convention of the reference data).
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

    def check(self, signature: Signature) -> Signature:
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
        module: nn.Module = NTKLinear(
            in_shape[0] if in_shape is not None else None,
            features,
            weight_std=weight_std,
            bias_std=bias_std,
            trainable=self.trainable,
            generator=generator,
        )
        if spatial:
            assert in_shape is not None
            return ChannelsLast(module), (features, *in_shape[1:])
        return module, (features,)

    def __repr__(self) -> str:
        return f"Dense({self.variance_repr()})"
