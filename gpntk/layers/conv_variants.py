r"""Transposed (``ConvTranspose``) and locally connected (``ConvLocal``) convolutions, NTK parameterization.

Both own :math:`\sigma_w^2, \sigma_b^2` as :class:`~gpntk.layers.Affine` layers do (raw parameters
with constraints, priors and batch shapes) and end with its affine step; they differ from
:class:`~gpntk.layers.Conv` in the linear map of the spatial covariance before it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .._validation import check_keywords, choice_argument
from ..core.finite_conv import NTKConvLocal, NTKConvTranspose
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Shape, Signature
from ..core.spatial import (
    Layout,
    TransposedWindow,
    Window,
    convolve,
    diagonal_to_full,
    transpose_convolve,
    transposed_geometry,
)
from ..core.state import KernelState
from ..errors import ArchitectureError
from .affine import AFFINE_OPTIONS, Affine
from .conv import check_padding, output_spatial, per_axis, spatial_input, spatial_sizes, windows_for

__all__ = ["ConvTranspose", "ConvLocal"]


class _WindowedAffine(Affine):
    """What ``ConvTranspose`` and ``ConvLocal`` share: window arguments, the NTK parameterization only."""

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
        parameterization = kwargs.pop("parameterization", "ntk")
        if parameterization != "ntk":
            raise ArchitectureError(
                f"{type(self).__name__} supports parameterization='ntk' only, got {parameterization!r}"
            )
        super().__init__(weight_variance, bias_variance, trainable, **kwargs)
        self.kernel_size = spatial_sizes("kernel_size", kernel_size)
        self.stride = spatial_sizes("stride", stride)
        self.padding = self.checked_padding(padding)

    def checked_padding(self, padding: str) -> str:
        raise NotImplementedError

    def out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def finite_module(
        self, channels: int, features: int, spatial: tuple[int, ...], generator: torch.Generator | None
    ) -> nn.Module:
        raise NotImplementedError

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        assert in_shape is not None  # check() asked for spatial inputs
        spatial = tuple(in_shape[1:])
        features = out_features if is_output else width
        return self.finite_module(in_shape[0], features, spatial, generator), (features, *self.out_spatial(spatial))

    def check(self, signature: Signature) -> Signature:
        spatial_input(self.name, signature)
        spatial = None if signature.spatial is None else self.out_spatial(signature.spatial)
        return signature.after(self, gaussian=True, channels="hidden", independent=True, spatial=spatial)

    def __repr__(self) -> str:
        return (
            f"{self.name}(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r}, "
            f"{self.variance_repr()})"
        )


class ConvTranspose(_WindowedAffine):
    r"""Transposed convolution over 1-D or 2-D inputs (channels first), in NTK parameterization.

    The geometry of ``jax.lax.conv_transpose`` on every axis: :math:`L` input positions give
    :math:`L s` outputs (``"same"``) or :math:`L s + \max(k - s, 0)` (``"valid"``), and output
    :math:`p` receives input :math:`q` through tap :math:`t` when :math:`s q = p + t - a`, with
    :math:`a = k - 1` for ``"valid"``; for ``"same"``, :math:`a = k - 1` if :math:`s > k - 1`, else
    :math:`\lceil (k + s - 2)/2 \rceil`. With :math:`S_t` that selection (:math:`k` taps in all,
    the product over axes in 2-D; Novak et al. 2020, Neural Tangents),

    .. math::
        \Sigma' = \frac{\sigma_w^2}{k} \sum_t S_t \Sigma S_t^\top + \sigma_b^2, \qquad
        \Theta' = \frac{\sigma_w^2}{k} \sum_t S_t \Theta S_t^\top + \Sigma'.

    The same tap acts on both positions of a pair, so, as for :class:`~gpntk.layers.Conv`, the
    diagonal :math:`\Sigma_{p,p}` maps to itself. The finite-width module is torch's
    ``conv_transpose`` with fan-in :math:`C k`, cropped to this geometry.

    :param kernel_size: number of taps, an int or one per spatial axis.
    :param stride: the upsampling factor, an int or one per axis.
    :param padding: ``"same"`` or ``"valid"``.
    :param weight_variance: :math:`\sigma_w^2 > 0`, as for :class:`~gpntk.layers.Dense`.
    :param bias_variance: :math:`\sigma_b^2 \ge 0`, as for :class:`~gpntk.layers.Dense`.
    :param trainable: whether the layer is trained, as for :class:`~gpntk.layers.Dense`.
    :param kwargs: priors and constraints, as for :class:`~gpntk.layers.Dense`.
    """

    def checked_padding(self, padding: str) -> str:
        try:
            return choice_argument("ConvTranspose padding", padding, ("same", "valid"))
        except ValueError as error:
            raise ArchitectureError(str(error)) from None

    def windows(self, spatial: tuple[int, ...]) -> tuple[TransposedWindow, ...]:
        sizes = per_axis(self.name, "kernel_size", self.kernel_size, spatial)
        strides = per_axis(self.name, "stride", self.stride, spatial)
        padding: Literal["same", "valid"] = "same" if self.padding == "same" else "valid"
        return tuple(transposed_geometry(length, k, s, padding) for length, k, s in zip(spatial, sizes, strides))

    def out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(w.output for w in self.windows(spatial))

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        windows = self.windows(layout.spatial)
        out = Layout(tuple(w.output for w in windows), layout.full)
        state = state.map_linear(lambda t: transpose_convolve(t, layout, windows), out)
        return self.affine_map(state, hyper)

    def finite_module(
        self, channels: int, features: int, spatial: tuple[int, ...], generator: torch.Generator | None
    ) -> nn.Module:
        weight_std, bias_std = self.finite_stds()
        return NTKConvTranspose(channels, features, self.windows(spatial), weight_std, bias_std, self.trainable,
                                generator)


class ConvLocal(_WindowedAffine):
    r"""Locally connected layer: a convolution whose weights and bias differ at every output position.

    Windows, strides and padding as :class:`~gpntk.layers.Conv` (``"same"``, ``"valid"``,
    ``"circular"``). Different output positions have independent weights, so their covariance
    vanishes and only the diagonal is that of ``Conv`` (Novak et al. 2019, "locally connected
    networks"):

    .. math::
        \Sigma'_{p,p'} = \delta_{pp'} \Bigl(\frac{\sigma_w^2}{|w|} \sum_{\delta \in w}
            \Sigma_{sp+\delta,\, sp+\delta} + \sigma_b^2\Bigr), \qquad
        \Theta'_{p,p'} = \delta_{pp'} \Bigl(\frac{\sigma_w^2}{|w|} \sum_{\delta}
            \Theta_{sp+\delta,\, sp+\delta} + \Sigma'_{p,p}\Bigr).

    It needs only the diagonal of its input's covariance; when a later layer (pooling) needs the
    full one, the output is the full layout with zeros off the diagonal.

    :param kernel_size: window size, an int or one per spatial axis.
    :param stride: an int or one per axis.
    :param padding: ``"same"`` (default), ``"valid"`` or ``"circular"``, as for ``Conv``.
    :param weight_variance: :math:`\sigma_w^2 > 0`, as for :class:`~gpntk.layers.Dense`.
    :param bias_variance: :math:`\sigma_b^2 \ge 0`, as for :class:`~gpntk.layers.Dense`.
    :param trainable: whether the layer is trained, as for :class:`~gpntk.layers.Dense`.
    :param kwargs: priors and constraints, as for :class:`~gpntk.layers.Dense`.
    """

    def checked_padding(self, padding: str) -> str:
        return check_padding(padding)

    def windows(self, spatial: tuple[int, ...]) -> tuple[Window, ...]:
        return windows_for(self.name, spatial, self.kernel_size, self.stride, check_padding(self.padding))

    def out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return output_spatial(self.windows(spatial), spatial)

    def needs_full(self, after: bool) -> bool:
        return False

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        state = state.replace(keep_full=False).settle().replace(keep_full=state.keep_full)
        layout = state.layout
        windows = self.windows(layout.spatial)
        out = Layout(output_spatial(windows, layout.spatial))
        state = self.affine_map(state.map_linear(lambda t: convolve(t, layout, windows), out), hyper)
        if not state.keep_full:
            return state
        return state.map_linear(lambda t: diagonal_to_full(t, out), Layout(out.spatial, full=True))

    def finite_module(
        self, channels: int, features: int, spatial: tuple[int, ...], generator: torch.Generator | None
    ) -> nn.Module:
        windows = self.windows(spatial)
        weight_std, bias_std = self.finite_stds()
        return NTKConvLocal(channels, features, windows, output_spatial(windows, spatial), weight_std, bias_std,
                            self.trainable, generator)
