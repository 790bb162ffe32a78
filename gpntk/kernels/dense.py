r"""Dense evaluation of a network's kernels: run the layer recursion on whole matrices.

This is the backend behind :class:`~gpntk.kernels.NTKKernel` and
:class:`~gpntk.kernels.NNGPKernel` for matrices that fit in memory. :func:`covariance_function`
is the module-level function that GPyTorch's ``KernelLinearOperator`` calls with the inputs and
the hyperparameter tensors as arguments (it never closes over parameters, so batching, indexing
and gradients follow GPyTorch's own machinery).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..layers.base import Hyperparameters, Layer
from ..state import KernelState

__all__ = ["covariance_function", "kernel_diagonal", "nngp_and_ntk", "same_inputs"]

Output = Literal["ntk", "nngp"]


def same_inputs(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x1`` and ``x2`` hold the same points (then diagonals use the per-point recursion)."""
    return x1 is x2 or (x1.shape == x2.shape and bool(torch.equal(x1, x2)))


def _readout(state: KernelState, output: Output) -> Tensor:
    return state.cov12 if output == "nngp" else state.ntk_or_zeros()


def covariance_function(x1: Tensor, x2: Tensor, *, net: Layer, output: Output, **hyper: Tensor) -> Tensor:
    r"""The kernel matrix ``(..., n1, n2)`` between ``x1`` (..., n1, d) and ``x2`` (..., n2, d).

    ``hyper`` holds the network's hyperparameter tensors (``(..., 1, 1)`` each) keyed as in
    :class:`~gpntk.layers.base.Hyperparameters`; ``output`` picks the NTK :math:`\Theta` or the
    NNGP :math:`\Sigma` of the readout.
    """
    state = KernelState.from_inputs(
        x1, x2, diag=False, same_inputs=same_inputs(x1, x2), track_ntk=output == "ntk"
    )
    state = net.kernel_map(state, Hyperparameters(net, hyper))
    out = _readout(state, output)
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(h.shape[:-2] for h in hyper.values()))
    return out.expand(*batch, x1.shape[-2], x2.shape[-2])


def kernel_diagonal(x1: Tensor, x2: Tensor, *, net: Layer, output: Output, hyper: dict[str, Tensor]) -> Tensor:
    r"""The diagonal :math:`k(x_{1,i}, x_{2,i})`, shape ``(..., n)``, without forming a matrix.

    When ``x1`` and ``x2`` are the same points this is the exact per-point recursion on the
    variances :math:`\Sigma(x, x)`, :math:`\Theta(x, x)` (differentiable in both ``x1`` and
    ``x2``); otherwise each pair is evaluated on its own.
    """
    batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(h.shape[:-2] for h in hyper.values()))
    if same_inputs(x1, x2):
        state = KernelState.from_inputs(x1, x2, diag=True, same_inputs=True, track_ntk=output == "ntk")
        state = net.kernel_map(state, Hyperparameters(net, hyper))
        out = _readout(state, output).squeeze(-1)
    else:
        # every pair (x1_i, x2_i) as its own 1 x 1 kernel, with the point index as a batch dimension
        hyper = {name: value.unsqueeze(-3) for name, value in hyper.items()}
        out = covariance_function(x1.unsqueeze(-2), x2.unsqueeze(-2), net=net, output=output, **hyper)
        out = out[..., 0, 0]
    return out.expand(*batch, x1.shape[-2])


def nngp_and_ntk(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    detach_hyperparameters: bool = False,
    track_ntk: bool = True,
) -> tuple[Tensor, Tensor | None]:
    r"""Both kernel matrices :math:`(\Sigma(x_1, x_2), \Theta(x_1, x_2))` from one pass of the recursion.

    ``x1`` is ``(..., n1, d)``, ``x2`` is ``(..., n2, d)`` (``None`` for ``x1``); the network's
    current hyperparameters are cast to the dtype and device of ``x1`` (and treated as constants
    with ``detach_hyperparameters``). With ``track_ntk=False`` only the NNGP is computed (the NTK
    is returned as ``None``). Used where both kernels are needed at once (the trained-ensemble
    posterior).
    """
    x2 = x1 if x2 is None else x2
    hyper = Hyperparameters.collect(net, like=x1)
    if detach_hyperparameters:
        hyper = {name: value.detach() for name, value in hyper.items()}
    state = KernelState.from_inputs(x1, x2, diag=False, same_inputs=same_inputs(x1, x2), track_ntk=track_ntk)
    state = net.kernel_map(state, Hyperparameters(net, hyper))
    return state.cov12, (state.ntk_or_zeros() if track_ntk else None)
