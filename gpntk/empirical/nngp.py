r"""The empirical NNGP of a network: products of its outputs.

.. math::
    \hat\Sigma_{ab}(x, x') = f_a(x)\, f_b(x'),

one sample of the NNGP kernel; its expectation over random initialisations of
``net.finite(width)`` is the finite-width NNGP, which converges to the infinite-width one as the
width grows. Differentiable in the inputs when they require grad, never in the parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .._validation import choice_argument
from .checks import check_rows
from .network import outputs_of_inputs

__all__ = ["empirical_nngp", "mean_output_products"]


def mean_output_products(f1: Tensor, f2: Tensor) -> Tensor:
    r"""``(..., n1, n2)``: :math:`\frac1k \sum_a f_a(x_{1,i}) f_a(x_{2,j})` (the channel-averaged NNGP).

    From the outputs ``f1`` ``(..., n1, k)`` and ``f2`` ``(..., n2, k)``.
    """
    return (f1 @ f2.transpose(-2, -1)) / f1.shape[-1]


def empirical_nngp(
    model: nn.Module, x1: Tensor, x2: Tensor | None = None, *, reduce: Literal["mean", "none"] = "mean"
) -> Tensor:
    r"""One sample of the NNGP: :math:`\hat\Sigma(x_1, x_2) = f(x_1) f(x_2)^\top`, averaged over output channels.

    With ``reduce="none"`` the ``(n1, n2, k, k)`` outer products. Its expectation over random
    initialisations is the finite-width NNGP kernel. Differentiable in ``x1``, ``x2`` when they
    require grad (never in the parameters).
    """
    x2 = x1 if x2 is None else x2
    check_rows(x1, x2, model)
    choice_argument("reduce", reduce, ("mean", "none"))
    f1 = outputs_of_inputs(model, x1)
    f2 = f1 if x2 is x1 else outputs_of_inputs(model, x2)
    if reduce == "mean":  # never the (n1, n2, k, k) outer products: k can be in the thousands
        return mean_output_products(f1, f2)
    return torch.einsum("ia,jb->ijab", f1, f2)
