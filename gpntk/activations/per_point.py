r"""Per-point values computed once per point in compiled kernels, not once per pair.

A closed-form dual (:mod:`gpntk.activations.arccos`) needs, besides the pair's covariance
:math:`q_{12}`, per-point quantities of both points: the variance scaled by a power of two, the
scale, :math:`\sqrt{q_{ii}}` (:func:`~gpntk.activations.base.correlation`). Eagerly each is a
tensor of ``n`` numbers, computed once. :func:`torch.compile`'s inductor backend, however, inlines
a cheap elementwise expression into every loop that reads it: in the fused loop over the
:math:`n_1 \times n_2` pairs of a block the per-point square roots and scalings of the columns
were recomputed for every pair, one vector square root per pair and layer on top of the two the
pair itself needs. :func:`per_point` marks such a tensor as one to compute once (stored) and read
in the pair loop. Two marks, both exact:

* With no ``torch.func`` transform and no forward-mode dual level active: an opaque identity
  operator (``gpntk::per_point``, a copy) that inductor cannot inline. Reverse mode passes the
  gradient through unchanged (differentiable again, so double backward works). It has no
  forward-mode derivative, and PyTorch would silently drop a tangent through it, hence the
  condition.
* Under a transform or a dual level (the forward-mode tangents of :mod:`gpntk.kernels.tangents`):
  the product with a :math:`1 \times 1` matrix of one, :math:`v \cdot [1]`, a matrix product, which
  inductor leaves to BLAS and therefore stores; its derivatives of every order, in every mode, are
  those of the identity. Each entry is one product :math:`v_i \cdot 1`, exact in IEEE arithmetic
  (a zero may lose its sign). Applied only to float64 tensors on the CPU: reduced-precision matrix
  product modes (TF32 on GPUs, bf16 on CPUs) would round float32 values; elsewhere under
  transforms nothing is marked. Measured on a 512 x 512 block of a depth-3 ReLU NTK with two
  tangents (one thread, alternating calls): 0.86x the time unmarked.

Eager evaluation is untouched. The values are the eager ones (tested to 1e-14 against eager
evaluation; a whole kernel block compiled with and without either mark measured bitwise equal).
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
    dtype). When a mark applies they go through one call (flattened and concatenated, then split
    back into views of their shapes), since each call costs some microseconds.
    """
    mark = _mark()
    if mark is None or not tensors:
        return tensors
    if mark == "product" and not all(t.dtype == torch.float64 and t.device.type == "cpu" for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    stored = _stored_copy(flat) if mark == "copy" else (flat.unsqueeze(-1) @ flat.new_ones(1, 1)).squeeze(-1)
    pieces = stored.split([t.numel() for t in tensors])
    return tuple(piece.view(t.shape) for piece, t in zip(pieces, tensors))


def _mark() -> str | None:
    """``"copy"`` (the opaque operator) while compiling with no ``torch.func`` transform and no
    forward-mode dual level active, ``"product"`` (the matrix product) while compiling under one,
    ``None`` when not compiling.

    Both probes are private to PyTorch; where one is missing (another version) nothing is marked.
    """
    if not torch.compiler.is_compiling():
        return None
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    dual_level = getattr(forward_ad, "_current_level", None)
    if transforms_active is None or not isinstance(dual_level, int):
        return None
    return "product" if transforms_active() or dual_level >= 0 else "copy"
