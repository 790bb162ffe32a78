r"""Finite-width transposed and locally connected convolutions in NTK parameterization.

Both hold their weights themselves (not in an :class:`~gpntk.core.finite.NTKLinear`), so they do
not set ``gpntk_rowwise``: the structured empirical NTK does not apply to them and
:func:`gpntk.empirical.empirical_ntk` uses full Jacobians.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .finite import _patches
from .spatial import TransposedWindow, Window

__all__ = ["NTKConvTranspose", "NTKConvLocal"]

#: torch's transposed convolutions by number of spatial axes
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _draw(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.get_default_dtype())


class NTKConvTranspose(nn.Module):
    r"""Transposed convolution :math:`h_p = \sigma_w/\sqrt{C k} \sum_{t} W_t\, x_{q(p,t)} + \sigma_b b`.

    ``q(p, t)`` as in ``jax.lax.conv_transpose`` (:class:`~gpntk.core.spatial.TransposedWindow`):
    torch's ``conv_transpose`` (no padding) puts input :math:`q` through tap :math:`t` at
    :math:`P = s q + t`, which with the taps reversed is output :math:`p = P - (k - 1 - a)`; so each
    axis of torch's output is cropped by :math:`k - 1 - a` before and cropped or zero-padded after
    to the window's output length. Weights and bias are standard normal; the fan-in is
    :math:`C k`, :math:`k` the number of taps (the :math:`1/k` of the kernel).
    """

    def __init__(self, in_channels: int, out_channels: int, windows: Sequence[TransposedWindow], weight_std: float,
                 bias_std: float, trainable: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.windows = tuple(windows)
        if len(self.windows) not in _CONV_TRANSPOSE:
            raise ValueError(f"NTKConvTranspose supports 1 to 3 spatial axes, got {len(self.windows)}")
        sizes = tuple(w.size for w in self.windows)
        self.scale = weight_std / math.sqrt(in_channels * math.prod(sizes))
        self.bias_std = bias_std
        self.weight = nn.Parameter(_draw((in_channels, out_channels, *sizes), generator), requires_grad=trainable)
        self.bias: nn.Parameter | None = None
        if bias_std > 0:
            self.bias = nn.Parameter(_draw((out_channels,), generator), requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        m = len(self.windows)
        out = _CONV_TRANSPOSE[m](x, self.weight, stride=tuple(w.stride for w in self.windows)) * self.scale
        pads: list[int] = []
        for axis in reversed(range(m)):
            window = self.windows[axis]
            crop = window.size - 1 - window.shift
            pads += [-crop, window.output - (out.shape[2 + axis] - crop)]
        out = F.pad(out, pads)
        if self.bias is not None:
            out = out + self.bias_std * self.bias.reshape(-1, *([1] * m))
        return out

    def extra_repr(self) -> str:
        sizes = tuple(w.size for w in self.windows)
        strides = tuple(w.stride for w in self.windows)
        return f"kernel_size={sizes}, stride={strides}"


class NTKConvLocal(nn.Module):
    r"""Locally connected layer: a convolution with its own weights and bias at every output position,
    :math:`h_p = \sigma_w/\sqrt{C\,|w|}\, \sum_{\delta} W_{p,\delta}\, x_{sp+\delta} + \sigma_b b_p`.

    Windows and padding as :class:`~gpntk.core.finite.NTKConv`; weights ``(P, C_out, C·|w|)`` and
    bias ``(P, C_out)`` for the ``P`` output positions, standard normal.
    """

    def __init__(self, in_channels: int, out_channels: int, windows: Sequence[Window], out_spatial: tuple[int, ...],
                 weight_std: float, bias_std: float, trainable: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.windows = tuple(windows)
        self.out_spatial = tuple(out_spatial)
        fan_in = in_channels * math.prod(w.size for w in self.windows)
        positions = math.prod(self.out_spatial)
        self.scale = weight_std / math.sqrt(fan_in)
        self.bias_std = bias_std
        self.weight = nn.Parameter(_draw((positions, out_channels, fan_in), generator), requires_grad=trainable)
        self.bias: nn.Parameter | None = None
        if bias_std > 0:
            self.bias = nn.Parameter(_draw((positions, out_channels), generator), requires_grad=trainable)

    def forward(self, x: Tensor) -> Tensor:
        m = len(self.windows)
        patches = _patches(x, self.windows)  # (n, C, *out, *window)
        patches = patches.movedim(1, 1 + m)  # (n, *out, C, *window)
        patches = patches.reshape(patches.shape[0], math.prod(self.out_spatial), -1)  # (n, P, C·|w|)
        out = torch.einsum("npf,pof->npo", patches, self.weight) * self.scale
        if self.bias is not None:
            out = out + self.bias_std * self.bias
        return out.movedim(-1, 1).reshape(x.shape[0], -1, *self.out_spatial)

    def extra_repr(self) -> str:
        sizes = tuple(w.size for w in self.windows)
        strides = tuple(w.stride for w in self.windows)
        return f"kernel_size={sizes}, stride={strides}, positions={self.out_spatial}"
