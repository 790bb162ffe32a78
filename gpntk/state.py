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

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["KernelState"]


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
    ``same_inputs`` records that ``x1`` and ``x2`` are the same points, so the diagonal of
    ``cov12`` is re-set at every nonlinearity from the exact per-point recursion instead of
    being evaluated through a correlation of exactly one, where closed forms lose accuracy and
    derivatives.
    """

    cov12: Tensor
    var1: Tensor
    var2: Tensor
    ntk12: Tensor | None = None
    diag: bool = False
    same_inputs: bool = False
    track_ntk: bool = True

    @staticmethod
    def from_inputs(x1: Tensor, x2: Tensor, *, diag: bool, same_inputs: bool, track_ntk: bool) -> "KernelState":
        r"""The input layer's state: :math:`\Sigma_0(x, x') = x \cdot x' / d`, :math:`\Theta_0 = 0`.

        ``x1`` is ``(..., n1, d)`` and ``x2`` is ``(..., n2, d)``. In per-point mode (``diag``)
        they hold the same points, and so they do in pair mode with ``same_inputs``.

        Same points given as two different tensors are still two arguments: the variances of
        ``x1`` come from ``x1`` and those of ``x2`` from ``x2``, and every per-point quantity
        :math:`\Sigma(x_i, x_i)` is evaluated at the midpoint :math:`x_1 + (x_2 - x_1)/2`, which
        equals both bitwise and gives each argument its own partial derivative (half the total
        derivative of :math:`k(x, x)`, by symmetry of the kernel). When ``x1 is x2`` this is
        the plain per-point variance.
        """
        d = x1.shape[-1]

        def variance(x: Tensor) -> Tensor:
            return x.square().sum(dim=-1, keepdim=True) / d

        if diag:
            var = variance(midpoint(x1, x2))
            return KernelState(var, var, var, None, diag=True, same_inputs=True, track_ntk=track_ntk)
        var1 = variance(x1)
        var2 = var1.transpose(-1, -2) if x2 is x1 else variance(x2).transpose(-1, -2)
        cov12 = x1 @ x2.transpose(-1, -2) / d
        if same_inputs:
            point_var = var1 if x2 is x1 else variance(midpoint(x1, x2))
            cov12 = set_diagonal(cov12, point_var.squeeze(-1))
        return KernelState(cov12, var1, var2, None, diag=False, same_inputs=same_inputs, track_ntk=track_ntk)

    def replace(self, **changes) -> "KernelState":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def ntk_or_zeros(self) -> Tensor:
        """The NTK, materialising the zero NTK when no trainable layer has been met."""
        if self.ntk12 is None:
            return torch.zeros_like(self.cov12)
        return self.ntk12


def midpoint(x1: Tensor, x2: Tensor) -> Tensor:
    """``x1 + (x2 - x1) / 2``: bitwise ``x1`` where ``x1 == x2``, with derivative 1/2 for each."""
    if x2 is x1:
        return x1
    return x1 + (x2 - x1) / 2


def set_diagonal(matrix: Tensor, diagonal: Tensor) -> Tensor:
    """``matrix`` (..., n, n) with its diagonal replaced by ``diagonal`` (..., n), differentiably."""
    diagonal = diagonal.expand(*matrix.shape[:-1])
    return torch.diagonal_scatter(matrix, diagonal.to(matrix.dtype), dim1=-2, dim2=-1)
