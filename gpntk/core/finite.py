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
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from .._validation import integer_argument, real_argument
from .spatial import Window, circular_index

__all__ = [
    "NTKLinear", "NTKConv", "ElementwiseActivation", "ChannelsLast", "RowsToTensors", "FlattenRows",
    "GlobalAvgPooling", "AvgPooling", "ChannelNorm", "Branches", "ParallelBranches", "MergeBranches",
    "SumPooling", "GlobalSumPooling",
]


def _positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (Python or numpy integers), or a ValueError naming ``name``."""
    return integer_argument(name, value, minimum=1)


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
        weight_std = real_argument("weight_std", weight_std, minimum=0, strict=True)
        bias_std = real_argument("bias_std", bias_std, minimum=0)
        self.out_features = out_features
        self.weight_std = float(weight_std)
        self.bias_std = float(bias_std)
        self.trainable = trainable
        self._generator = generator
        self.in_features = in_features
        self.weight: nn.Parameter | UninitializedParameter
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
                assert isinstance(self.weight, UninitializedParameter)  # has_uninitialized_params()
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


class ChannelsLast(nn.Module):
    """Applies a module acting on the last dimension to the channels (dim 1) of ``(n, C, *spatial)``."""

    gpntk_rowwise = True

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.movedim(1, -1)).movedim(-1, 1)


class RowsToTensors(nn.Module):
    """Reshapes rows ``(n, C·H·W)`` to channels-first tensors ``(n, C, H, W)``."""

    gpntk_rowwise = True

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _pad_spatial(x: Tensor, windows: Sequence[Window]) -> Tensor:
    """Pad the spatial dims of ``(n, C, *spatial)`` as the kernel's windows do (zeros or circular)."""
    if windows and windows[0].circular:
        # indexing rather than F.pad(mode="circular"), which cannot wrap around more than once
        for axis, window in enumerate(windows):
            if window.before or window.after:
                x = x.index_select(2 + axis, circular_index(x.shape[2 + axis], window, x.device))
        return x
    pads: list[int] = []
    for window in reversed(windows):
        pads += [window.before, window.after]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant")


def _patches(x: Tensor, windows: Sequence[Window]) -> Tensor:
    """``(n, C, *spatial)`` to windows ``(n, C, *out, *window)`` after padding."""
    x = _pad_spatial(x, windows)
    for axis, window in enumerate(windows):
        # index_select rather than Tensor.unfold: its backward has a batching rule, so the
        # structured empirical NTK's batched backward passes stay fast
        length = (x.shape[2 + axis] - window.size) // window.stride + 1
        starts = torch.arange(length, device=x.device) * window.stride
        index = starts[:, None] + torch.arange(window.size, device=x.device)
        x = x.index_select(2 + axis, index.flatten()).unflatten(2 + axis, (length, window.size))
        x = x.movedim(3 + axis, -1)  # the window dim goes last
    # windows were appended in axis order: (n, C, *out, *window)
    return x


class NTKConv(nn.Module):
    r"""Convolution in NTK parameterization,
    :math:`h_p = \sigma_w/\sqrt{C\,|w|}\, \sum_{\delta} W_\delta x_{sp+\delta} + \sigma_b b`.

    Implemented as an :class:`NTKLinear` on the unfolded patches ``(n, *out, C·|w|)``, so its fan-in
    is :math:`C\,|w|` and the structured empirical NTK applies to it.
    """

    gpntk_rowwise = True

    def __init__(self, in_channels: int, out_channels: int, windows: Sequence[Window], weight_std: float,
                 bias_std: float, trainable: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.windows = tuple(windows)
        fan_in = in_channels * math.prod(w.size for w in self.windows)
        self.linear: nn.Module = NTKLinear(fan_in, out_channels, weight_std, bias_std, trainable, generator)

    def forward(self, x: Tensor) -> Tensor:
        m = len(self.windows)
        patches = _patches(x, self.windows)  # (n, C, *out, *window)
        patches = patches.movedim(1, 1 + m)  # (n, *out, C, *window)
        patches = patches.reshape(*patches.shape[: 1 + m], -1)
        return self.linear(patches).movedim(-1, 1)

    def extra_repr(self) -> str:
        sizes = tuple(w.size for w in self.windows)
        strides = tuple(w.stride for w in self.windows)
        return f"kernel_size={sizes}, stride={strides}"


class AvgPooling(nn.Module):
    """Average pooling of ``(n, C, *spatial)`` over windows (padded positions count as zeros)."""

    gpntk_rowwise = True

    def __init__(self, windows: Sequence[Window]) -> None:
        super().__init__()
        self.windows = tuple(windows)

    def forward(self, x: Tensor) -> Tensor:
        patches = _patches(x, self.windows)
        return patches.mean(dim=tuple(range(-len(self.windows), 0)))


class GlobalAvgPooling(nn.Module):
    """Mean over all spatial positions: ``(n, C, *spatial)`` to ``(n, C)``.

    In a graph network (:mod:`gpntk.core.finite_graph`) the mean over the real nodes of each graph
    ``(n, C, N)``: its ``graph_binding`` holds the node mask of the forward pass under way.
    """

    gpntk_rowwise = True
    #: set by a graph network: the mask of its padded graphs' real nodes
    graph_binding = None
    #: whether positions are averaged (``False``: summed)
    average = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() <= 2:
            return x
        binding = self.graph_binding
        mask = None if binding is None else binding.mask
        if mask is not None:  # (n, N): only real nodes count
            total = (x * mask.to(x).unsqueeze(-2)).sum(-1)
            return total / mask.to(x).sum(-1, keepdim=True).clamp_min(1) if self.average else total
        dims = tuple(range(2, x.dim()))
        return x.mean(dim=dims) if self.average else x.sum(dim=dims)


class FlattenRows(nn.Module):
    """``(n, C, *spatial)`` to ``(n, C·H·W)``, channels first."""

    gpntk_rowwise = True

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


class ChannelNorm(nn.Module):
    r"""Layer normalisation over the channels (dim 1) at every position, without learned affine:
    :math:`(x - \bar x)/\sqrt{\overline{(x - \bar x)^2} + \epsilon}`."""

    gpntk_rowwise = True

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = real_argument("eps", eps, minimum=0, strict=True)

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        return centred * torch.rsqrt(centred.square().mean(dim=1, keepdim=True) + self.eps)


class Branches(nn.Module):
    """``FanOut``: hands the same input to ``num`` branches, as a tuple."""

    gpntk_rowwise = True

    def __init__(self, num: int):
        super().__init__()
        self.num = num

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return (x,) * self.num


class ParallelBranches(nn.Module):
    """Applies branch ``i`` to input ``i`` of a tuple."""

    gpntk_rowwise = True

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(branch(x) for branch, x in zip(self.branches, xs))


class MergeBranches(nn.Module):
    """Combines a tuple of branch outputs: ``"sum"``, ``"prod"`` or ``"concat"`` (along channels)."""

    gpntk_rowwise = True

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, xs: tuple[Tensor, ...]) -> Tensor:
        if self.how == "concat":
            return torch.cat(xs, dim=1)
        out = xs[0]
        for x in xs[1:]:
            out = out + x if self.how == "sum" else out * x
        return out

    def extra_repr(self) -> str:
        return self.how


class SumPooling(AvgPooling):
    """Sum pooling of ``(n, C, *spatial)`` over windows: :class:`AvgPooling` without the ``1/|w|`` (padding zeros)."""

    def forward(self, x: Tensor) -> Tensor:
        return _patches(x, self.windows).sum(dim=tuple(range(-len(self.windows), 0)))


class GlobalSumPooling(GlobalAvgPooling):
    """Sum over all spatial positions: ``(n, C, *spatial)`` to ``(n, C)`` (over the real nodes of graphs)."""

    average = False
