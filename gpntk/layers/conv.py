r"""Convolutions (1-D and 2-D, channels first) in NTK or standard parameterization."""

from __future__ import annotations

import math
from typing import Any, Literal, cast, overload

import torch
from torch import nn

from .._validation import check_keywords, integer_argument
from ..core.finite import NTKConv
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Shape, Signature
from ..core.spatial import PADDINGS, Layout, Padding, Window, convolve, window_geometry
from ..core.standard import StandardConv
from ..core.state import KernelState
from ..errors import ArchitectureError
from .affine import AFFINE_OPTIONS, Affine

__all__ = ["Conv"]


@overload
def spatial_sizes(name: str, value: object, allow_none: Literal[False] = False) -> tuple[int, ...] | int: ...
@overload
def spatial_sizes(name: str, value: object, allow_none: bool) -> tuple[int, ...] | int | None: ...
def spatial_sizes(name: str, value: object, allow_none: bool = False) -> tuple[int, ...] | int | None:
    """A positive int or a tuple of them (one per spatial axis), checked."""
    if value is None and allow_none:
        return None
    if isinstance(value, (tuple, list)):
        if not value:
            raise ArchitectureError(f"{name} must not be empty")
        try:
            return tuple(integer_argument(name, v, minimum=1) for v in value)
        except ValueError as error:
            raise ArchitectureError(str(error)) from None
    try:
        return integer_argument(name, value, minimum=1)
    except ValueError as error:
        raise ArchitectureError(str(error)) from None


def check_padding(padding: str) -> Padding:
    if padding not in PADDINGS:
        raise ArchitectureError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return cast(Padding, padding)


def per_axis(layer_name: str, name: str, value: int | tuple[int, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
    """``value`` (an int or a tuple) as one entry per spatial axis of ``spatial``."""
    if isinstance(value, tuple):
        if len(value) != len(spatial):
            raise ArchitectureError(
                f"{layer_name} has {name}={value} ({len(value)} axes) but its inputs have spatial shape "
                f"{spatial} ({len(spatial)} axes)"
            )
        return value
    return (value,) * len(spatial)


def windows_for(
    layer_name: str,
    spatial: tuple[int, ...],
    kernel_size: int | tuple[int, ...],
    stride: int | tuple[int, ...],
    padding: Padding,
) -> tuple[Window, ...]:
    """The per-axis windows of a convolution or pooling on inputs of spatial shape ``spatial``."""
    sizes = per_axis(layer_name, "kernel_size", kernel_size, spatial)
    strides = per_axis(layer_name, "stride", stride, spatial)
    for size, length in zip(sizes, spatial):
        # "same" and "circular" pad any window (circular padding wraps around as often as needed)
        if size > length and padding == "valid":
            raise ArchitectureError(
                f"{layer_name} has kernel_size {sizes}, larger than its input's spatial shape {spatial}, "
                "with padding='valid' (no full window fits); use padding='same' or 'circular'"
            )
    return tuple(window_geometry(length, k, s, padding) for length, k, s in zip(spatial, sizes, strides))


def output_spatial(windows: tuple[Window, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(w.output_size(length) for w, length in zip(windows, spatial))


def spatial_input(layer: str, signature: Signature, ordered: bool = True) -> None:
    """Raise unless ``signature`` describes (possibly unknown) spatial inputs.

    ``ordered``: the layer needs positions in an order (windows, flattening, attention over a
    sequence), which the nodes of graphs do not have.
    """
    if ordered and signature.graph:
        raise ArchitectureError(
            f"{layer} needs ordered positions (a sequence or a grid), but the inputs are graphs, whose nodes have "
            "no order; on graphs use Aggregate(), Dense, activations and GlobalSumPool() / GlobalAvgPool()"
        )
    if signature.spatial == ():
        where = (
            "the network's inputs are vectors "
            "(pass input_shape=(C, W) or (C, H, W) to the kernel, finite() or TrainedEnsemble)"
            if signature.last == "the input" else f"the outputs of {signature.last} are vectors"
        )
        raise ArchitectureError(f"{layer} needs spatial inputs (channels first), but {where}")


class Conv(Affine):
    r"""Convolution over 1-D or 2-D inputs (channels first), in NTK (default) or standard parameterization.

    The dimension follows the inputs: ``input_shape=(C, W)`` gives a 1-D, ``(C, H, W)`` a 2-D
    convolution. Each output position :math:`p` sees the window :math:`w` of positions
    :math:`s p + \delta`, so (Novak et al. 2019; Arora et al. 2019)

    .. math::
        \Sigma'_{p,p'} = \frac{\sigma_w^2}{|w|} \sum_{\delta \in w}
            \Sigma_{sp+\delta,\, sp'+\delta} + \sigma_b^2, \qquad
        \Theta'_{p,p'} = \frac{\sigma_w^2}{|w|} \sum_{\delta \in w}
            \Theta_{sp+\delta,\, sp'+\delta} + \Sigma'_{p,p'},

    with zero (``"same"``) or wrapped (``"circular"``) positions outside the input, or none
    (``"valid"``). Under ``"same"`` and ``"circular"`` the window may be longer than the input:
    circular padding then wraps around more than once (padded position :math:`j` holds input
    position :math:`(j - \text{before}) \bmod L`, as ``numpy.pad(mode="wrap")``). The diagonal
    :math:`p = p'` maps to itself, so without a later pooling layer only :math:`\Sigma_{p,p}` is
    ever computed.

    :param kernel_size: window size, an int or one per spatial axis.
    :param stride: an int or one per axis.
    :param padding: ``"same"`` (zeros, :math:`\lceil L/s\rceil` outputs), ``"valid"`` or
        ``"circular"``, split as in TensorFlow / Neural Tangents.
    :param weight_variance: :math:`\sigma_w^2 > 0`, as for :class:`~gpntk.layers.Dense`.
    :param bias_variance: :math:`\sigma_b^2 \ge 0`, as for :class:`~gpntk.layers.Dense`.
    :param trainable: whether the layer is trained, as for :class:`~gpntk.layers.Dense`.
    :param kwargs: the keyword-only options of :class:`~gpntk.layers.Dense` (parameterization,
        priors and constraints). With ``parameterization="standard"``, ``in_width`` is the number
        of input channels ``C``, the fan-in is ``C·k`` (``k`` taps) and the NTK map is
        :math:`\Theta' = C k\, \mathcal W(\Sigma) + \sigma_w^2\, \mathcal W(\Theta) + \beta`,
        :math:`\mathcal W` the window average above (see :mod:`gpntk.layers.affine`).
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str = "same",
        weight_variance: float = 1.0,
        bias_variance: float = 0.0,
        trainable: bool = True,
        **kwargs: Any,
    ):
        check_keywords(type(self).__name__, kwargs, AFFINE_OPTIONS)
        super().__init__(weight_variance, bias_variance, trainable, **kwargs)
        self.kernel_size = spatial_sizes("kernel_size", kernel_size)
        self.stride = spatial_sizes("stride", stride)
        self.padding = check_padding(padding)

    standard_parameterization = True

    def windows(self, spatial: tuple[int, ...]) -> tuple[Window, ...]:
        return windows_for(self.name, spatial, self.kernel_size, self.stride, self.padding)

    def check(self, signature: Signature) -> Signature:
        spatial_input(self.name, signature)
        self.check_in_width(signature)
        spatial = None
        if signature.spatial is not None:
            spatial = output_spatial(self.windows(signature.spatial), signature.spatial)
        return signature.after(self, gaussian=True, channels="hidden", independent=True, spatial=spatial)

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        windows = self.windows(layout.spatial)
        out = Layout(output_spatial(windows, layout.spatial), layout.full)
        state = state.map_linear(lambda t: convolve(t, layout, windows), out)
        return self.affine_map(state, hyper, taps=math.prod(w.size for w in windows))

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        assert in_shape is not None  # check() asked for spatial inputs
        channels, spatial = in_shape[0], tuple(in_shape[1:])
        windows = self.windows(spatial)
        weight_std, bias_std = self.finite_stds()
        features = out_features if is_output else width
        self.finite_fan_in(channels)
        convolution = StandardConv if self.in_width is not None else NTKConv
        module = convolution(channels, features, windows, weight_std, bias_std, self.trainable, generator)
        return module, (features, *output_spatial(windows, spatial))

    def __repr__(self) -> str:
        return (
            f"Conv(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"{self.variance_repr()})"
        )
