r"""Per-point values computed once per point in compiled kernels, not once per pair.

A closed-form dual (:mod:`gpntk.activations.arccos`) needs, besides the pair's covariance
:math:`q_{12}`, per-point quantities of both points: the variance scaled by a power of two, the
scale, :math:`\sqrt{q_{ii}}` (:func:`~gpntk.activations.base.correlation`). Eagerly each is a
tensor of ``n`` numbers, computed once. :func:`torch.compile`'s inductor backend, however, inlines
a cheap elementwise expression into every loop that reads it: in the fused loop over the
:math:`n_1 \times n_2` pairs of a block the per-point square roots and scalings of the columns
were recomputed for every pair, one vector square root per pair and layer on top of the two the
pair itself needs. :func:`per_point` marks such a tensor as one to compute once (stored) and read
in the pair loop.

The mark is an opaque identity operator (``gpntk::per_point``, a copy) that inductor cannot
inline. It is applied only where it is exact and safe: while compiling, with no ``torch.func``
transform and no forward-mode dual level active (the operator has no forward-mode derivative, and
PyTorch would silently drop a tangent through it). Elsewhere the tensor itself is returned, so
eager evaluation and every transform are untouched. Reverse mode passes the gradient through
unchanged (differentiable again, so double backward works). The values are the eager ones (tested
to 1e-14 against eager evaluation; a whole kernel block compiled with and without the mark
measured bitwise equal).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

__all__ = ["per_point"]


@torch.library.custom_op("gpntk::per_point", mutates_args=())
def _stored_copy(x: Tensor) -> Tensor:
    """A copy of ``x``: the identity inductor cannot see through."""
    return x.clone()


@_stored_copy.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _backward(ctx: object, grad: Tensor) -> Tensor:
    return grad


_stored_copy.register_autograd(_backward)


def per_point(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors``, stored once rather than recomputed per pair when compiled (see the module docstring).

    Each tensor holds per-point values, e.g. ``(..., n, 1)`` or ``(..., 1, n)`` (any shapes, one
    dtype). When the mark applies they go through one opaque call (flattened and concatenated,
    then split back into views of their shapes), since each call costs some microseconds.
    """
    if not _marks_apply():
        return tensors
    stored = _stored_copy(torch.cat([t.reshape(-1) for t in tensors]))
    pieces = stored.split([t.numel() for t in tensors])
    return tuple(piece.view(t.shape) for piece, t in zip(pieces, tensors))


def _marks_apply() -> bool:
    """Compiling, with no ``torch.func`` transform and no forward-mode dual level active.

    Both probes are private to PyTorch; where one is missing (another version) the mark is left out.
    """
    if not torch.compiler.is_compiling():
        return False
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    dual_level = getattr(forward_ad, "_current_level", None)
    return transforms_active is not None and not transforms_active() and isinstance(dual_level, int) and dual_level < 0
