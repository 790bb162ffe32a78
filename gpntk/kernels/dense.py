r"""The dense backend: a network's kernel matrices computed (in blocks) and stored.

This is the backend behind :class:`~gpntk.kernels.NTKKernel` and :class:`~gpntk.kernels.NNGPKernel`
for matrices that fit in memory; :mod:`gpntk.kernels.backends` decides which backend a kernel
matrix gets. :func:`evaluate` fills the matrix block by block (:mod:`gpntk.kernels.planning`),
each block by the recursion of :mod:`gpntk.kernels.engine`; :func:`kernel_diagonal` evaluates only
the diagonal; :func:`nngp_and_ntk` is the functional entry point for both kernels at once.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from ..core.graph_inputs import GraphDataset, NodeGraph
from ..core.hyperparameters import Hyperparameters
from ..core.layer import InputShape, Layer
from .blocked import BOTH, Kept, fill_blocks, recomputed_kernels, wants_recomputed_backward
from .engine import Output, check_finite_kernel, input_layout, run_block, same_inputs
from .fusion import FusionPolicy
from .graph_dataset import dataset_kernel_diagonal, dataset_kernels
from .node_level import node_kernel_diagonal, node_kernels
from .planning import batch_shape_of, block_ranges, default_block_elements

__all__ = [
    "Output", "evaluate", "evaluate_output", "kernel_diagonal", "nngp_and_ntk", "input_layout", "check_finite_kernel",
]


def evaluate(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    *,
    input_shape: InputShape = None,
    track_ntk: bool = True,
    block_elements: int | None = None,
    fusion: FusionPolicy | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""``(Σ(x1, x2), Θ(x1, x2) or None)``, ``(..., n1, n2)`` each, in blocks where needed.

    ``fusion``: the compile policy of the caller (a kernel's or an ensemble's, which counts its
    repeated evaluations); ``None`` for a one-off evaluation (a fresh policy).
    """
    cov, ntk = _evaluate_kept(net, x1, x2, hyper, input_shape, track_ntk, block_elements, fusion, BOTH)
    assert cov is not None  # kept
    return cov, ntk


def evaluate_output(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    output: Output,
    *,
    input_shape: InputShape = None,
    block_elements: int | None = None,
    fusion: FusionPolicy | None = None,
) -> Tensor:
    r"""One kernel matrix, :math:`\Theta(x_1, x_2)` (``output="ntk"``) or :math:`\Sigma(x_1, x_2)` (``"nngp"``).

    As :func:`evaluate`, but only that matrix is stored: for the NTK the recursion still computes
    :math:`\Sigma` block by block, without keeping an :math:`n_1 \times n_2` copy of it.
    """
    ntk = output == "ntk"
    cov, theta = _evaluate_kept(net, x1, x2, hyper, input_shape, ntk, block_elements, fusion, (not ntk, ntk))
    out = theta if ntk else cov
    assert out is not None  # kept
    return out


def _evaluate_kept(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    track_ntk: bool,
    block_elements: int | None,
    fusion: FusionPolicy | None,
    keep: Kept,
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`evaluate` storing only the matrices in ``keep`` (graph inputs: both computed, then dropped)."""
    if isinstance(input_shape, NodeGraph):  # one graph: computed whole, then its entries
        cov, ntk = node_kernels(net, x1, x2, hyper, input_shape, track_ntk)
        return (cov if keep[0] else None), (ntk if keep[1] else None)
    if isinstance(input_shape, GraphDataset):  # graph indices: bucket by bucket of padded graphs
        cov, ntk = dataset_kernels(
            x1, x2, hyper, input_shape,
            lambda fmt, a, b: evaluate(
                net, a, b, hyper, input_shape=fmt, track_ntk=track_ntk, block_elements=block_elements, fusion=fusion
            ),
        )
        return (cov if keep[0] else None), (ntk if keep[1] else None)
    fusion = FusionPolicy() if fusion is None else fusion
    if wants_recomputed_backward(x1, x2, hyper):
        return recomputed_kernels(net, x1, x2, hyper, input_shape, track_ntk, block_elements, fusion, keep)
    return fill_blocks(net, x1, x2, hyper, input_shape, track_ntk, block_elements, fusion, keep=keep)


def kernel_diagonal(
    x1: Tensor,
    x2: Tensor,
    *,
    net: Layer,
    output: Output,
    hyper: dict[str, Tensor],
    input_shape: InputShape = None,
    block_elements: int | None = None,
) -> Tensor:
    r"""The diagonal :math:`k(x_{1,i}, x_{2,i})`, shape ``(..., n)``, without forming a matrix.

    When ``x1 is x2`` this is the exact per-point recursion on the variances :math:`\Sigma(x, x)`,
    :math:`\Theta(x, x)`; otherwise each pair is evaluated on its own, identical pairs taking the
    same per-point values (bitwise, see :mod:`gpntk.core.coincident`) with the derivatives of the pair
    formula in each argument. Points are taken in chunks so that a
    spatial covariance of at most ``block_elements`` numbers is held at once.
    """
    if isinstance(input_shape, NodeGraph):
        return node_kernel_diagonal(net, x1, x2, hyper, input_shape, output == "ntk")
    if isinstance(input_shape, GraphDataset):
        return dataset_kernel_diagonal(
            x1, x2, hyper, input_shape,
            lambda fmt, a, b: kernel_diagonal(
                a, b, net=net, output=output, hyper=hyper, input_shape=fmt, block_elements=block_elements
            ),
        )
    batch = batch_shape_of(x1, x2, hyper)
    budget = default_block_elements(x1.device) if block_elements is None else block_elements
    per_point = input_layout(net, input_shape).elements_per_pair
    chunks = block_ranges(x1.shape[-2], max(1, budget // per_point))
    track_ntk = output == "ntk"
    parts = []
    same = x1 is x2
    # equal values in two tensors: the same points, as for the full matrix (Dropout's self-entries)
    equal = not same and same_inputs(x1, x2)
    for chunk in chunks:
        a = x1[..., chunk, :]
        b = a if x2 is x1 else x2[..., chunk, :]
        if same:
            cov, ntk = run_block(net, a, b, hyper, input_shape, track_ntk, True, True, fusion=None, fused=False)
            out = cast(Tensor, cov if output == "nngp" else ntk).squeeze(-1)  # ntk is computed for "ntk"
        else:
            # every pair (x1_i, x2_i) as its own 1 x 1 kernel, with the point index as a batch dimension
            point_hyper = {name: value.unsqueeze(-3) for name, value in hyper.items()}
            cov, ntk = run_block(
                net, a.unsqueeze(-2), b.unsqueeze(-2), point_hyper, input_shape, track_ntk, equal, False,
                fusion=None, fused=False,
            )
            out = cast(Tensor, cov if output == "nngp" else ntk)[..., 0, 0]
        parts.append(out)
    out = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    check_finite_kernel(out)
    return out.expand(*batch, x1.shape[-2])


def nngp_and_ntk(
    net: Layer,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    input_shape: InputShape = None,
    detach_hyperparameters: bool = False,
    track_ntk: bool = True,
    block_elements: int | None = None,
    fusion: FusionPolicy | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""Both kernel matrices :math:`(\Sigma(x_1, x_2), \Theta(x_1, x_2))` from one pass of the recursion.

    ``x1`` is ``(..., n1, d)``, ``x2`` is ``(..., n2, d)`` (``None`` for ``x1``); the network's
    current hyperparameters are cast to the dtype and device of ``x1`` (and treated as constants
    with ``detach_hyperparameters``). With ``track_ntk=False`` only the NNGP is computed (the NTK
    is returned as ``None``). Used where both kernels are needed at once (the trained-ensemble
    posterior). ``fusion``: a :class:`~gpntk.kernels.fusion.FusionPolicy` kept across calls, so that
    repeated large evaluations compile under ``gpntk.settings.fusion("auto")``.
    """
    x2 = x1 if x2 is None else x2
    hyper = Hyperparameters.collect(net, like=x1)
    if detach_hyperparameters:
        hyper = {name: value.detach() for name, value in hyper.items()}
    return evaluate(
        net, x1, x2, hyper, input_shape=input_shape, track_ntk=track_ntk, block_elements=block_elements,
        fusion=fusion,
    )
