r"""Coincident inputs: pairs :math:`(i, j)` with :math:`x_{1,i} = x_{2,j}` exactly.

At a pair of identical inputs every arc-cosine-type kernel sits at correlation one, where its
closed form is ill-conditioned: :math:`\theta = \arccos\rho` turns a rounding error of
:math:`10^{-16}` in :math:`\rho` into an error of :math:`10^{-8}` in :math:`\theta` (measured:
:math:`K_{00} - K_{01} = 2.3 \cdot 10^{-7}` for two identical rows under a ReLU NTK). The kernel of a
point with itself has an exact per-point recursion (:meth:`gpntk.activations.Activation.dual_diag`),
so gpntk finds the coincident pairs exactly, by comparing the rows of the inputs, and gives them the
per-point values. Their *derivatives* are those of the pair formula: the per-point value is just a
more accurate evaluation of the same function :math:`k(x, x')` at :math:`x = x'`, and only the pair
formula knows how :math:`k` changes when one argument moves away from the other (second
derivatives of :math:`k(x, p)` in :math:`x` at :math:`x = p` need it). :func:`exact_values` does
both: the value of the per-point tensor, the autograd graph of the pair tensor.

Detection is exact (rows equal as numbers; ``-0.0`` equals ``0.0``, a row containing NaN equals
nothing): rows get integer ids from ``torch.unique(dim=0)``; under a ``torch.func`` batching
transform (``vmap``, ``jacfwd``, ``hessian``), where data-dependent shapes are not allowed, the rows
are compared elementwise into a mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .._transforms import is_batched

__all__ = ["Coincidence", "RowIds", "exact_values", "coincident_pairs", "same_point_pairs", "common_pairs"]


@dataclass(frozen=True)
class Coincidence:
    r"""The coincident pairs of an ``n1 x n2`` block, in one of two forms.

    * index form (unbatched inputs): ``rows`` :math:`(K,)` the row index :math:`i` and ``flat``
      :math:`(K,)` the flat pair index :math:`i\, n_2 + j` of each coincident pair;
    * mask form: ``mask`` ``(..., n1, n2)``, true at coincident pairs (batched inputs, ``vmap``).
    """

    rows: Tensor | None = None
    flat: Tensor | None = None
    mask: Tensor | None = None


def exact_values(
    pairs: Tensor, points: Tensor, coincidence: Coincidence | None, ndim: int = 0, derivatives: Tensor | None = None
) -> Tensor:
    r"""``pairs`` with each coincident entry's value replaced by its row's entry of ``points``.

    ``pairs`` is ``(..., n1, n2, *S)`` (``ndim`` spatial dims ``S``) and ``points``
    ``(..., n1, 1, *S)`` holds each row point's value with itself. At a coincident pair the result
    is ``points.detach() + (pairs - pairs.detach())``: bitwise the per-point value, with the
    derivatives (of every order, also under ``torch.func``) of the pair formula. ``derivatives``,
    if given, carries those derivatives instead of ``pairs``: one entry per coincident pair
    (``(..., K)``, index form) or a tensor like ``pairs`` (mask form).
    """
    if coincidence is None:
        return pairs
    if coincidence.mask is not None:
        mask = coincidence.mask.reshape(*coincidence.mask.shape, *(1,) * ndim)
        carrier = pairs if derivatives is None else derivatives
        # contiguous like the index form's result, so that later reductions (spatial pooling) sum
        # in the same order whichever form found the pairs
        return torch.where(mask, points.detach() + (carrier - carrier.detach()), pairs).contiguous()
    # index form: rows and flat are set
    rows, flat = cast(Tensor, coincidence.rows), cast(Tensor, coincidence.flat)
    dim = pairs.dim() - 2 - ndim  # the n1 dimension
    shape = pairs.shape
    flat_pairs = pairs.reshape(*shape[:dim], shape[dim] * shape[dim + 1], *shape[dim + 2:])
    selected = flat_pairs.index_select(dim, flat)
    carrier = selected if derivatives is None else derivatives
    point_dim = points.dim() - 2 - ndim
    exact = points.index_select(point_dim, rows).squeeze(point_dim + 1)
    value = (exact.detach() + (carrier - carrier.detach())).expand_as(selected)
    return flat_pairs.index_copy(dim, flat, value).reshape(shape)


class RowIds:
    """Integer ids of the rows of ``x1`` and ``x2``: equal ids for exactly equal rows.

    Computed once for a whole kernel; :meth:`block` then gives the coincident pairs of any block
    of it. ``x1`` is ``(..., n1, d)``, ``x2`` ``(..., n2, d)``.
    """

    def __init__(self, x1: Tensor, x2: Tensor):
        self.identical = x2 is x1
        self.x1, self.x2 = x1, x2
        #: pairs found by comparing rows directly (no ids): under ``vmap``, and for a batch of
        #: kernels with at most ``n1 + n2`` pairs each (``1 x n`` rows, the ``1 x 1`` kernels GPyTorch
        #: builds for diagonals and entries, e.g. ``(n, 15)`` of them in a pivoted-Cholesky backward),
        #: where ids would cost a copy of every row plus a sort, against one boolean per pair and feature
        self.batched = is_batched(x1) or (not self.identical and is_batched(x2)) or self._few_pairs(x1, x2)
        if self.batched:
            return
        a = x1.detach()
        b = a if self.identical else x2.detach()
        d = a.shape[-1]
        rows = a.reshape(-1, d) if self.identical else torch.cat([a.reshape(-1, d), b.reshape(-1, d)])
        count = rows.shape[0]
        if count == 0:
            self.id1 = self.id2 = None
            self.duplicates = False
            return
        has_nan = rows.isnan().any(-1) if rows.is_floating_point() or rows.is_complex() else None
        if has_nan is not None:
            rows = torch.where(has_nan.unsqueeze(-1), torch.zeros_like(rows), rows)
        if d == 0:
            inverse = torch.zeros(count, dtype=torch.long, device=rows.device)
            distinct = 1
        else:
            inverse, distinct = _distinct_row_ids(rows)
        if has_nan is not None and bool(has_nan.any()):
            # a row with NaN equals no row: give it an id of its own
            own = -1 - torch.arange(count, device=rows.device)
            inverse = torch.where(has_nan, own, inverse)
            distinct = -1  # not the fast path
        self.duplicates = distinct != count
        n1 = a.reshape(-1, d).shape[0]
        self.id1 = inverse[:n1].reshape(a.shape[:-1])
        self.id2 = self.id1 if self.identical else inverse[n1:].reshape(b.shape[:-1])

    @staticmethod
    def _few_pairs(x1: Tensor, x2: Tensor) -> bool:
        """Batched inputs whose kernels have at most ``n1 + n2`` pairs: compared directly, without ids."""
        n1, n2 = x1.shape[-2], x2.shape[-2]
        return max(x1.dim(), x2.dim()) > 2 and n1 * n2 <= n1 + n2

    def block(self, rows: slice | None = None, cols: slice | None = None) -> Coincidence | None:
        """The coincident pairs of the block ``x1[..., rows, :]`` by ``x2[..., cols, :]`` (``None``: none)."""
        rows = slice(None) if rows is None else rows
        cols = slice(None) if cols is None else cols
        if self.batched:
            a, b = self.x1[..., rows, :], self.x2[..., cols, :]
            mask = (a.unsqueeze(-2) == b.unsqueeze(-3)).all(-1)
            if is_batched(mask) or bool(mask.any()):  # under vmap no data-dependent branch
                return Coincidence(mask=mask)
            return None
        if self.id1 is None:
            return None
        assert self.id2 is not None  # set together with id1
        id1, id2 = self.id1[..., rows], self.id2[..., cols]
        n1, n2 = id1.shape[-1], id2.shape[-1]
        if self.id1.dim() > 1 or self.id2.dim() > 1:
            mask = id1.unsqueeze(-1) == id2.unsqueeze(-2)
            return Coincidence(mask=mask) if bool(mask.any()) else None
        if not self.duplicates:
            if not self.identical:
                return None
            # distinct rows of one tensor: only each row with itself
            start1, start2 = rows.indices(self.id1.shape[-1])[0], cols.indices(self.id2.shape[-1])[0]
            first, last = max(start1, start2), min(start1 + n1, start2 + n2)
            if first >= last:
                return None
            # as a mask: a where() that a compiled recursion fuses into its loop over the pairs (an
            # index_copy makes it write out every layer's n1 x n2 intermediates; a 512 x 512
            # diagonal block of a depth-3 ReLU NTK, one thread: 9.0 ms, as a mask 6.5 ms, a block
            # off the diagonal 6.4 ms)
            rows_at = torch.arange(start1, start1 + n1, device=id1.device)
            cols_at = torch.arange(start2, start2 + n2, device=id1.device)
            return Coincidence(mask=rows_at.unsqueeze(-1) == cols_at)
        i, j = (id1.unsqueeze(-1) == id2.unsqueeze(-2)).nonzero(as_tuple=True)
        if i.numel() == 0:
            return None
        return Coincidence(rows=i, flat=i * n2 + j)


def _distinct_row_ids(rows: Tensor) -> tuple[Tensor, int]:
    """``(ids, number of distinct rows)`` of ``rows`` ``(count, d)``: equal ids exactly for equal rows.

    Rows are grouped by a hash of their bits (one sort of ``count`` integers): distinct hashes mean
    distinct rows, and each row with the hash of an earlier one is compared with that row. Only a
    collision (equal hashes of different rows) falls back to sorting the rows themselves
    (``torch.unique(dim=0)``, a row comparison per step, 20–40 times slower), which decides exactly.
    """
    count = rows.shape[0]
    if rows.is_floating_point() and rows.element_size() in (4, 8) and not rows.is_complex():
        # +0.0 for -0.0 (equal as numbers), then the bits as integers, mixed by a polynomial hash
        # (integer products wrap around; any function of the bits will do)
        bits = (rows + 0.0).contiguous().view(torch.int64 if rows.element_size() == 8 else torch.int32).long()
        weights = _HASH_BASE ** torch.arange(1, bits.shape[-1] + 1, device=rows.device, dtype=torch.long)
        hashes = (bits * weights).sum(-1)
        ids, counts = torch.unique(hashes, return_inverse=True, return_counts=True)[1:]
        distinct = counts.shape[0]
        if distinct == count:
            return ids, count
        # the first row of each hash, against which every row with that hash is compared
        first = torch.full((distinct,), count, dtype=torch.long, device=rows.device)
        first = first.scatter_reduce(0, ids, torch.arange(count, device=rows.device), "amin")
        if bool((rows == rows[first[ids]]).all()):
            return ids, distinct
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return inverse, unique.shape[0]


#: an odd multiplier for :func:`_distinct_row_ids`' hash (the 64-bit golden-ratio constant, as a signed integer)
_HASH_BASE = -7046029254386353131


def coincident_pairs(x1: Tensor, x2: Tensor) -> Coincidence | None:
    """The coincident pairs of ``x1`` (``(..., n1, d)``) and ``x2`` (``(..., n2, d)``)."""
    return RowIds(x1, x2).block()


def same_point_pairs(coincidence: Coincidence | None, same_inputs: bool, n1: int, n2: int) -> Coincidence | None:
    r"""Only the pairs of ``coincidence`` that are one point with itself: :math:`(i, i)` when ``same_inputs``.

    After a layer that draws independent noise for every evaluation of an input (``Dropout`` in
    train mode), identical rows of *different* inputs (``x1_i = x2_j`` with ``x1`` not ``x2``, or
    duplicated rows ``i != j`` of one input) are different draws and no longer coincident; only a
    point with itself (the diagonal of a kernel of the same inputs, ``same_inputs``) stays so. No
    data-dependent shape: the index form is the ``n1 x n1`` diagonal, the mask form is intersected
    with it.
    """
    if coincidence is None or not same_inputs:
        return None
    if coincidence.mask is not None:
        mask = coincidence.mask
        eye = torch.eye(n1, n2, dtype=torch.bool, device=mask.device)
        return Coincidence(mask=mask & eye)
    assert coincidence.rows is not None  # index form
    i = torch.arange(min(n1, n2), device=coincidence.rows.device)
    return Coincidence(rows=i, flat=i * (n2 + 1))


def common_pairs(coincidences: list[Coincidence | None]) -> Coincidence | None:
    """The pairs coincident in every one of ``coincidences`` (those of branches merged into one state).

    The same object everywhere (the usual case: every branch saw the same inputs) is returned as
    it is; otherwise the intersection (index form by flat pair index, mask form elementwise).
    """
    first = coincidences[0]
    if all(c is first for c in coincidences):
        return first
    if any(c is None for c in coincidences):
        return None
    result = cast(Coincidence, first)
    for other in coincidences[1:]:
        other = cast(Coincidence, other)
        if result.mask is not None or other.mask is not None:
            if result.mask is None or other.mask is None:
                return None  # never mixed within one evaluation; nothing is coincident then
            result = Coincidence(mask=result.mask & other.mask)
            continue
        rows, flat = cast(Tensor, result.rows), cast(Tensor, result.flat)
        keep = torch.isin(flat, cast(Tensor, other.flat))
        result = Coincidence(rows=rows[keep], flat=flat[keep])
    return result
