r"""Finite-width torch modules in NTK parameterization.

An affine layer of width :math:`n_{out}` acting on :math:`n_{in}` features computes

.. math::
    h = \frac{\sigma_w}{\sqrt{n_{in}}} W x + \sigma_b\, b, \qquad W_{ij}, b_i \sim \mathcal N(0, 1),

so that as the widths grow its NNGP and NTK converge to the kernels of :mod:`gpntk.kernels`
(Jacot et al. 2018; Lee et al. 2019).

Modules here set ``gpntk_rowwise = True``: they act on every input row (example) separately, which
lets :func:`gpntk.empirical.empirical_ntk` take its fast structured path. A finite-width module
defined elsewhere may set it too if it never mixes rows and holds no trainable parameters of its
own (trainable parameters must live in :class:`NTKLinear` or ``nn.Linear`` children).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

__all__ = ["NTKLinear", "ElementwiseActivation"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class NTKLinear(LazyModuleMixin, nn.Module):
    r"""Affine map :math:`x \mapsto \sigma_w/\sqrt{n_{in}}\, W x + \sigma_b b` with standard normal weights.

    ``in_features=None`` infers the number of input features from the first input. A frozen layer
    (``trainable=False``) keeps its weights with ``requires_grad=False``, so it contributes nothing
    to the empirical NTK. ``bias_std=0`` builds no bias.
    """

    cls_to_become = None
    gpntk_rowwise = True

    def __init__(
        self,
        in_features: int | None,
        out_features: int,
        weight_std: float,
        bias_std: float,
        trainable: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if in_features is not None:
            in_features = _positive_int("in_features", in_features)
        out_features = _positive_int("out_features", out_features)
        weight_std, bias_std = float(weight_std), float(bias_std)
        if not (math.isfinite(weight_std) and weight_std > 0):
            raise ValueError(f"weight_std must be positive and finite, got {weight_std}")
        if not (math.isfinite(bias_std) and bias_std >= 0):
            raise ValueError(f"bias_std must be non-negative and finite, got {bias_std}")
        self.out_features = out_features
        self.weight_std = float(weight_std)
        self.bias_std = float(bias_std)
        self.trainable = trainable
        self._generator = generator
        self.in_features = in_features
        if in_features is None:
            self.weight = UninitializedParameter(requires_grad=trainable)
        else:
            self.weight = nn.Parameter(self._draw((out_features, in_features)), requires_grad=trainable)
        if self.bias_std > 0:
            self.bias = nn.Parameter(self._draw((out_features,)), requires_grad=trainable)
        else:
            self.register_parameter("bias", None)

    def _draw(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self._generator, dtype=torch.get_default_dtype())

    def initialize_parameters(self, x: Tensor) -> None:  # LazyModuleMixin hook
        if self.has_uninitialized_params():
            self.in_features = x.shape[-1]
            with torch.no_grad():
                self.weight.materialize((self.out_features, self.in_features), dtype=x.dtype, device=x.device)
                self.weight.copy_(self._draw((self.out_features, self.in_features)).to(x))
            if self.bias is not None:
                self.bias.data = self.bias.data.to(x)

    def forward(self, x: Tensor) -> Tensor:
        out = (x @ self.weight.transpose(0, 1)) * (self.weight_std / math.sqrt(self.weight.shape[1]))
        if self.bias is not None:
            out = out + self.bias_std * self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_std={self.weight_std:.4g}, bias_std={self.bias_std:.4g}, trainable={self.trainable}"
        )


class ElementwiseActivation(nn.Module):
    """Applies a scalar function elementwise (the finite-width counterpart of an activation layer)."""

    gpntk_rowwise = True

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
