r"""Matrix-free kernels: products with a kernel matrix computed block by block, never stored.

A float64 kernel matrix of :math:`n = 50\,000` points takes 20 GB, but conjugate gradients,
Lanczos and GPyTorch's iterative marginal likelihood only need products :math:`K V` and the
derivatives of bilinear forms :math:`u^\top K v` (Gardner et al. 2018, "GPyTorch: Blackbox
Matrix-Matrix Gaussian Process Inference with GPU Acceleration"). Both are sums over blocks of
input pairs,

.. math::
    (K V)_{r} = \sum_c K_{rc} V_c, \qquad
    \frac{\partial\, u^\top K v}{\partial \theta} = \sum_{r, c} \frac{\partial\, u_r^\top K_{rc} v_c}{\partial \theta},

so each block :math:`K_{rc}` is computed by the layer recursion (:mod:`gpntk.kernels.engine`),
used, and dropped: memory is :math:`O((n_1 + n_2) c + b)` for blocks of :math:`b` numbers, and
the time is that of one kernel evaluation per product. For :math:`K(X, X)` only blocks on and
above the diagonal are computed; each off-diagonal block serves both :math:`K_{rc} V_c` and
:math:`K_{rc}^\top V_r`.

:class:`BlockwiseKernelOperator` wraps this as a ``linear_operator`` ``LinearOperator`` with a
blockwise ``_bilinear_derivative``, so marginal-likelihood gradients never hold the matrix or
its autograd graph either (one block's graph at a time).
"""

from __future__ import annotations

from typing import Any, Sequence, cast

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from .._progress import track
from ..core.graph_inputs import GraphDataset, NodeGraph
from ..core.layer import InputShape, Layer
from .dense import evaluate, evaluate_output
from .engine import Output, check_finite_kernel, run_block
from .fusion import FusionPolicy
from .graph_dataset import dataset_kernel_matmul
from .node_level import node_kernels
from .planning import batch_shape_of, kernel_blocks

__all__ = ["kernel_matmul", "BlockwiseKernelOperator"]

_KINDS = ("nngp", "ntk")


def kernel_matmul(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    rhs: Tensor,
    *,
    kinds: Sequence[Output] = ("ntk",),
    input_shape: InputShape = None,
    block_elements: int | None = None,
    fusion: FusionPolicy | None = None,
) -> tuple[Tensor, ...]:
    r"""The products :math:`K(x_1, x_2)\, V` for each kernel in ``kinds``, without forming :math:`K`.

    :param x1: ``(..., n1, d)``; ``x2``: ``(..., n2, d)`` (the same tensor, or equal values, for
        :math:`K(X, X)`: then only blocks on and above the diagonal are evaluated).
    :param hyper: the hyperparameter tensors (``Hyperparameters.collect``), ``(..., 1, 1)``.
    :param rhs: :math:`V`, ``(..., n2, c)``.
    :param kinds: a subset of ``("nngp", "ntk")``; both come from one pass of the recursion.
    :return: one ``(..., n1, c)`` tensor per kind, in the order of ``kinds``.

    Runs without building an autograd graph (use :class:`BlockwiseKernelOperator` for
    gradients). Memory: the inputs, the outputs and one block of at most ``block_elements``
    numbers per intermediate tensor of the recursion. ``fusion``: the caller's compile policy
    (:class:`~gpntk.kernels.fusion.FusionPolicy`; ``None``: a fresh one).
    """
    unknown = [kind for kind in kinds if kind not in _KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {tuple(kinds)!r}")
    if rhs.shape[-2] != x2.shape[-2]:
        raise ValueError(f"rhs has {rhs.shape[-2]} rows but x2 has {x2.shape[-2]} points")
    track_ntk = "ntk" in kinds
    if isinstance(input_shape, NodeGraph):  # every entry needs the whole graph's kernel: computed once
        with torch.no_grad():
            cov, ntk = node_kernels(net, x1, x2, hyper, input_shape, track_ntk)
        return tuple(cast(Tensor, ntk if kind == "ntk" else cov) @ rhs for kind in kinds)
    if isinstance(input_shape, GraphDataset):  # graph indices: one pair of buckets at a time
        with torch.no_grad():
            return dataset_kernel_matmul(
                x1, x2, rhs, hyper, input_shape, tuple(kinds),
                lambda fmt, a, b: evaluate(net, a, b, hyper, input_shape=fmt, track_ntk=track_ntk,
                                           block_elements=block_elements),
            )
    blocks, elements, _ = kernel_blocks(net, x1, x2, hyper, input_shape, block_elements)
    batch = torch.broadcast_shapes(batch_shape_of(x1, x2, hyper), rhs.shape[:-2])
    outputs = [rhs.new_zeros(*batch, x1.shape[-2], rhs.shape[-1]) for _ in kinds]
    fusion = FusionPolicy() if fusion is None else fusion
    with torch.no_grad():
        fused = fusion.use_fusion(x1, x2, hyper, input_shape, track_ntk, elements)
        for r, c, same, mirrored in track(blocks, "kernel product", unit="block"):
            a = x1[..., r, :]
            b = a if (same and x2 is x1) else x2[..., c, :]
            cov, ntk = run_block(net, a, b, hyper, input_shape, track_ntk, same, False, fusion=fusion, fused=fused)
            for out, kind in zip(outputs, kinds):
                block = cast(Tensor, ntk if kind == "ntk" else cov)  # ntk is computed when asked for
                out[..., r, :] += block @ rhs[..., c, :]
                if mirrored:
                    out[..., c, :] += block.mT @ rhs[..., r, :]
    check_finite_kernel(*outputs, inputs=rhs)
    return tuple(outputs)


class BlockwiseKernelOperator(LinearOperator):
    r"""The kernel matrix :math:`K(x_1, x_2)` (``(..., n1, n2)``) of a network, matrix-free.

    Products (:meth:`_matmul`) and the derivatives of bilinear forms
    (:meth:`_bilinear_derivative`, what GPyTorch's marginal likelihood backpropagates through)
    are computed block by block (:func:`kernel_matmul`), holding at most one block and its
    autograd graph at a time. Represented by ``x1``, ``x2`` and the hyperparameter tensors, so
    gradients flow to all of them. :meth:`to_dense` computes the whole matrix (when it fits).

    It is what :func:`gpntk.kernels.backends.covariance_function` returns for kernels too large
    to store (see :class:`gpntk.settings.kernel_backend`).
    """

    def __init__(
        self,
        x1: Tensor,
        x2: Tensor,
        *hyper_values: Tensor,
        net: Layer,
        output: Output,
        hyper_names: tuple[str, ...],
        input_shape: InputShape = None,
        block_elements: int | None = None,
        fusion: FusionPolicy | None = None,
    ):
        fusion = FusionPolicy() if fusion is None else fusion
        super().__init__(
            x1, x2, *hyper_values, net=net, output=output, hyper_names=hyper_names, input_shape=input_shape,
            block_elements=block_elements, fusion=fusion,
        )
        self.x1, self.x2 = x1, x2
        self.hyper = dict(zip(hyper_names, hyper_values))
        self.net, self.output, self.input_shape, self.block_elements = net, output, input_shape, block_elements
        self.fusion = fusion

    @classmethod
    def from_hyperparameters(
        cls, x1: Tensor, x2: Tensor, hyper: dict[str, Tensor], **options: Any
    ) -> "BlockwiseKernelOperator":
        return cls(x1, x2, *hyper.values(), hyper_names=tuple(hyper), **options)

    def _size(self) -> torch.Size:
        return torch.Size((*batch_shape_of(self.x1, self.x2, self.hyper), self.x1.shape[-2], self.x2.shape[-2]))

    def _products(self, x1: Tensor, x2: Tensor, rhs: Tensor) -> Tensor:
        squeeze = rhs.dim() == 1
        rhs = rhs.unsqueeze(-1) if squeeze else rhs
        (out,) = kernel_matmul(
            self.net, x1, x2, self.hyper, rhs, kinds=(self.output,), input_shape=self.input_shape,
            block_elements=self.block_elements, fusion=self.fusion,
        )
        return out.squeeze(-1) if squeeze else out

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._products(self.x1, self.x2, rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        # the recursion is symmetric in its two inputs: K(x1, x2)^T = K(x2, x1)
        return self._products(self.x2, self.x1, rhs)

    def _transpose_nonbatch(self) -> "BlockwiseKernelOperator":
        return self.from_hyperparameters(self.x2, self.x1, self.hyper, **self._options())

    def _options(self) -> dict[str, Any]:
        return dict(
            net=self.net, output=self.output, input_shape=self.input_shape, block_elements=self.block_elements,
            fusion=self.fusion,
        )

    def _expand_batch(self, batch_shape: torch.Size) -> "BlockwiseKernelOperator":
        def expand(t: Tensor) -> Tensor:
            return t.expand(*batch_shape, *t.shape[-2:])

        hyper = {name: expand(value) for name, value in self.hyper.items()}
        return self.from_hyperparameters(expand(self.x1), expand(self.x2), hyper, **self._options())

    def to_dense(self) -> Tensor:
        out = evaluate_output(
            self.net, self.x1, self.x2, self.hyper, self.output, input_shape=self.input_shape,
            block_elements=self.block_elements, fusion=self.fusion,
        )
        return out.expand(*self.batch_shape, *self.matrix_shape)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        r"""Derivatives of :math:`\sum_i u_i^\top K v_i` with respect to ``x1``, ``x2`` and each hyperparameter.

        One block at a time: :math:`\partial (u_r^\top K_{rc} v_c)/\partial\theta` by autograd
        through that block's recursion alone. For :math:`K(X, X)` with no gradient wanted for the
        inputs, blocks below the diagonal come from their mirror above it,
        :math:`u_c^\top K_{rc}^\top v_r = v_r^\top K_{rc} u_c`.
        """
        args = self.representation()
        wanted = [arg.requires_grad for arg in args]
        if not any(wanted):
            return (None,) * len(args)
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        x1, x2 = self.x1.detach(), self.x2.detach()
        hyper = {
            name: value.detach().requires_grad_(want) for (name, value), want in zip(self.hyper.items(), wanted[2:])
        }
        # a mirrored block's input gradients would belong to the other rows: mirror only for hyperparameters
        mirror = not (wanted[0] or wanted[1])
        blocks, elements, _ = kernel_blocks(self.net, x1, x2, hyper, self.input_shape, self.block_elements, mirror)
        grad_x1 = torch.zeros_like(x1) if wanted[0] else None
        grad_x2 = torch.zeros_like(x2) if wanted[1] else None
        grad_hyper = {name: torch.zeros_like(value) for name, value in hyper.items() if value.requires_grad}
        track_ntk = self.output == "ntk"
        with torch.enable_grad():
            fused = self.fusion.use_fusion(x1, x2, hyper, self.input_shape, track_ntk, elements)
        for r, c, same, mirrored in track(blocks, "kernel gradient", unit="block"):
            with torch.enable_grad():
                a = x1[..., r, :].requires_grad_(wanted[0])
                b = x2[..., c, :].requires_grad_(wanted[1])
                cov, ntk = run_block(
                    self.net, a, b, hyper, self.input_shape, track_ntk, same, False, fusion=self.fusion, fused=fused
                )
                block = cast(Tensor, ntk if track_ntk else cov)
                value = (left_vecs[..., r, :] * (block @ right_vecs[..., c, :])).sum()
                if mirrored:
                    value = value + (right_vecs[..., r, :] * (block @ left_vecs[..., c, :])).sum()
                targets = [t for t in (a, b) if t.requires_grad] + [hyper[name] for name in grad_hyper]
                grads = list(torch.autograd.grad(value, targets, allow_unused=True))
            if grad_x1 is not None:
                _accumulate(grad_x1[..., r, :], grads.pop(0))
            if grad_x2 is not None:
                _accumulate(grad_x2[..., c, :], grads.pop(0))
            for name, grad in zip(grad_hyper, grads):
                _accumulate(grad_hyper[name], grad)
        return (grad_x1, grad_x2, *(grad_hyper.get(name) for name in self.hyper))


def _accumulate(total: Tensor, grad: Tensor | None) -> None:
    if grad is not None:
        total += grad.sum_to_size(total.shape) if grad.shape != total.shape else grad
