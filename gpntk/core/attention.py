r"""The finite-width multi-head self-attention of :class:`gpntk.layers.GlobalSelfAttention`.

In NTK parameterization, on sequences ``(n, C, L)`` (channels first), with ``H`` heads of width
``d`` and standard normal weights:

.. math::
    k^h_a = \frac{\sigma_K}{\sqrt C} W_K^h x_a, \quad q^h_a = \frac{\sigma_Q}{\sqrt C} W_Q^h x_a, \quad
    v^h_a = \frac{\sigma_V}{\sqrt C} W_V^h x_a, \quad
    G^h = \zeta\!\left(\frac{q^h\, (k^h)^\top}{d^{\,\alpha}}\right), \quad
    y_a = \frac{\sigma_O}{\sqrt{H d}}\, W_O \bigl[(G^h v^h)_a\bigr]_{h=1}^{H} + \sigma_b\, b,

with :math:`\zeta` the attention mechanism (softmax over each row, i.e. over the keys, or the
identity, :math:`|\cdot|`, ReLU elementwise). ``linear_scaling`` (:math:`\alpha = 1`) ties the
queries to the keys, :math:`W_Q^h = W_K^h`, so that the logits converge to
:math:`\sigma_Q\sigma_K\, x_a \cdot x_b / C` as :math:`d \to \infty`; without it
(:math:`\alpha = 1/2`) queries and keys are independent and the logits stay Gaussian (Hron et al.
2020, "Infinite attention: NNGP and NTK for deep attention networks", ICML).

The module mixes positions (not input rows) and holds its own weights, so it does not declare
``gpntk_rowwise``: the empirical NTK of a network containing it takes the full-Jacobian path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validation import choice_argument, integer_argument, real_argument

__all__ = ["MECHANISMS", "NTKSelfAttention", "attention_weights"]

#: the attention mechanisms ζ, applied to the logits of every (query, key) pair
MECHANISMS = ("softmax", "identity", "abs", "relu")


def attention_weights(logits: Tensor, mechanism: str) -> Tensor:
    """ζ(logits): softmax over the last dimension (the keys), or elementwise identity, abs or ReLU."""
    if mechanism == "softmax":
        return torch.softmax(logits, dim=-1)
    if mechanism == "abs":
        return logits.abs()
    if mechanism == "relu":
        return torch.relu(logits)
    return logits


class NTKSelfAttention(nn.Module):
    r"""Multi-head self-attention over the positions of ``(n, C, L)`` in NTK parameterization.

    ``stds`` are :math:`(\sigma_K, \sigma_Q, \sigma_V, \sigma_O, \sigma_b)`; ``head_width`` is
    ``d`` (keys, queries and values alike); ``bias_std=0`` builds no bias. Maps ``(n, C, L)`` to
    ``(n, out_channels, L)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_heads: int,
        head_width: int,
        mechanism: str,
        linear_scaling: bool,
        stds: tuple[float, float, float, float, float],
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.in_channels = integer_argument("in_channels", in_channels, minimum=1)
        self.out_channels = integer_argument("out_channels", out_channels, minimum=1)
        self.n_heads = integer_argument("n_heads", n_heads, minimum=1)
        self.head_width = integer_argument("head_width", head_width, minimum=1)
        self.mechanism = choice_argument("mechanism", mechanism, MECHANISMS)
        self.linear_scaling = bool(linear_scaling)
        names = ("key_std", "query_std", "value_std", "out_std", "bias_std")
        checked = [real_argument(name, s, minimum=0, strict=name != "bias_std") for name, s in zip(names, stds)]
        self.key_std, self.query_std, self.value_std, self.out_std, self.bias_std = checked

        def draw(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.get_default_dtype()))

        heads = (self.n_heads, self.head_width, self.in_channels)
        self.key_weight = draw(*heads)
        # linear scaling ties the queries to the keys (one weight, two scales)
        self.query_weight: nn.Parameter | None
        self.register_parameter("query_weight", None if self.linear_scaling else draw(*heads))
        self.value_weight = draw(*heads)
        self.out_weight = draw(self.out_channels, self.n_heads * self.head_width)
        self.bias: nn.Parameter | None
        self.register_parameter("bias", draw(self.out_channels) if self.bias_std > 0 else None)

    def _project(self, x: Tensor, weight: Tensor, std: float) -> Tensor:
        """``(n, L, C)`` to the heads ``(n, H, L, d)``, scaled by ``std / sqrt(C)``."""
        return torch.einsum("nlc,hdc->nhld", x, weight) * (std / math.sqrt(self.in_channels))

    def forward(self, x: Tensor) -> Tensor:
        rows = x.transpose(1, 2)  # (n, L, C)
        keys = self._project(rows, self.key_weight, self.key_std)
        if self.query_weight is None:
            queries = keys * (self.query_std / self.key_std)
            scale = 1.0 / self.head_width
        else:
            queries = self._project(rows, self.query_weight, self.query_std)
            scale = 1.0 / math.sqrt(self.head_width)
        weights = attention_weights(queries @ keys.transpose(-1, -2) * scale, self.mechanism)  # (n, H, L, L)
        heads = weights @ self._project(rows, self.value_weight, self.value_std)  # (n, H, L, d)
        joined = heads.transpose(1, 2).flatten(2)  # (n, L, H·d)
        out = joined @ self.out_weight.transpose(0, 1) * (self.out_std / math.sqrt(joined.shape[-1]))
        if self.bias is not None:
            out = out + self.bias_std * self.bias
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, n_heads={self.n_heads}, "
            f"head_width={self.head_width}, mechanism={self.mechanism!r}, linear_scaling={self.linear_scaling}"
        )
