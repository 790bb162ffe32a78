r"""The kernel matrix of any GPyTorch kernel as a ``LinearOperator`` whose rows are divided among ranks.

:class:`ShardedKernelOperator` represents :math:`K(x_1, x_2)` by the inputs and the kernel's
parameter tensors (:func:`parameters_replaced` puts them in the kernel module while it is evaluated, so the
covariance function never closes over parameters and gradients reach whatever tensors represent the
operator). Each rank evaluates only its blocks of rows, over all columns
(:mod:`gpntk.distributed.rows`); a product is each rank's rows of :math:`K V`, concatenated over
ranks (:class:`~gpntk.distributed.products.ShardedRows`), so every rank holds the same result,
bitwise the one of a single process, and GPyTorch's CG and Lanczos run the same iterations on
every rank and for every number of ranks (Wang et al. 2019, "Exact Gaussian Processes on a
Million Data Points", NeurIPS).

Derivatives of bilinear forms (what GPyTorch's marginal likelihood backpropagates through),

.. math::
    \frac{\partial}{\partial\theta} \sum_i u_i^\top K v_i
    = \sum_{b} \frac{\partial}{\partial\theta} \sum_i u_{i,b}^\top K_{b,:}\, v_i
    \quad (b \text{ the row blocks, in row order}),

are computed block by block on each rank (autograd through one block at a time); the per-block
gradients are concatenated over ranks and every rank adds them up in block order, as one process
does, so the gradients too are bitwise those of one process, and every rank's optimizer takes the
same step. The dense matrix (:meth:`~ShardedKernelOperator.to_dense`, for GPyTorch's Cholesky
path and its test-train covariances) is assembled the same way, with the same gradient rule for a
matrix :math:`G` of output gradients: :math:`\sum_b \langle G_{b,:}, \partial K_{b,:}/\partial\theta\rangle`.

Diagonals and single entries (the pivoted-Cholesky preconditioner asks for rows) are computed by
every rank alone: they cost :math:`O(n)` and need no communication.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, cast

import gpytorch
import torch
from gpytorch.kernels import Kernel
from linear_operator import to_dense
from linear_operator.operators import LinearOperator
from linear_operator.utils.memoize import cached
from torch import Tensor

from .group import Communicator
from .products import ShardedRows, should_store
from .rows import plan_rows

__all__ = ["ShardedKernelOperator", "evaluate_kernel", "parameters_replaced"]

#: ``contract(block, rows)``: the scalar whose block-wise gradients are summed
Contraction = Callable[[Tensor, slice], Tensor]


@contextmanager
def parameters_replaced(module: torch.nn.Module, names: Sequence[str], values: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, ``module``'s parameters ``names`` (from ``named_parameters()``) are the tensors ``values``.

    Each parameter is replaced on the module that owns it, so a module reused at several places
    of the network (gpntk's shared layers) sees the new value everywhere; the originals come back
    on exit. (``torch.func.functional_call`` restores such shared modules wrongly.)
    """
    saved: list[tuple[torch.nn.Module, str, Any]] = []
    try:
        for name, value in zip(names, values):
            path, _, attr = name.rpartition(".")
            owner = module.get_submodule(path)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = value  # type: ignore[assignment]  # a tensor standing in for the parameter
        yield
    finally:
        for owner, attr, original in reversed(saved):
            owner._parameters[attr] = original


def evaluate_kernel(
    kernel: Kernel, names: Sequence[str], params: Sequence[Tensor], x1: Tensor, x2: Tensor, diag: bool = False
) -> Tensor:
    """``kernel(x1, x2)`` as a dense tensor, with the parameter tensors ``params`` (named ``names``) in place."""
    with parameters_replaced(kernel, names, params), gpytorch.settings.lazily_evaluate_kernels(False):
        return to_dense(kernel(x1, x2, diag=diag))


class ShardedKernelOperator(LinearOperator):
    """The kernel matrix ``kernel(x1, x2)`` (``(..., n1, n2)``), its rows divided among the ranks of ``comm``.

    Built by :class:`gpntk.distributed.ShardedKernel`. ``params`` are the kernel's parameters (in
    the order of ``names``, from ``kernel.named_parameters()``); ``store``: keep this rank's rows
    after the first product (``None``: while they fit :data:`gpntk.settings.DENSE_MAX_ELEMENTS`).
    """

    def __init__(
        self, x1: Tensor, x2: Tensor, *params: Tensor, kernel: Kernel, names: tuple[str, ...],
        comm: Communicator, store: bool | None = None,
    ):
        super().__init__(x1, x2, *params, kernel=kernel, names=names, comm=comm, store=store)
        self.x1, self.x2, self.params = x1, x2, params
        self.kernel, self.names, self.comm, self.store = kernel, names, comm, store
        self._rows: ShardedRows | None = None

    def _options(self) -> dict[str, Any]:
        return dict(kernel=self.kernel, names=self.names, comm=self.comm, store=self.store)

    def _with_inputs(self, x1: Tensor, x2: Tensor) -> "ShardedKernelOperator":
        return ShardedKernelOperator(x1, x2, *self.params, **self._options())

    def _size(self) -> torch.Size:
        batch = torch.broadcast_shapes(self.x1.shape[:-2], self.x2.shape[:-2], self.kernel.batch_shape)
        return torch.Size((*batch, self.x1.shape[-2], self.x2.shape[-2]))

    def plan(self) -> list[list[slice]]:
        """Every rank's row blocks (:func:`~gpntk.distributed.rows.plan_rows`); independent of the world size."""
        n1, n2 = self.x1.shape[-2], self.x2.shape[-2]
        return plan_rows(n1, n2, self.comm.size, self.batch_shape.numel())

    def _block(self, rows: slice, x1: Tensor, x2: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Rows ``rows`` of the kernel matrix, over all columns: ``kernel(x1[rows], x2)``."""
        return evaluate_kernel(self.kernel, self.names, params, x1[..., rows, :], x2)

    @property
    def rows(self) -> ShardedRows:
        """This rank's rows as a :class:`~gpntk.distributed.products.ShardedRows` (no autograd graph)."""
        if self._rows is None:
            x1, x2 = self.x1.detach(), self.x2.detach()
            params = [p.detach() for p in self.params]
            plan = self.plan()
            store = should_store(plan[self.comm.rank], x2.shape[-2], self.batch_shape.numel(), self.store)
            self._rows = ShardedRows(
                lambda rows: self._block(rows, x1, x2, params), plan, self.shape, x1, self.comm, store
            )
        return self._rows

    def _records_graph(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.representation())

    # --- products -------------------------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        squeeze = rhs.dim() == 1
        rhs = rhs.unsqueeze(-1) if squeeze else rhs
        if self._records_graph() or (torch.is_grad_enabled() and rhs.requires_grad):
            out = _ShardedMatmul.apply(self, rhs, *self.representation())  # type: ignore[no-untyped-call]
        else:
            out = self.rows.matmul(rhs)
        return out.squeeze(-1) if squeeze else out

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        # a kernel is symmetric in its arguments: K(x1, x2)^T = K(x2, x1)
        return self._transpose_nonbatch()._matmul(rhs)

    def _transpose_nonbatch(self) -> "ShardedKernelOperator":
        return self._with_inputs(self.x2, self.x1)

    @cached  # type: ignore[untyped-decorator]  # linear_operator has no type hints
    def to_dense(self) -> Tensor:
        if self._records_graph():
            dense = _ShardedDense.apply(self, *self.representation())  # type: ignore[no-untyped-call]
            return cast(Tensor, dense)
        return self.rows.dense()

    # --- entries each rank computes alone ---------------------------------------------------------
    def _diagonal(self) -> Tensor:
        if self.x1.shape[-2] != self.x2.shape[-2]:
            raise ValueError(f"the diagonal of a non-square kernel matrix ({tuple(self.shape)}) is not defined")
        diag = evaluate_kernel(self.kernel, self.names, self.params, self.x1, self.x2, diag=True)
        return diag.expand(*self.batch_shape, self.x1.shape[-2])

    def _get_indices(self, row_index: Any, col_index: Any, *batch_indices: Any) -> Tensor:
        if batch_indices:  # batch indices need the parameters indexed too: linear_operator's generic way
            return super()._get_indices(row_index, col_index, *batch_indices)
        rows, row_of = torch.unique(row_index, return_inverse=True)
        cols, col_of = torch.unique(col_index, return_inverse=True)
        block = evaluate_kernel(self.kernel, self.names, self.params, self.x1[rows], self.x2[cols])
        return block[row_of, col_of]

    def _getitem(self, row_index: Any, col_index: Any, *batch_indices: Any) -> LinearOperator:
        if any(not (isinstance(i, slice) and i == slice(None)) for i in batch_indices):
            return super()._getitem(row_index, col_index, *batch_indices)
        return self._with_inputs(self.x1[..., row_index, :], self.x2[..., col_index, :])

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        self._require_unbatched_kernel("unsqueeze")
        return self._with_inputs(self.x1.unsqueeze(dim), self.x2.unsqueeze(dim))

    def _permute_batch(self, *dims: int) -> LinearOperator:
        self._require_unbatched_kernel("permute")
        batch = self.batch_shape
        x1 = self.x1.expand(*batch, *self.x1.shape[-2:]).permute(*dims, -2, -1)
        x2 = self.x2.expand(*batch, *self.x2.shape[-2:]).permute(*dims, -2, -1)
        return self._with_inputs(x1, x2)

    def _require_unbatched_kernel(self, what: str) -> None:
        if len(self.kernel.batch_shape):
            raise NotImplementedError(
                f"cannot {what} the batch dimensions of a sharded kernel matrix whose kernel has a batch shape "
                f"({tuple(self.kernel.batch_shape)}); give the inputs the batch dimensions instead"
            )

    # --- gradients --------------------------------------------------------------------------------
    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        r"""Derivatives of :math:`\sum_i u_i^\top K v_i` with respect to ``x1``, ``x2`` and each parameter."""
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)

        def contract(block: Tensor, rows: slice) -> Tensor:
            return (left_vecs[..., rows, :] * (block @ right_vecs)).sum()

        wanted = [t.requires_grad for t in self.representation()]
        return self.gradients(contract, wanted, [left_vecs, right_vecs])

    def gradients(
        self, contract: Contraction, wanted: Sequence[bool], replicated: Sequence[Tensor]
    ) -> tuple[Tensor | None, ...]:
        """The gradients of :math:`\\sum_b` ``contract(block b, rows of b)`` for the representation tensors ``wanted``.

        Each rank differentiates its row blocks one at a time; the per-block gradients of all ranks
        are concatenated (one ``all_gather``) and added up in block order on every rank, so the
        result is bitwise the single-process one. ``replicated`` are checked to be equal on all
        ranks. ``None`` for tensors not wanted. (Gradients with respect to the inputs gather
        :math:`B (n_1 + n_2) d` numbers for :math:`B` blocks.)
        """
        args = [t.detach().requires_grad_(want) for t, want in zip(self.representation(), wanted)]
        if not any(wanted):
            return (None,) * len(args)
        x1, x2, params = args[0], args[1], args[2:]
        targets = [t for t in args if t.requires_grad]
        plan = self.plan()
        per_block = []
        for rows in plan[self.comm.rank]:
            with torch.enable_grad():
                block = self._block(rows, x1, x2, params)
                grads = torch.autograd.grad(contract(block, rows), targets, allow_unused=True)
            per_block.append(torch.cat([
                (torch.zeros_like(t) if g is None else g).reshape(-1).to(torch.float64) for t, g in zip(targets, grads)
            ]))
        width = sum(t.numel() for t in targets)
        mine = torch.stack(per_block) if per_block else x1.new_zeros(0, width, dtype=torch.float64)
        every = self.comm.concat(mine, [len(blocks) for blocks in plan], replicated, "gradient vectors")
        total = every.new_zeros(width)
        for gradient in every:  # in block order, as one process adds them
            total += gradient
        parts = total.split([t.numel() for t in targets])
        summed = iter(part.view_as(t).to(t.dtype) for part, t in zip(parts, targets))
        return tuple(next(summed) if want else None for want in wanted)


class _ShardedMatmul(torch.autograd.Function):
    """:math:`K V` with gradients for :math:`V` (:math:`K^\\top G`) and the representation (block by block)."""

    @staticmethod
    def forward(ctx: Any, op: ShardedKernelOperator, rhs: Tensor, *args: Tensor) -> Tensor:
        ctx.op = op  # ``args`` are its representation, passed so that autograd follows them
        ctx.save_for_backward(rhs)
        return op.rows.matmul(rhs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (rhs,) = ctx.saved_tensors
        op = ctx.op
        grad_rhs = op._t_matmul(grad) if ctx.needs_input_grad[1] else None
        wanted = ctx.needs_input_grad[2:]
        grads = op._bilinear_derivative(grad, rhs) if any(wanted) else (None,) * len(wanted)
        return (None, grad_rhs, *grads)


class _ShardedDense(torch.autograd.Function):
    """The dense kernel matrix; gradients :math:`\\sum_b \\langle G_{b,:}, \\partial K_{b,:}\\rangle`, by blocks."""

    @staticmethod
    def forward(ctx: Any, op: ShardedKernelOperator, *args: Tensor) -> Tensor:
        ctx.op = op  # ``args`` are its representation, passed so that autograd follows them
        return op.rows.dense()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        op = ctx.op

        def contract(block: Tensor, rows: slice) -> Tensor:
            return (grad[..., rows, :] * block).sum()

        return (None, *op.gradients(contract, ctx.needs_input_grad[1:], [grad]))
