r"""Layers that pool over positions: ``AvgPool``, ``GlobalAvgPool``, ``Flatten``, ``SumPool`` and ``GlobalSumPool``."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..core.finite import AvgPooling, FlattenRows, GlobalAvgPooling, GlobalSumPooling, SumPooling
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.spatial import Layout, Window, pool
from ..core.state import KernelState
from .conv import check_padding, output_spatial, spatial_input, spatial_sizes, windows_for

__all__ = ["AvgPool", "GlobalAvgPool", "Flatten", "SumPool", "GlobalSumPool"]


class AvgPool(Layer):
    r"""Average pooling over windows of positions (no parameters).

    .. math::
        \Sigma'_{p,p'} = \frac{1}{|w|^2} \sum_{\delta, \delta' \in w} \Sigma_{sp+\delta,\, sp'+\delta'}

    and the same for :math:`\Theta`: it mixes *different* positions, so the layers before it keep
    the full position-by-position covariance (Novak et al. 2019).

    :param kernel_size: window size, an int or one per spatial axis.
    :param stride: an int or one per axis; ``None`` (default) is the window size (torch's
        convention: non-overlapping windows).
    :param padding: ``"valid"`` (default), ``"same"`` (zeros, counted in the average, as torch's
        ``count_include_pad=True``) or ``"circular"``.
    """

    #: whether windows are averaged (``False``: summed, :class:`SumPool`), and the finite module
    average: bool = True
    finite_module: type[AvgPooling] = AvgPooling

    def __init__(self, kernel_size: int | tuple[int, ...], stride: int | tuple[int, ...] | None = None,
                 padding: str = "valid"):
        super().__init__()
        self.kernel_size = spatial_sizes("kernel_size", kernel_size)
        stride = spatial_sizes("stride", stride, allow_none=True)
        self.stride = self.kernel_size if stride is None else stride
        self.padding = check_padding(padding)

    def windows(self, spatial: tuple[int, ...]) -> tuple[Window, ...]:
        return windows_for(self.name, spatial, self.kernel_size, self.stride, self.padding)

    def check(self, signature: Signature) -> Signature:
        spatial_input(self.name, signature)
        spatial = (
            None if signature.spatial is None else output_spatial(self.windows(signature.spatial), signature.spatial)
        )
        return signature.after(self, spatial=spatial, features=signature.features)  # channels unchanged

    def needs_full(self, after: bool) -> bool:
        return True

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        windows = self.windows(layout.spatial)
        out = Layout(output_spatial(windows, layout.spatial), full=True)
        return state.map_linear(lambda t: pool(t, layout, windows, average=self.average), out)

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        assert in_shape is not None  # check() asked for spatial inputs
        windows = self.windows(tuple(in_shape[1:]))
        return self.finite_module(windows), (in_shape[0], *output_spatial(windows, tuple(in_shape[1:])))

    def __repr__(self) -> str:
        return f"{self.name}(kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding!r})"


class GlobalAvgPool(Layer):
    r"""Mean over all positions: :math:`\Sigma' = \frac{1}{P^2}\sum_{p,p'} \Sigma_{p,p'}` (same for :math:`\Theta`).

    The outputs are vectors; the layers before it keep the full position-by-position covariance.
    On graphs (:class:`~gpntk.GraphInputs`) the mean over the real nodes of both graphs,
    :math:`\frac{1}{|G||G'|}\sum_{u \in G, u' \in G'} \Sigma_{u,u'}` (padding nodes skipped).
    """

    #: the finite module
    finite_module: type[nn.Module] = GlobalAvgPooling
    #: whether positions are averaged (``False``: summed, :class:`GlobalSumPool`)
    average = True

    def check(self, signature: Signature) -> Signature:
        spatial_input(self.name, signature, ordered=False)
        return signature.after(self, spatial=(), features=signature.features)  # one number per channel

    def needs_full(self, after: bool) -> bool:
        return True

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        if not layout.full:
            raise RuntimeError(f"{self.name} was given only the diagonal of the spatial covariance")
        if state.graph is not None:
            return state.graph.pool(state, average=self.average)
        return state.map_linear(self.reduce(layout), Layout())

    def reduce(self, layout: Layout) -> Callable[[Tensor], Tensor]:
        """The map of a full-layout tensor to its pooled value: the mean over all position pairs."""
        return layout.mean_all

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        assert in_shape is not None  # check() asked for spatial inputs
        return self.finite_module(), (in_shape[0],)

    def __repr__(self) -> str:
        return f"{self.name}()"


class Flatten(Layer):
    r"""Flattens ``(C, *spatial)`` features into one vector (channels first, as ``torch.flatten``).

    A dense layer on the flattened features sees every position with its own weights, so its
    kernel averages only matching positions: :math:`\Sigma' = \frac1P \sum_p \Sigma_{p,p}` (same
    for :math:`\Theta`). The flattened features have different variances at different positions,
    so a nonlinearity may not follow directly: put a ``Dense`` in between. On vector inputs it
    does nothing.
    """

    def check(self, signature: Signature) -> Signature:
        if signature.spatial == ():
            return signature
        spatial_input(self.name, signature)  # graphs: the nodes have no order to flatten in
        features = None  # C·H·W features, where both are known
        if signature.features is not None and signature.spatial is not None:
            features = signature.features * math.prod(signature.spatial)
        return signature.after(self, spatial=(), gaussian=False if signature.spatial else None, features=features)

    def needs_full(self, after: bool) -> bool:
        return False

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        if not layout.spatial:
            return state
        return state.map_linear(layout.mean_diagonal, Layout())

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        if in_shape is None or len(in_shape) == 1:
            return FlattenRows(), in_shape
        size = 1
        for s in in_shape:
            size *= s
        return FlattenRows(), (size,)

    def __repr__(self) -> str:
        return "Flatten()"


class SumPool(AvgPool):
    r"""Sum pooling over windows of positions (no parameters): :class:`AvgPool` without normalisation.

    .. math::
        \Sigma'_{p,p'} = \sum_{\delta, \delta' \in w} \Sigma_{sp+\delta,\, sp'+\delta'}

    i.e. :math:`\Sigma' = S \Sigma S^\top` with :math:`S` the 0/1 window-sum matrix (and the same
    for :math:`\Theta`); padded positions (``"same"``) are zeros, so windows at the edges sum fewer
    positions and are not rescaled (Neural Tangents' ``SumPool``, Novak et al. 2020). The finite
    module sums each window of every channel.

    :param kernel_size: window size, an int or one per spatial axis.
    :param stride: an int or one per axis; ``None`` (default) is the window size.
    :param padding: ``"valid"`` (default), ``"same"`` (zeros) or ``"circular"``.
    """

    average = False
    finite_module = SumPooling


class GlobalSumPool(GlobalAvgPool):
    r"""Sum over all positions: :math:`\Sigma' = \sum_{p,p'} \Sigma_{p,p'}` (same for :math:`\Theta`).

    :class:`GlobalAvgPool` times :math:`P^2` for :math:`P` positions: the outputs' variance grows
    with the input size (Neural Tangents' ``GlobalSumPool``). The outputs are vectors. On graphs,
    the sum over the real nodes (the readout of Du et al. 2019's graph NTK).
    """

    finite_module = GlobalSumPooling
    average = False

    def reduce(self, layout: Layout) -> Callable[[Tensor], Tensor]:
        """The sum over all position pairs."""
        dims = tuple(range(-layout.ndim, 0))
        return lambda t: t.sum(dim=dims) if dims else t
