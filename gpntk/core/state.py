r"""The kernel state that flows through the layers of an architecture.

For a pair of inputs :math:`(x, x')` every layer maps the triple of covariances of its
pre-activations together with the neural tangent kernel,

.. math::
    \bigl(\Sigma(x, x'),\ \Sigma(x, x),\ \Sigma(x', x'),\ \Theta(x, x')\bigr)
    \;\mapsto\; (\Sigma', \ldots, \Theta'),

to the same quantities after the layer (Lee et al. 2018; Jacot et al. 2018). The state holds them
for all pairs of two sets of inputs at once, or, in the per-point (``diag``) mode, only the
variances of single points, which is what ``kernel(x, diag=True)`` needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .coincident import Coincidence, exact_values
from .graph_inputs import GraphDataset, GraphInputs, NodeGraph
from .graph_state import GraphContext, PaddedGraphs, SparseGraph
from .spatial import Layout

__all__ = ["KernelState"]

#: the layout of vector (non-spatial) kernels
VECTOR = Layout()


@dataclass(frozen=True)
class KernelState:
    r"""Covariances of the pre-activations of one layer, for all pairs of two sets of inputs.

    Shapes, with ``...`` the batch shape:

    * pair mode: ``cov12`` :math:`\Sigma(x_1, x_2)` is ``(..., n1, n2)``, ``var1``
      :math:`\Sigma(x_1, x_1)` is ``(..., n1, 1)`` and ``var2`` :math:`\Sigma(x_2, x_2)` is
      ``(..., 1, n2)``; ``ntk12`` :math:`\Theta(x_1, x_2)` is ``(..., n1, n2)``.
    * per-point mode (``diag=True``): ``cov12``, ``var1`` and ``var2`` are the same tensor of
      variances :math:`\Sigma(x, x)`, shape ``(..., n, 1)``, and ``ntk12`` holds
      :math:`\Theta(x, x)` with that shape.

    ``ntk12 is None`` stands for an identically zero NTK: the input layer, or layers below the
    first trainable one. ``track_ntk=False`` skips the NTK altogether (NNGP-only evaluations).
    ``same_inputs`` records that ``x1`` and ``x2`` are the same points. ``coincident`` lists the
    pairs of exactly identical inputs (:mod:`gpntk.core.coincident`; the diagonal when ``same_inputs``):
    their entries of ``cov12`` (and of the NTK multiplier) are re-set at every nonlinearity to the
    exact per-point values instead of being evaluated through a correlation of exactly one, where
    closed forms lose accuracy; derivatives there are those of the pair formula.

    Spatial inputs append the spatial dimensions of ``layout`` to every tensor (see
    :mod:`gpntk.core.spatial`): ``cov12`` is ``(..., n1, n2, *S)`` and ``var1`` / ``var2`` hold each
    point's covariance between its own positions, ``(..., n1, 1, *S)`` / ``(..., 1, n2, *S)``.
    ``keep_full`` tells a layer that a later one needs the full position-by-position covariance
    (pooling), so it must not be reduced to its diagonal yet.

    Graph inputs (:mod:`gpntk.core.graph_inputs`) have nodes as positions, always in the full
    layout, and ``graph`` carries the graphs the state belongs to (:mod:`gpntk.core.graph_state`),
    for message passing and pooling over nodes.
    """

    cov12: Tensor
    var1: Tensor
    var2: Tensor
    ntk12: Tensor | None = None
    diag: bool = False
    same_inputs: bool = False
    track_ntk: bool = True
    layout: Layout = VECTOR
    keep_full: bool = False
    coincident: Coincidence | None = None
    graph: GraphContext | None = None

    @staticmethod
    def from_inputs(
        x1: Tensor,
        x2: Tensor,
        *,
        diag: bool,
        same_inputs: bool,
        track_ntk: bool,
        input_shape: Sequence[int] | GraphInputs | NodeGraph | GraphDataset | None = None,
        full: bool = False,
        coincident: Coincidence | None = None,
    ) -> "KernelState":
        r"""The input layer's state: :math:`\Sigma_0(x, x') = x \cdot x' / d`, :math:`\Theta_0 = 0`.

        ``x1`` is ``(..., n1, d)`` and ``x2`` is ``(..., n2, d)``. In per-point mode (``diag``)
        they hold the same points, and so they do in pair mode with ``same_inputs``.

        With an ``input_shape`` ``(C, *spatial)`` of two or more dimensions, each row is a
        channels-first tensor and the input kernel is the covariance between positions,
        :math:`\Sigma_0(x, x')_{p, p'} = \sum_c x_{c,p}\, x'_{c,p'} / C` (Novak et al. 2019), kept
        in full (``full``) or only for :math:`p = p'`.

        ``coincident`` are the pairs of identical rows (see :mod:`gpntk.core.coincident`); with
        ``same_inputs`` and none given, the diagonal. Their entries of :math:`\Sigma_0` take the
        per-point value :math:`\Sigma_0(x_{1,i}, x_{1,i})` exactly, with the derivatives of
        :math:`x_1 \cdot x_2 / d`. In per-point mode, every per-point quantity is evaluated at the
        midpoint :math:`x_1 + (x_2 - x_1)/2` (``x1`` when ``x1 is x2``).
        """
        if not diag and coincident is None and same_inputs:
            coincident = _diagonal(x1.shape[-2], x1.device)
        if isinstance(input_shape, GraphInputs):
            return _graph_inputs(x1, x2, diag, same_inputs, track_ntk, input_shape, coincident)
        if isinstance(input_shape, (NodeGraph, GraphDataset)):
            raise TypeError(f"rows of {type(input_shape).__name__} indices are evaluated by the kernels' graph paths")
        if input_shape is not None and len(input_shape) >= 2:
            return _spatial_inputs(x1, x2, diag, same_inputs, track_ntk, tuple(input_shape), full, coincident)
        d = x1.shape[-1]

        def variance(x: Tensor) -> Tensor:
            return x.square().sum(dim=-1, keepdim=True) / d

        if diag:
            var = variance(midpoint(x1, x2))
            return KernelState(var, var, var, None, diag=True, same_inputs=True, track_ntk=track_ntk, layout=VECTOR)
        var1 = variance(x1)
        var2 = var1.transpose(-1, -2) if x2 is x1 else variance(x2).transpose(-1, -2)
        cov12 = exact_values(x1 @ x2.transpose(-1, -2) / d, var1, coincident)
        return KernelState(
            cov12, var1, var2, None, diag=False, same_inputs=same_inputs, track_ntk=track_ntk, layout=VECTOR,
            coincident=coincident,
        )

    @staticmethod
    def of_node_graph(graph: NodeGraph, like: Tensor, track_ntk: bool) -> "KernelState":
        r"""The state of a node-level kernel: the graph with itself, :math:`\Sigma_0 = X X^\top / C` ``(1, 1, N, N)``.

        A per-point state of the one graph (``diag``), in the full layout over its nodes, kept
        full to the end (``keep_full``): its covariance between nodes is the node kernel. In
        ``like``'s dtype and device.
        """
        n = graph.nodes
        var = graph.input_kernel(like).reshape(1, 1, n, n)
        return KernelState(
            var, var, var, None, diag=True, same_inputs=True, track_ntk=track_ntk, layout=Layout((n,), full=True),
            keep_full=True, graph=SparseGraph(graph.adjacency),
        )

    def replace(self, **changes: Any) -> "KernelState":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def map_linear(self, fn: Callable[[Tensor], Tensor], layout: Layout) -> "KernelState":
        """Apply a linear map of the spatial dimensions to every tensor; ``layout`` is the result's."""
        cov12 = fn(self.cov12)
        if self.diag:
            var1 = var2 = cov12
        else:
            var1, var2 = fn(self.var1), fn(self.var2)
        ntk12 = None if self.ntk12 is None else fn(self.ntk12)
        return self.replace(cov12=cov12, var1=var1, var2=var2, ntk12=ntk12, layout=layout)

    def settle(self) -> "KernelState":
        r"""Keep only the diagonal :math:`\Sigma_{p,p}` once no later layer needs the full covariance."""
        if not self.layout.full or self.keep_full:
            return self
        layout = self.layout
        return self.map_linear(layout.point_variances, layout.diagonal())

    def ntk_or_zeros(self) -> Tensor:
        """The NTK, materialising the zero NTK when no trainable layer has been met."""
        if self.ntk12 is None:
            return torch.zeros_like(self.cov12)
        return self.ntk12


def _diagonal(n: int, device: torch.device) -> Coincidence:
    """The pairs ``(i, i)`` of an ``n x n`` block."""
    i = torch.arange(n, device=device)
    return Coincidence(rows=i, flat=i * (n + 1))


def _spatial_inputs(
    x1: Tensor,
    x2: Tensor,
    diag: bool,
    same_inputs: bool,
    track_ntk: bool,
    input_shape: tuple[int, ...],
    full: bool,
    coincident: Coincidence | None,
) -> KernelState:
    """The input state of channels-first spatial inputs (see :meth:`KernelState.from_inputs`)."""
    channels, spatial = input_shape[0], input_shape[1:]
    layout = Layout(spatial, full)

    def rows(x: Tensor) -> Tensor:  # (..., n, C, P)
        return x.reshape(*x.shape[:-1], channels, math.prod(spatial))

    def pairs(a: Tensor, b: Tensor) -> Tensor:  # (..., na, nb, *S)
        if full:
            k = torch.einsum("...icp,...jcq->...ipjq", rows(a), rows(b)) / channels
            na, nb = k.shape[-4], k.shape[-2]
            return layout.from_matrix(k.reshape(*k.shape[:-4], na * k.shape[-3], nb * k.shape[-1]), na, nb)
        k = torch.einsum("...icp,...jcp->...ijp", rows(a), rows(b)) / channels
        return k.reshape(*k.shape[:-1], *spatial)

    def self_covariance(x: Tensor) -> Tensor:  # (..., n, 1, *S)
        if full:
            r = rows(x)
            k = torch.einsum("...icp,...icq->...ipq", r, r) / channels
            return layout.from_matrix(k, 1, 1).squeeze(-1 - layout.ndim)
        return (rows(x).square().sum(-2) / channels).reshape(*x.shape[:-1], 1, *spatial)

    if diag:
        var = self_covariance(midpoint(x1, x2))
        return KernelState(var, var, var, None, diag=True, same_inputs=True, track_ntk=track_ntk, layout=layout)
    var1 = self_covariance(x1)
    var2 = var1 if x2 is x1 else self_covariance(x2)
    var2 = var2.transpose(-1 - layout.ndim, -2 - layout.ndim)
    cov12 = exact_values(pairs(x1, x2), var1, coincident, layout.ndim)
    return KernelState(
        cov12, var1, var2, None, diag=False, same_inputs=same_inputs, track_ntk=track_ntk, layout=layout,
        coincident=coincident,
    )


def _graph_inputs(
    x1: Tensor,
    x2: Tensor,
    diag: bool,
    same_inputs: bool,
    track_ntk: bool,
    fmt: GraphInputs,
    coincident: Coincidence | None,
) -> KernelState:
    """The input state of padded graphs: node features as the positions of a full layout, and the graphs."""
    g1 = fmt.unpack(x1)
    g2 = g1 if x2 is x1 else fmt.unpack(x2)

    def channels_first(features: Tensor) -> Tensor:  # (..., n, N, C) -> rows (..., n, C·N)
        return features.transpose(-1, -2).flatten(-2)

    f1 = channels_first(g1.features)
    f2 = f1 if x2 is x1 else channels_first(g2.features)
    state = _spatial_inputs(f1, f2, diag, same_inputs, track_ntk, (fmt.channels, fmt.nodes), True, coincident)
    if diag:  # per point: the graph of the midpoint row, as for its features
        g = g1 if x2 is x1 else fmt.unpack(midpoint(x1, x2))
        return state.replace(graph=PaddedGraphs(g.adjacency, g.adjacency, g.mask, g.mask))
    return state.replace(graph=PaddedGraphs(g1.adjacency, g2.adjacency, g1.mask, g2.mask))


def midpoint(x1: Tensor, x2: Tensor) -> Tensor:
    """``x1 + (x2 - x1) / 2``: bitwise ``x1`` where ``x1 == x2``, with derivative 1/2 for each."""
    if x2 is x1:
        return x1
    return x1 + (x2 - x1) / 2


def set_diagonal(matrix: Tensor, diagonal: Tensor) -> Tensor:
    """``matrix`` (..., n, n) with its diagonal replaced by ``diagonal`` (..., n), differentiably."""
    diagonal = diagonal.expand(*matrix.shape[:-1])
    return torch.diagonal_scatter(matrix, diagonal.to(matrix.dtype), dim1=-2, dim2=-1)
