r"""Finite-width torch modules in standard parameterization.

An affine layer with :math:`n_{in}` inputs computes :math:`h = W x + b` with trained parameters
drawn as :math:`W_{ij} \sim \mathcal N(0, \sigma_w^2 / n_{in})`, :math:`b_i \sim \mathcal N(0,
\sigma_b^2)` (Sohl-Dickstein, Novak, Schoenholz & Lee 2020): the forward pass at initialisation is
distributed as in NTK parameterization, but the gradients with respect to :math:`W` are not scaled
down by :math:`1/\sqrt{n_{in}}`, so the empirical NTK grows with the widths. Its limit is the
kernel of a ``Dense``/``Conv`` layer with ``parameterization="standard"`` and ``in_width`` equal
to the number of inputs (channels) of the finite layer.

:class:`StandardLinear` is an ``nn.Linear`` (same forward, only its initialisation differs), so the
structured empirical NTK (:mod:`gpntk.empirical.structured`) treats it as a plain linear layer,
whose gradient scales are exactly 1.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .._validation import integer_argument, real_argument
from .finite import NTKConv
from .spatial import Window

__all__ = ["StandardLinear", "StandardConv"]


class StandardLinear(nn.Linear):
    r"""The affine map :math:`x \mapsto W x + b` in standard parameterization.

    :math:`W \sim \mathcal N(0, \sigma_w^2/n_{in})`, :math:`b \sim \mathcal N(0, \sigma_b^2)`,
    drawn from ``generator``; ``bias_std=0`` builds no bias; ``trainable=False`` freezes the
    weights (``requires_grad=False``). :meth:`reset_parameters` draws them again.
    """

    gpntk_rowwise = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_std: float,
        bias_std: float,
        trainable: bool = True,
        generator: torch.Generator | None = None,
    ):
        in_features = integer_argument("in_features", in_features, minimum=1)
        out_features = integer_argument("out_features", out_features, minimum=1)
        weight_std = real_argument("weight_std", weight_std, minimum=0, strict=True)
        bias_std = real_argument("bias_std", bias_std, minimum=0)
        super().__init__(in_features, out_features, bias=bias_std > 0, dtype=torch.get_default_dtype())
        self.weight_std = float(weight_std)
        self.bias_std = float(bias_std)
        self.trainable = trainable
        self.generator = generator
        self.reset_parameters()
        self.weight.requires_grad_(trainable)
        if self.bias is not None:
            self.bias.requires_grad_(trainable)

    def reset_parameters(self) -> None:
        if "generator" not in self.__dict__:
            return  # called by nn.Linear.__init__ before the scales are known: __init__ draws them
        with torch.no_grad():
            weight = torch.randn(self.weight.shape, generator=self.generator, dtype=self.weight.dtype)
            self.weight.copy_(weight * (self.weight_std / math.sqrt(self.in_features)))
            if self.bias is not None:
                bias = torch.randn(self.bias.shape, generator=self.generator, dtype=self.bias.dtype)
                self.bias.copy_(bias * self.bias_std)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weight_std={self.weight_std:.4g}, "
            f"bias_std={self.bias_std:.4g}, trainable={self.trainable}, parameterization='standard'"
        )


class StandardConv(NTKConv):
    r"""Convolution in standard parameterization, :math:`h_p = \sum_\delta W_\delta x_{sp+\delta} + b`,
    :math:`W \sim \mathcal N(0, \sigma_w^2/(C\,|w|))`: a :class:`StandardLinear` on the unfolded patches
    (the patches and the forward pass are :class:`~gpntk.core.finite.NTKConv`'s)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        windows: Sequence[Window],
        weight_std: float,
        bias_std: float,
        trainable: bool = True,
        generator: torch.Generator | None = None,
    ):
        nn.Module.__init__(self)  # not NTKConv.__init__: its linear layer is in NTK parameterization
        self.windows = tuple(windows)
        fan_in = in_channels * math.prod(w.size for w in self.windows)
        self.linear = StandardLinear(fan_in, out_channels, weight_std, bias_std, trainable, generator)
