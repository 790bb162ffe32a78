r"""``ShardedKernel``: any GPyTorch kernel, its kernel matrices divided among the processes of a group.

.. code-block:: python

    device = gpntk.distributed.initialize()          # under torchrun: joins the group; else nothing
    covar = gpntk.distributed.ShardedKernel(gpytorch.kernels.ScaleKernel(gpntk.NTKKernel(net)))
    model = ExactGP(train_x, train_y, likelihood, covar)   # every rank: the same data, the same seed
    # train and predict as usual, on every rank; every rank gets the same numbers

Each rank evaluates and holds only its blocks of rows of each kernel matrix, over all columns
(:math:`n^2 / p` entries of :math:`K(X, X)` for :math:`p` ranks: the symmetry of :math:`K(X, X)`
is not used, so the ranks together do twice the work of one process that mirrors), and products
are each rank's rows, concatenated with one ``all_gather``. The row blocks do not depend on the
number of ranks and no number is summed across ranks, so products are bitwise those of one
process, and the iterative solvers of GPyTorch (CG for the marginal likelihood and predictive
means, Lanczos for log-determinants and variances) run the same iterations on every rank and for
every number of ranks (Wang et al. 2019, "Exact Gaussian Processes on a Million Data Points",
NeurIPS). Hyperparameter gradients are gathered per block and added in block order inside the
backward pass, so every rank's optimizer takes the same step, the single-process one. See
:mod:`gpntk.distributed.operator`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from gpytorch.kernels import Kernel
from torch import Tensor

from .group import Communicator
from .operator import ShardedKernelOperator

__all__ = ["ShardedKernel"]


class ShardedKernel(Kernel):
    r"""``base_kernel`` with its kernel matrices sharded over the ranks of a ``torch.distributed`` group.

    :param base_kernel: any GPyTorch kernel (``gpntk.NTKKernel(net)``, ``ScaleKernel(...)``,
        sums and products of kernels); its parameters stay its own (``ShardedKernel`` adds none).
    :param group: the process group (default: the default group). Single-process (torch.distributed
        not initialized, or a group of one) the same code runs with no communication.
    :param store: keep each rank's rows of a kernel matrix after its first product (``True``), or
        recompute them in every product (``False``: matrix-free, the memory of one row block); ``None``
        (default): keep them while they hold at most :data:`gpntk.settings.DENSE_MAX_ELEMENTS` numbers.
    :param check_replicated: verify on every product that the right-hand sides (and on every call
        that the inputs and hyperparameters) are bitwise equal on all ranks, and raise
        :class:`~gpntk.distributed.ReplicationError` if not (default on; it costs a pass over the
        vectors and no extra communication).

    **Every rank must run the same program on the same data**, with random numbers drawn
    identically: GPyTorch draws the probe vectors of its stochastic log-determinant and trace
    estimates from PyTorch's global generator, so seed it identically on every rank
    (``torch.manual_seed(seed)``, or ``gpytorch.settings.deterministic_probes``). A rank whose
    vectors differ raises :class:`~gpntk.distributed.ReplicationError` rather than returning
    wrong numbers. ``diag=True`` is computed by every rank alone (it costs :math:`O(n)`).

    ``forward`` returns a :class:`~gpntk.distributed.operator.ShardedKernelOperator`.
    """

    is_stationary = False

    def __init__(
        self,
        base_kernel: Kernel,
        *,
        group: dist.ProcessGroup | None = None,
        store: bool | None = None,
        check_replicated: bool = True,
    ):
        if not isinstance(base_kernel, Kernel):
            raise TypeError(f"ShardedKernel wraps a gpytorch.kernels.Kernel, got {type(base_kernel).__name__}")
        if store not in (None, True, False):
            raise ValueError(f"store must be None, True or False, got {store!r}")
        super().__init__()
        self.base_kernel = base_kernel
        self.group, self.store, self.check_replicated = group, store, check_replicated
        Communicator(group)  # a group given without torch.distributed raises here, not at the first call

    @property
    def batch_shape(self) -> torch.Size:
        return self.base_kernel.batch_shape

    @batch_shape.setter
    def batch_shape(self, value: torch.Size) -> None:
        self.base_kernel.batch_shape = value

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return self.base_kernel.num_outputs_per_input(x1, x2)

    def forward(
        self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params: Any
    ) -> Tensor | ShardedKernelOperator:
        if last_dim_is_batch:
            raise NotImplementedError("ShardedKernel does not support last_dim_is_batch=True")
        if params:
            raise TypeError(f"ShardedKernel passes no keyword arguments to its base kernel, got {sorted(params)}")
        if diag:
            return self.base_kernel(x1, x2, diag=True)
        if self.base_kernel.num_outputs_per_input(x1, x2) != 1:
            raise NotImplementedError("ShardedKernel supports kernels with one output per input")
        named = list(self.base_kernel.named_parameters())
        names = tuple(name for name, _ in named)
        values = [value for _, value in named]
        comm = Communicator(self.group, self.check_replicated)
        # different sizes would hang the collectives: checked even without check_replicated
        comm.check_same({"x1": x1, "x2": x2, **dict(named)}, x1.device, values=self.check_replicated)
        return ShardedKernelOperator(x1, x2, *values, kernel=self.base_kernel, names=names, comm=comm, store=self.store)
