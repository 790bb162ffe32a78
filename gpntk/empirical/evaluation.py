r"""Kernel matrices and diagonals of a network over batched inputs, as :class:`~gpntk.EmpiricalNTKKernel` calls them.

:func:`empirical_covariance` gives the ``(..., n1, n2)`` matrix and :func:`empirical_diagonal`
the ``(..., n)`` values :math:`k(x_{1,i}, x_{2,i})` of the channel-averaged (or one channel's)

.. math::
    \hat\Theta(x, x') = \frac1k \sum_{a=1}^k \nabla_\theta f_a(x) \cdot \nabla_\theta f_a(x'),
    \qquad \hat\Sigma(x, x') = \frac1k \sum_{a=1}^k f_a(x)\, f_a(x').

Both run the network in eval mode (training flags restored afterwards) and in its own dtype,
check that it maps rows to rows, and return the kernel in the inputs' dtype. Batch dimensions
broadcast; the NTK matrix of each batch element is computed by
:func:`~gpntk.empirical.ntk.empirical_ntk` (equal-valued elements once, unless a gradient is
due), its diagonal by :func:`~gpntk.empirical.ntk.paired_ntk`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from .channels import OutputChannel
from .checks import check_network_dtype, check_outputs
from .network import differentiable, ensure_initialized, model_tensor, outputs_of_inputs
from .nngp import mean_output_products
from .ntk import empirical_ntk, paired_ntk

__all__ = ["Kind", "empirical_covariance", "empirical_diagonal"]

#: the kernel of a network: its NTK :math:`\hat\Theta` or its NNGP :math:`\hat\Sigma`
Kind = Literal["ntk", "nngp"]


def empirical_covariance(
    x1: Tensor, x2: Tensor, *, model: nn.Module, kind: Kind, output: int | None
) -> Tensor:
    r"""The kernel matrix ``(..., n1, n2)`` of ``model`` between ``x1`` (..., n1, d) and ``x2`` (..., n2, d).

    ``kind`` picks :math:`\hat\Theta` or :math:`\hat\Sigma`, ``output`` the channel (``None``: the
    mean over channels). Batch dimensions broadcast (for the NTK, the matrix of each distinct batch
    element is computed once, unless the inputs require grad). Differentiable in ``x1``, ``x2``
    when they require grad.
    """
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    n1, n2, d = x1.shape[-2], x2.shape[-2], x1.shape[-1]
    dtype = x1.dtype
    keep_graph = differentiable(x1, x2)
    # equal values of two different tensors share one computation only where no gradient is due
    same = x1 is x2 if keep_graph else same_inputs(x1, x2)
    count = math.prod(batch)
    if n1 == 0 or n2 == 0 or count == 0:
        return torch.zeros(*batch, n1, n2, dtype=dtype, device=x1.device)
    with _evaluating(model, output, x1, x2) as (net, xa, xb):
        xa = xa.expand(*batch, n1, d).reshape(count, n1, d)
        xb = xa if same else xb.expand(*batch, n2, d).reshape(count, n2, d)
        if kind == "nngp":
            f1 = outputs_of_inputs(net, xa.reshape(-1, d)).reshape(count, n1, -1)
            f2 = f1 if same else outputs_of_inputs(net, xb.reshape(-1, d)).reshape(count, n2, -1)
            out = mean_output_products(f1, f2)
        elif n1 == 1 and n2 == 1 and count > 1:  # single entries, e.g. a batch of q = 1 candidates
            out = paired_ntk(net, xa[:, 0], xb[:, 0], same=same)
        else:
            out = torch.stack(_ntk_blocks(net, xa, xb, same=same, reuse=not keep_graph))
            if same:  # exactly symmetric (the layer-by-layer sums are only so up to rounding)
                out = (out + out.transpose(-2, -1)) / 2
    return out.reshape(*batch, n1, n2).to(dtype)


def empirical_diagonal(
    x1: Tensor, x2: Tensor, *, model: nn.Module, kind: Kind, output: int | None
) -> Tensor:
    r"""The values :math:`k(x_{1,i}, x_{2,i})`, shape ``(..., n)``, without forming a matrix.

    For the NTK from each point's Jacobian (:math:`\|\nabla_\theta f_a(x_i)\|^2` on the same
    points), layer by layer for networks built by ``net.finite`` and in chunks of
    :func:`torch.func.jacrev` Jacobians otherwise; for the NNGP :math:`f_a(x_{1,i}) f_a(x_{2,i})`;
    both averaged over channels (``output=None``) or of channel ``output``.
    """
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    n, d = x1.shape[-2], x1.shape[-1]
    dtype = x1.dtype
    same = x1 is x2 if differentiable(x1, x2) else same_inputs(x1, x2)
    if n * math.prod(batch) == 0:
        return torch.zeros(*batch, n, dtype=dtype, device=x1.device)
    with _evaluating(model, output, x1, x2) as (net, xa, xb):
        xa = xa.expand(*batch, n, d).reshape(-1, d)
        xb = xa if same else xb.expand(*batch, n, d).reshape(-1, d)
        if kind == "nngp":
            fa = outputs_of_inputs(net, xa)
            fb = fa if same else outputs_of_inputs(net, xb)
            out = (fa * fb).mean(-1)
        else:
            out = paired_ntk(net, xa, xb, same=same)
    return out.reshape(*batch, n).to(dtype)


def same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x1`` and ``x2`` are one tensor or hold equal values of one shape."""
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


@contextmanager
def _evaluating(
    model: nn.Module, output: int | None, x1: Tensor, x2: Tensor
) -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
    """Eval mode, lazy parameters materialised, inputs in the model's dtype, the shapes checked.

    Yields ``(net, x1, x2)``: the network to evaluate (``model`` or its channel ``output``) and the
    inputs converted to the network's dtype (detached unless they require grad in grad mode).
    ``x1`` must hold at least one point.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        probe = x1.detach().reshape(-1, x1.shape[-1])[:2]
        with torch.no_grad():
            ensure_initialized(model, probe)
        tensor = model_tensor(model)
        if tensor is not None and tensor.device != x1.device:
            raise ValueError(f"the inputs are on {x1.device} but the network is on {tensor.device}")
        dtype = x1.dtype if tensor is None else tensor.dtype
        check_network_dtype(dtype)
        keep = differentiable(x1, x2)
        xa = (x1 if keep else x1.detach()).to(dtype)
        xb = xa if x2 is x1 else (x2 if keep else x2.detach()).to(dtype)
        check_outputs(model, output, probe.to(dtype), x1, x2)
        yield (model if output is None else OutputChannel(model, output)), xa, xb
    finally:
        for module, training in modes:
            module.training = training


def _ntk_blocks(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool, reuse: bool = True) -> list[Tensor]:
    """The ``(n1, n2)`` NTK of every batch element of ``xa`` (B, n1, d), ``xb`` (B, n2, d).

    With ``reuse`` (no gradient due) equal-valued batch elements are computed once.
    """
    done: list[tuple[Tensor, Tensor, Tensor]] = []
    blocks = []
    for a, b in zip(xa, xb):
        for da, db, value in done if reuse else ():
            if torch.equal(da, a) and torch.equal(db, b):
                blocks.append(value)
                break
        else:
            value = empirical_ntk(net, a, None if same or (reuse and same_inputs(a, b)) else b)
            done.append((a, b, value))
            blocks.append(value)
    return blocks
