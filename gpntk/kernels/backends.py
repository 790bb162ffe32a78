r"""Which representation a kernel matrix gets: dense, blockwise (matrix-free) or KeOps.

:func:`covariance_function` is the module-level function GPyTorch's ``KernelLinearOperator``
calls with the inputs and the hyperparameter tensors (it never closes over parameters, so
batching, indexing and gradients follow GPyTorch's own machinery). It decides from the shapes it
is given (:func:`choose_backend`, :class:`gpntk.settings.kernel_backend`) whether to return

* a dense tensor (:mod:`gpntk.kernels.dense`), stored once, for matrices that fit;
* a :class:`~gpntk.kernels.blockwise.BlockwiseKernelOperator`, whose products recompute the
  kernel block by block (any architecture, memory :math:`O(n)`);
* a pykeops ``LazyTensor`` (:mod:`gpntk.contrib.keops`), a symbolic matrix whose products are
  KeOps reductions (fully-connected architectures with closed-form activations).

:class:`NTKKernel.forward <gpntk.NTKKernel>` returns the dense tensor where the dense backend is
chosen (so GPyTorch treats it as it treats an RBF kernel's matrix: sums and products exact, no
root decompositions), and :class:`InfiniteWidthKernelOperator`, a ``KernelLinearOperator``, where
it is matrix-free; its ``to_dense`` evaluates the kernel directly instead of multiplying by an
identity matrix.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import gpytorch
import torch
from linear_operator.operators import KernelLinearOperator, LinearOperator
from linear_operator.utils.memoize import cached
from torch import Tensor

from .. import settings
from ..core.graph_inputs import GraphDataset, NodeGraph
from ..core.layer import InputShape, Layer
from ..errors import ApproximationWarning
from .blockwise import BlockwiseKernelOperator
from .dense import evaluate_output
from .engine import Output, check_finite_kernel
from .fusion import FusionPolicy
from .measured_backends import matrix_free_backend
from .planning import batch_shape_of, numbers_per_pair

if TYPE_CHECKING:  # pragma: no cover
    from pykeops.torch import LazyTensor

__all__ = ["covariance_function", "choose_backend", "InfiniteWidthKernelOperator"]


def keops_available() -> bool:
    """Whether pykeops can be imported (the ``keops`` extra)."""
    try:
        import pykeops  # noqa: F401
    except ImportError:
        return False
    return True


def keops_unsupported_reason(net: Layer, input_shape: InputShape) -> str | None:
    """``None`` when the KeOps backend can evaluate ``net``, else why not."""
    if not keops_available():
        return "pykeops is not installed (pip install 'gpntk[keops]')"
    from ..contrib.keops import keops_supported

    return keops_supported(net, input_shape)


def choose_backend(
    net: Layer,
    x1: Tensor,
    x2: Tensor,
    hyper: dict[str, Tensor],
    input_shape: InputShape,
    backend: settings.Backend | None = None,
    device: torch.device | str | None = None,
) -> str:
    """``"dense"``, ``"blockwise"`` or ``"keops"`` for the kernel between ``x1`` and ``x2``.

    ``backend``: the kernel's own choice (``None``: :class:`gpntk.settings.kernel_backend`).
    See :class:`gpntk.settings.kernel_backend` for the ``"auto"`` rule: dense while the matrix
    fits, then the matrix-free backend measured for the device class of ``device`` (``None``: that
    of ``x1``) in :data:`~gpntk.kernels.measured_backends.MEASURED_BACKENDS`, blockwise unless a
    measurement showed KeOps faster there.
    """
    mode = settings.kernel_backend.current() if backend is None else backend
    n1, n2 = x1.shape[-2], x2.shape[-2]
    if isinstance(input_shape, (NodeGraph, GraphDataset)):
        if mode == "keops":
            reason = keops_unsupported_reason(net, input_shape)
            raise ValueError(f"the KeOps backend cannot evaluate this kernel: {reason}")
        return "dense"  # computed whole (node_level.py) or bucket by bucket (graph_dataset.py); never matrix-free
    if mode == "dense" or min(n1, n2) <= 1:
        return "dense"
    if mode == "keops":
        reason = keops_unsupported_reason(net, input_shape)
        if reason is not None:
            raise ValueError(f"the KeOps backend cannot evaluate this kernel: {reason}")
        return "keops"
    if mode == "blockwise":
        return "blockwise"
    elements = n1 * n2 * numbers_per_pair(net, x1, x2, hyper, input_shape)
    if elements <= settings.DENSE_MAX_ELEMENTS or max(n1, n2) <= gpytorch.settings.max_cholesky_size.value():
        return "dense"
    return matrix_free_backend(
        x1.device if device is None else device, max(n1, n2), lambda: keops_unsupported_reason(net, input_shape)
    )


def covariance_function(
    x1: Tensor,
    x2: Tensor,
    *,
    net: Layer,
    output: Output,
    input_shape: InputShape = None,
    block_elements: int | None = None,
    backend: settings.Backend | None = None,
    fusion: FusionPolicy | None = None,
    **hyper: Tensor,
) -> "Tensor | LinearOperator | LazyTensor":
    r"""The kernel matrix ``(..., n1, n2)`` between ``x1`` (..., n1, d) and ``x2`` (..., n2, d).

    ``hyper`` holds the network's hyperparameter tensors (``(..., 1, 1)`` each) keyed as in
    :class:`~gpntk.core.hyperparameters.Hyperparameters`; ``output`` picks the NTK :math:`\Theta` or the
    NNGP :math:`\Sigma` of the readout; ``input_shape`` ``(C, *spatial)`` describes spatial inputs;
    ``fusion`` is the calling kernel's compile policy (:mod:`gpntk.kernels.fusion`).
    Returns a tensor, a :class:`~gpntk.kernels.blockwise.BlockwiseKernelOperator` or a pykeops
    ``LazyTensor`` (:func:`choose_backend`); each supports ``@`` and gradients.
    """
    chosen = choose_backend(net, x1, x2, hyper, input_shape, backend)
    if chosen == "blockwise":
        return BlockwiseKernelOperator.from_hyperparameters(
            x1, x2, hyper, net=net, output=output, input_shape=input_shape, block_elements=block_elements,
            fusion=fusion,
        )
    if chosen == "keops":
        from ..contrib.keops import keops_covariance

        return keops_covariance(x1, x2, net=net, output=output, hyper=hyper)
    out = evaluate_output(
        net, x1, x2, hyper, output, input_shape=input_shape, block_elements=block_elements, fusion=fusion
    )
    return out.expand(*batch_shape_of(x1, x2, hyper), x1.shape[-2], x2.shape[-2])


class InfiniteWidthKernelOperator(KernelLinearOperator):
    """The matrix-free kernel matrix :class:`~gpntk.NTKKernel` and :class:`~gpntk.NNGPKernel` return.

    Returned by the kernels' ``forward`` only where the backend is matrix-free (blockwise or
    KeOps); where the dense backend is chosen they return a tensor. A ``KernelLinearOperator``
    over :func:`covariance_function`; :meth:`to_dense` evaluates the kernel itself (dense backend)
    rather than multiplying the operator by an identity.

    GPyTorch multiplies two kernel matrices elementwise exactly only when one is dense; for two
    matrix-free ones (or one and a structured operator such as an ``IndexKernel``'s) it replaces
    each factor by a root decomposition, a low-rank Lanczos approximation above
    ``max_cholesky_size``. :meth:`root_decomposition` therefore warns with
    :class:`~gpntk.ApproximationWarning`.
    """

    @cached  # type: ignore[untyped-decorator]  # linear_operator has no type hints
    def to_dense(self) -> Tensor:
        options = {**self.nontensor_params, "backend": "dense"}
        return self.covar_func(self.x1, self.x2, **self.tensor_params, **options)

    def _matmul(self, rhs: Tensor) -> Tensor:
        out = super()._matmul(rhs)
        check_finite_kernel(out, inputs=rhs)  # KeOps reductions report no overflow themselves
        return out

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        n = self.shape[-1]
        how = method
        if how is None:
            how = "Cholesky with jitter" if n <= gpytorch.settings.max_cholesky_size.value() else "Lanczos, low rank"
        warnings.warn(
            f"GPyTorch is replacing a matrix-free gpntk kernel matrix ({n} x {n}) by a root decomposition "
            f"({how}): results computed from it (products with other kernels, samples) are approximate. "
            "Use backend='dense' where the matrix fits, or avoid products of matrix-free kernels.",
            ApproximationWarning,
            stacklevel=2,
        )
        return super().root_decomposition(method=method)
