r"""The spatial layout of covariance tensors, and the linear maps of convolutions and pooling on it.

For inputs with spatial dimensions (signals ``(C, W)``, images ``(C, H, W)``, channels first) the
infinite-width kernel of a pair of inputs is a covariance between positions,
:math:`\Sigma(x, x')_{p, p'}`. A kernel tensor has shape ``(..., N1, N2, *S)``: ``...`` batch
dimensions, ``(N1, N2)`` the pair of input sets, and ``S`` the spatial part in one of two layouts:

* **full**: every pair of positions, interleaved per axis, ``S = (P_1, P_1', P_2, P_2', ...)``, as
  needed by pooling, which averages :math:`\Sigma_{p, p'}` over windows of *different* positions;
* **diagonal**: only :math:`\Sigma_{p, p}`, ``S = (P_1, P_2, ...)``; enough for everything else
  (convolutions, nonlinearities, flattening), since a convolution of :math:`\Sigma_{p, p}` only
  needs :math:`\Sigma_{p+\delta, p+\delta}` (Novak et al. 2019; Arora et al. 2019).

Vector inputs have ``S = ()``. All maps here act on the trailing spatial dimensions only, so they
apply alike to :math:`\Sigma(x, x')`, to the per-point self-covariances and to the NTK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Layout", "Window", "window_geometry", "circular_index"]

Padding = Literal["same", "valid", "circular"]
PADDINGS = ("same", "valid", "circular")


@dataclass(frozen=True)
class Layout:
    """Spatial shape ``spatial`` (``()`` for vectors) and whether the full position pairs are held."""

    spatial: tuple[int, ...] = ()
    full: bool = False

    @property
    def ndim(self) -> int:
        """Number of trailing spatial dimensions of a kernel tensor in this layout."""
        return len(self.spatial) * (2 if self.full else 1)

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)

    @property
    def elements_per_pair(self) -> int:
        """Entries of one pair of inputs: :math:`P^2` in the full layout, :math:`P` in the diagonal one."""
        return self.positions ** (2 if self.full else 1)

    def axis_dims(self, axis: int) -> tuple[int, ...]:
        """Negative dims of spatial axis ``axis`` (two in the full layout: position and partner)."""
        m = len(self.spatial)
        if self.full:
            first = -2 * (m - axis)
            return (first, first + 1)
        return (-(m - axis),)

    def scalar_shape(self, param: Tensor) -> Tensor:
        """A ``(*batch, 1, 1)`` hyperparameter reshaped to broadcast over this layout's spatial dims."""
        return param.reshape(*param.shape, *([1] * self.ndim))

    # --- the point variances Σ_{p,p} and the canonical matrix view used by nonlinearities -------
    def point_variances(self, t: Tensor) -> Tensor:
        """``Σ_{p,p}``: the diagonal layout of ``t`` (the spatial diagonal of a full tensor)."""
        if not self.full:
            return t
        m = len(self.spatial)
        for axis in range(m):
            # each diagonal is appended last, so after m steps the axes are back in order
            first = -2 * m + axis
            t = torch.diagonal(t, dim1=first, dim2=first + 1)
        return t

    def to_matrix(self, t: Tensor) -> Tensor:
        r"""``(..., N1, N2, *S)`` as a batch of matrices of pairs, the form dual activations act on.

        Full layout: ``(..., N1·P, N2·P)`` with rows (point, position) and columns (point, position).
        Diagonal layout: ``(..., *spatial, N1, N2)``. Vectors: unchanged.
        """
        m = len(self.spatial)
        if m == 0:
            return t
        if not self.full:
            return t.movedim(tuple(range(-m - 2, -m)), (-2, -1))
        batch = t.shape[: -2 - 2 * m]
        n1, n2 = t.shape[-2 - 2 * m], t.shape[-1 - 2 * m]
        first = [len(batch) + 2 + 2 * a for a in range(m)]
        second = [f + 1 for f in first]
        nb = len(batch)
        t = t.permute(*range(nb), nb, *first, nb + 1, *second)
        return t.reshape(*batch, n1 * self.positions, n2 * self.positions)

    def from_matrix(self, t: Tensor, n1: int, n2: int) -> Tensor:
        """The inverse of :meth:`to_matrix` for ``n1`` by ``n2`` points."""
        m = len(self.spatial)
        if m == 0:
            return t
        if not self.full:
            return t.movedim((-2, -1), tuple(range(-m - 2, -m)))
        batch = t.shape[:-2]
        nb = len(batch)
        t = t.reshape(*batch, n1, *self.spatial, n2, *self.spatial)
        order = [*range(nb), nb, nb + 1 + m]
        for a in range(m):
            order += [nb + 1 + a, nb + 2 + m + a]
        return t.permute(*order)

    def rows_matrix(self, points: Tensor) -> Tensor:
        """Point variances ``(..., N1, 1, *spatial)`` as the column ``(..., rows, 1)`` of :meth:`to_matrix`."""
        return self._points_matrix(points, rows=True)

    def cols_matrix(self, points: Tensor) -> Tensor:
        """Point variances ``(..., 1, N2, *spatial)`` as the row ``(..., 1, cols)`` of :meth:`to_matrix`."""
        return self._points_matrix(points, rows=False)

    def _points_matrix(self, points: Tensor, rows: bool) -> Tensor:
        m = len(self.spatial)
        if m == 0:
            return points
        if not self.full:
            return points.movedim(tuple(range(-m - 2, -m)), (-2, -1))
        points = points.movedim(-m - 1 if rows else -m - 2, -1)  # the singleton pair dim goes last
        flat = points.reshape(*points.shape[: -m - 2], -1)
        return flat.unsqueeze(-1) if rows else flat.unsqueeze(-2)

    def rows_broadcast(self, points: Tensor) -> Tensor:
        """Point variances ``(..., N1, 1, *spatial)`` broadcastable against a tensor of this layout."""
        return self._interleave(points, rows=True)

    def cols_broadcast(self, points: Tensor) -> Tensor:
        """Point variances ``(..., 1, N2, *spatial)`` broadcastable against a tensor of this layout."""
        return self._interleave(points, rows=False)

    def _interleave(self, points: Tensor, rows: bool) -> Tensor:
        if not self.full:
            return points
        m = len(self.spatial)
        base = points.dim() - m
        for axis in range(m):
            points = points.unsqueeze(base + 2 * axis + (1 if rows else 0))
        return points

    # --- reductions and layout changes ------------------------------------------------------
    def diagonal(self) -> "Layout":
        return Layout(self.spatial, full=False)

    def mean_all(self, t: Tensor) -> Tensor:
        """Average over all spatial entries (global average pooling of a full tensor)."""
        return t.mean(dim=tuple(range(-self.ndim, 0))) if self.ndim else t

    def mean_diagonal(self, t: Tensor) -> Tensor:
        """Average of :math:`\\Sigma_{p,p}` over positions (flattening followed by a dense layer)."""
        t = self.point_variances(t)
        m = len(self.spatial)
        return t.mean(dim=tuple(range(-m, 0))) if m else t


@dataclass(frozen=True)
class Window:
    """One spatial axis of a convolution or pooling window: size, stride and padding amounts."""

    size: int
    stride: int
    before: int
    after: int
    circular: bool

    def output_size(self, length: int) -> int:
        return (length + self.before + self.after - self.size) // self.stride + 1


def window_geometry(length: int, size: int, stride: int, padding: Padding) -> Window:
    """The padding of one axis, as in TensorFlow / Neural Tangents.

    ``valid``: no padding, :math:`\\lfloor (L - k)/s \\rfloor + 1` outputs; ``same`` (zeros) and
    ``circular`` (wrap-around): :math:`\\lceil L/s \\rceil` outputs, the total padding split with
    the smaller half before.
    """
    if padding == "valid":
        return Window(size, stride, 0, 0, False)
    out = -(-length // stride)
    total = max((out - 1) * stride + size - length, 0)
    return Window(size, stride, total // 2, total - total // 2, padding == "circular")


def circular_index(length: int, window: Window, device: torch.device | None = None) -> Tensor:
    """The source positions of an axis of ``length`` padded circularly by ``window``.

    Padded position ``j`` holds input position ``(j - before) mod length``, as ``numpy.pad(mode="wrap")``
    (and Neural Tangents' circular padding) define it: a padding longer than the input, which a
    window longer than the input needs, wraps around more than once.
    """
    return torch.arange(-window.before, length + window.after, device=device) % length


def pad(t: Tensor, dim: int, window: Window) -> Tensor:
    """Pad dimension ``dim`` of ``t`` with zeros or circularly (see :func:`circular_index`)."""
    if window.before == 0 and window.after == 0:
        return t
    length = t.shape[dim]
    if window.circular:
        return t.index_select(dim, circular_index(length, window, t.device))
    else:
        shape = list(t.shape)
        shape[dim] = window.before
        before = t.new_zeros(shape)
        shape[dim] = window.after
        parts = [before, t, t.new_zeros(shape)]
    return torch.cat(parts, dim=dim)


def convolve(t: Tensor, layout: Layout, windows: tuple[Window, ...]) -> Tensor:
    r"""The averaging of a convolution over its window, on every spatial axis.

    .. math::
        \Sigma'_{p, p'} = \frac{1}{|w|} \sum_{\delta \in w} \Sigma_{s p + \delta,\, s p' + \delta}

    (the same shift :math:`\delta` on both sides; padded positions hold zero, or wrap around).
    In the diagonal layout this maps :math:`\Sigma_{p,p}` to :math:`\Sigma'_{p,p}` on its own.
    Zero padding is never materialised: each shift adds the overlapping slice of the input.
    """
    for axis, window in enumerate(windows):
        dims = layout.axis_dims(axis)
        if window.circular:
            for dim in dims:
                t = pad(t, dim, window)
            t = _shifted_sum(t, dims, Window(window.size, window.stride, 0, 0, False))
        else:
            t = _shifted_sum(t, dims, window)
    return t


def _shifted_sum(t: Tensor, dims: tuple[int, ...], window: Window) -> Tensor:
    """``out[p] = mean_δ t[s p + δ - before]`` along every dim of ``dims`` at once (zero outside)."""
    length = t.shape[dims[0]]
    out_len = window.output_size(length)
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = out_len
    out = t.new_zeros(shape)
    for delta in range(window.size):
        offset = delta - window.before  # source = stride * p + offset
        lo = 0 if offset >= 0 else (-offset + window.stride - 1) // window.stride
        hi = min(out_len, (length - 1 - offset) // window.stride + 1)
        if hi <= lo:
            continue
        start = window.stride * lo + offset
        target = [slice(None)] * t.dim()
        source = [slice(None)] * t.dim()
        for dim in dims:
            target[dim] = slice(lo, hi)
            source[dim] = slice(start, start + window.stride * (hi - lo - 1) + 1, window.stride)
        out[tuple(target)] += t[tuple(source)]
    return out / window.size


def pool(t: Tensor, layout: Layout, windows: tuple[Window, ...], average: bool = True) -> Tensor:
    r"""Average pooling of a full-layout tensor on every spatial axis.

    .. math::
        \Sigma'_{p, p'} = \frac{1}{|w|^2} \sum_{\delta, \delta' \in w} \Sigma_{s p + \delta,\, s p' + \delta'}

    With ``average=False``, sum pooling: the same window sums without the factor :math:`1/|w|^2`.
    """
    if not layout.full:
        raise ValueError("pooling needs the full position-by-position covariance")
    for axis, window in enumerate(windows):
        for dim in layout.axis_dims(axis):
            t = pad(t, dim, window)
            windowed = t.unfold(dim, window.size, window.stride)
            t = windowed.mean(-1) if average else windowed.sum(-1)
    return t


@dataclass(frozen=True)
class TransposedWindow:
    r"""One spatial axis of a transposed convolution, as ``jax.lax.conv_transpose`` defines it.

    Output position :math:`p` receives input position :math:`q` through tap :math:`t` when
    :math:`s q = p + t - a` (``shift`` :math:`a`); ``output`` is the number of output positions.
    """

    size: int
    stride: int
    shift: int
    output: int


def transposed_geometry(length: int, size: int, stride: int, padding: Literal["same", "valid"]) -> TransposedWindow:
    r"""The geometry of one axis of a transposed convolution on ``length`` positions.

    ``"valid"``: :math:`L s + \max(k - s, 0)` outputs and :math:`a = k - 1`; ``"same"``:
    :math:`L s` outputs and :math:`a = k - 1` if :math:`s > k - 1`, else
    :math:`\lceil (k + s - 2)/2 \rceil` (the padding of ``jax.lax.conv_transpose`` and Neural Tangents).
    """
    if padding == "valid":
        return TransposedWindow(size, stride, size - 1, length * stride + max(size - stride, 0))
    shift = size - 1 if stride > size - 1 else -(-(size + stride - 2) // 2)
    return TransposedWindow(size, stride, shift, length * stride)


def transpose_convolve(t: Tensor, layout: Layout, windows: tuple[TransposedWindow, ...]) -> Tensor:
    r"""The averaging of a transposed convolution over its taps, on every spatial axis.

    .. math::
        \Sigma'_{p, p'} = \frac{1}{k} \sum_{t} \Sigma_{q(p, t),\, q(p', t)}, \qquad s\, q(p, t) = p + t - a,

    with zero where :math:`q` is not an input position (not an integer, or outside). The input is
    dilated by the stride (:math:`s - 1` zeros between positions), after which this is a stride-1
    window sum with :math:`a` zeros before (:func:`convolve`'s shifted sums); like a convolution,
    it maps the diagonal :math:`\Sigma_{p,p}` on its own.
    """
    for axis, window in enumerate(windows):
        dims = layout.axis_dims(axis)
        if window.stride > 1:
            t = _dilate(t, dims, window.stride)
        length = t.shape[dims[0]]
        after = window.output - 1 - length - window.shift + window.size
        t = _shifted_sum(t, dims, Window(window.size, 1, window.shift, after, False))
    return t


def _dilate(t: Tensor, dims: tuple[int, ...], stride: int) -> Tensor:
    """``stride - 1`` zeros between consecutive entries along every dim of ``dims`` (out of place)."""
    for dim in dims:
        dim %= t.dim()
        length = t.shape[dim]
        spread = t.unsqueeze(dim + 1)  # (..., L, 1, ...)
        shape = list(spread.shape)
        shape[dim + 1] = stride - 1
        spread = torch.cat([spread, spread.new_zeros(shape)], dim=dim + 1)  # (..., L, s, ...)
        t = spread.flatten(dim, dim + 1).narrow(dim, 0, (length - 1) * stride + 1)
    return t


def diagonal_to_full(t: Tensor, layout: Layout) -> Tensor:
    r"""The full layout of a covariance that is zero between different positions.

    ``t`` holds :math:`\Sigma_{p,p}` in ``layout``'s diagonal layout; the result holds
    :math:`\Sigma_{p,p'} = \delta_{pp'} \Sigma_{p,p}` in the full layout of ``layout.spatial``.
    """
    m = len(layout.spatial)
    for done in range(m):
        # the first remaining position dim (before the ``done`` pairs) becomes a pair appended last
        t = torch.diag_embed(t.movedim(-m - done, -1), dim1=-2, dim2=-1)
    return t
