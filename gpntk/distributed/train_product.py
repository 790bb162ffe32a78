r"""``ShardedTrainProduct``: the training-kernel products of a ``TrainedEnsemble``'s Lanczos solver, sharded.

:class:`~gpntk.TrainedEnsemble` with ``solver="lanczos"`` touches the training kernels only
through products :math:`K(X, X)\, V` (its ``train_product`` argument,
:data:`gpntk.posterior.solver.TrainProduct`). :class:`ShardedTrainProduct` computes them with the
row blocks of each rank (:mod:`gpntk.distributed.rows`), evaluated by gpntk's own recursion
(:func:`gpntk.kernels.dense.evaluate`), and concatenates the ranks' rows, so every rank runs the
same Lanczos iterations and gets the same posterior, bitwise that of one process:

.. code-block:: python

    product = gpntk.distributed.ShardedTrainProduct(net, train_x)
    post = gpntk.TrainedEnsemble(net, train_x, train_y, solver="lanczos", train_product=product)

Lanczos replays its products (two-pass Lanczos) and checks that they repeat exactly: the blocks
and their order are the same in every product, so they do.
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.graph_inputs import GraphDataset, NodeGraph
from ..core.layer import InputShape, Layer
from ..kernels.dense import Output, evaluate_output
from ..kernels.fusion import FusionPolicy
from ..posterior.snapshot import freeze_network
from .group import Communicator
from .products import ShardedRows, should_store
from .rows import plan_rows

__all__ = ["ShardedTrainProduct"]

_KINDS = ("nngp", "ntk")


class ShardedTrainProduct:
    """The products :math:`K_{\\text{kind}}(X, X)\\, V` of a network's training kernels, sharded over ranks.

    :param net: the architecture (a snapshot of its hyperparameter values is taken now: pass the
        same network, unchanged, to :class:`~gpntk.TrainedEnsemble`).
    :param train_x: the training inputs ``(n, d)``, the same on every rank (copied).
    :param input_shape: as for :class:`~gpntk.NTKKernel` (spatial shapes; graph formats are not
        supported).
    :param group: as for :class:`~gpntk.distributed.ShardedKernel`.
    :param store: as for :class:`~gpntk.distributed.ShardedKernel`.
    :param check_replicated: as for :class:`~gpntk.distributed.ShardedKernel`.

    Calling it with ``(V, kinds)`` returns one ``(n, c)`` product per kind, the same on every rank.
    """

    def __init__(
        self,
        net: Layer,
        train_x: Tensor,
        input_shape: InputShape = None,
        *,
        group: dist.ProcessGroup | None = None,
        store: bool | None = None,
        check_replicated: bool = True,
    ):
        if isinstance(input_shape, (NodeGraph, GraphDataset)):
            raise NotImplementedError("ShardedTrainProduct does not support graph inputs (NodeGraph, GraphDataset)")
        if train_x.dim() != 2:
            raise ValueError(f"train_x must be (n, d), got shape {tuple(train_x.shape)}")
        self.net, self.hyper = freeze_network(net, like=train_x)
        self.x = train_x.detach().clone()
        self.input_shape = input_shape
        self.comm = Communicator(group, check_replicated)
        self.comm.check_same({"train_x": self.x, **self.hyper}, self.x.device, values=check_replicated)
        n = self.x.shape[0]
        self.plan = plan_rows(n, n, self.comm.size)
        self.store = should_store(self.plan[self.comm.rank], n, 1, store)
        self.fusion = FusionPolicy()
        self._kernels: dict[str, ShardedRows] = {}

    def _evaluate(self, rows: slice, kind: Output) -> Tensor:
        return evaluate_output(self.net, self.x[rows], self.x, self.hyper, kind, input_shape=self.input_shape,
                               fusion=self.fusion)

    def _kernel(self, kind: Output) -> ShardedRows:
        if kind not in self._kernels:
            n = self.x.shape[0]
            self._kernels[kind] = ShardedRows(
                lambda rows: self._evaluate(rows, kind), self.plan, torch.Size((n, n)), self.x, self.comm, self.store
            )
        return self._kernels[kind]

    def __call__(self, rhs: Tensor, kinds: Sequence[str]) -> tuple[Tensor, ...]:
        unknown = [kind for kind in kinds if kind not in _KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {tuple(kinds)!r}")
        if rhs.dim() != 2 or rhs.shape[0] != self.x.shape[0]:
            raise ValueError(f"rhs must be ({self.x.shape[0]}, c), got shape {tuple(rhs.shape)}")
        return tuple(self._kernel(cast(Output, kind)).matmul(rhs) for kind in kinds)
