"""Kernel matrices the posterior needs, computed once and only when needed, and the default training-kernel product.

:class:`KernelCache` holds the kernels between fixed inputs and the training inputs;
:class:`TestKernelCache` keeps those of the last test inputs; :class:`BlockwiseProduct` is the
default :data:`~gpntk.posterior.TrainProduct` of the Lanczos solver. All evaluate the
ensemble's snapshot of the network (:class:`~gpntk.posterior.snapshot.EnsembleSnapshot`) with
:func:`gpntk.kernels.dense.evaluate`, :func:`~gpntk.kernels.dense.kernel_diagonal` and
:func:`gpntk.kernels.blockwise.kernel_matmul`.
"""

from __future__ import annotations

from typing import Sequence, cast

import torch
from torch import Tensor

from ..kernels.blockwise import kernel_matmul
from ..kernels.dense import Output, evaluate, kernel_diagonal
from .snapshot import EnsembleSnapshot

__all__ = ["KernelCache", "TestKernelCache", "BlockwiseProduct"]


class BlockwiseProduct:
    """The default :data:`TrainProduct`: :func:`~gpntk.kernels.blockwise.kernel_matmul` on the training inputs.

    It evaluates the ensemble's snapshot of the network and its hyperparameters (constants).
    """

    def __init__(self, snapshot: EnsembleSnapshot):
        self.net, self.hyper, self.x, self.input_shape = (
            snapshot.net, snapshot.hyper, snapshot.train_x, snapshot.input_shape
        )
        self.fusion = snapshot.fusion

    def __call__(self, rhs: Tensor, kinds: Sequence[str]) -> tuple[Tensor, ...]:
        return kernel_matmul(
            self.net, self.x, self.x, self.hyper, rhs, kinds=cast("tuple[Output, ...]", tuple(kinds)),
            input_shape=self.input_shape, fusion=self.fusion,
        )


class KernelCache:
    """Kernel matrices between fixed inputs and the training inputs, computed only when needed.

    One pass of the layer recursion gives the NNGP and, when asked for, the NTK; a regime that needs
    only the NNGP never computes the NTK. The kernels are those of the ensemble's snapshot of the
    network and its hyperparameters; ``x2`` None means ``x1`` against itself. The values keep the
    autograd graph of ``x1`` (so a cache must not outlive one differentiable call; see
    :meth:`TestKernelCache.kernels`).
    """

    def __init__(self, snapshot: EnsembleSnapshot, x1: Tensor, x2: Tensor | None):
        self.net, self.hyper, self.input_shape = snapshot.net, snapshot.hyper, snapshot.input_shape
        self.fusion = snapshot.fusion
        self.x1, self.x2 = x1, x2
        self._values: dict[str, Tensor] = {}

    def diagonal(self, kind: Output) -> Tensor:
        """The per-point kernel :math:`k(x, x)` of ``x1`` (``x2`` is None), ``(n,)``, without the matrix."""
        key = f"{kind}_diag"
        if key not in self._values:
            self._values[key] = kernel_diagonal(
                self.x1, self.x1, net=self.net, output=kind, hyper=self.hyper, input_shape=self.input_shape
            )
        return self._values[key]

    def get(self, kind: str) -> Tensor:
        """The kernel matrix ``kind`` (``"nngp"`` or ``"ntk"``) between ``x1`` and ``x2``."""
        if kind not in self._values:
            x2 = self.x1 if self.x2 is None else self.x2
            nngp, ntk = evaluate(
                self.net, self.x1, x2, self.hyper, input_shape=self.input_shape, track_ntk=kind == "ntk",
                fusion=self.fusion,
            )
            self._values["nngp"] = nngp
            if ntk is not None:
                self._values["ntk"] = ntk
        return self._values[kind]


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors have the same shape, dtype, device and values."""
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b.detach()))


class TestKernelCache:
    """The kernels (test, train) and (test, test) of the last test inputs that needed no gradient."""

    __test__ = False  # not a pytest test class

    def __init__(self, snapshot: EnsembleSnapshot):
        self.snapshot = snapshot
        self.last: tuple[Tensor, KernelCache, KernelCache] | None = None

    def copy(self) -> TestKernelCache:
        """A cache that starts from the same kernels and follows new test inputs on its own."""
        other = TestKernelCache(self.snapshot)
        other.last = self.last
        return other

    def kernels(self, test_x: Tensor) -> tuple[KernelCache, KernelCache]:
        """Lazily computed kernels (test, train) and (test, test).

        A call that records gradients (grad mode on and ``test_x`` requiring grad) gets new kernels
        built on its own ``test_x``: a cache keyed by value would hand one leaf's graph to another
        leaf of equal value, or a graph already freed by ``backward``. Only calls that need no
        gradient share kernels, cached for the last ``test_x`` by value (and dtype, device).
        """
        train_x = self.snapshot.train_x
        differentiable = torch.is_grad_enabled() and test_x.requires_grad
        if differentiable:
            return KernelCache(self.snapshot, test_x, train_x), KernelCache(self.snapshot, test_x, None)
        with torch.no_grad():
            cache = self.last
            if cache is None or not _same_values(cache[0], test_x):
                key = test_x.detach().clone()
                cache = (key, KernelCache(self.snapshot, key, train_x), KernelCache(self.snapshot, key, None))
                self.last = cache
        return cache[1], cache[2]
