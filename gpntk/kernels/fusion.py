r"""The compile policy: whether one owner's kernel evaluations run through :func:`torch.compile`.

The layer recursion of a fully connected network is dozens of elementwise passes per layer;
:func:`torch.compile` fuses them into a few loops (measured 10x faster per block on a CPU), but
compiling costs seconds to minutes. :class:`gpntk.settings.fusion` says when it pays (``"auto"``:
large evaluations without gradients, once the same configuration has run
:data:`~gpntk.settings.FUSION_AFTER_CALLS` times); a :class:`FusionPolicy` applies that rule for
one owner — a kernel (:class:`~gpntk.NTKKernel`, :class:`~gpntk.NNGPKernel`), a trained ensemble,
or one functional call — and holds what the rule needs: how many large evaluations of each
configuration (dtype, device, NNGP/NTK) the owner has run, and whether compilation failed.

The counts belong to their owner, not to the process: nothing is keyed by object ids, two kernels
over one network count separately, and an owner that is garbage-collected takes its counts with
it. The compiled code itself is shared by all owners: TorchDynamo caches compiled frames on the
code object of :func:`~gpntk.kernels.engine.block_kernels`, so a new policy reuses them without
recompiling.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

from .. import settings
from ..errors import NumericalWarning

__all__ = ["FusionPolicy", "COMPILE_BACKEND"]

COMPILE_BACKEND = "inductor"
"""The :func:`torch.compile` backend new policies use (tests use ``"aot_eager"``: tracing without C++ code)."""

RECOMPILE_LIMIT = 128
"""How many compiled variants of the recursion TorchDynamo keeps (its default, 8, is reached by a few kernels)."""

T = TypeVar("T")


class FusionPolicy:
    """Compile-or-not decisions and the compiled recursion of one owner's kernel evaluations.

    ``backend``: the :func:`torch.compile` backend (default :data:`COMPILE_BACKEND`).
    """

    def __init__(self, backend: str | None = None) -> None:
        self._start(COMPILE_BACKEND if backend is None else backend)

    def _start(self, backend: str) -> None:
        self.backend = backend
        #: whether compilation failed: this owner then evaluates eagerly, without retrying
        self.failed = False
        #: whether an evaluation of this owner has run compiled
        self.compiled = False
        #: whether the owner is being fitted (a GPyTorch kernel in ``train()`` mode, set by the kernel)
        self.training = False
        self._large_calls: dict[tuple[torch.dtype, torch.device, bool], int] = {}
        self._compiled: dict[Callable[..., Any], Callable[..., Any]] = {}  # function -> its compiled form

    def use_fusion(
        self,
        x1: Tensor,
        x2: Tensor,
        hyper: dict[str, Tensor],
        input_shape: object,
        track_ntk: bool,
        elements: int,
    ) -> bool:
        """Whether an evaluation of ``elements`` numbers runs compiled; counts it if it is large.

        Under ``"auto"``, evaluations whose inputs or hyperparameters belong to an autograd graph
        (even where they run without gradients, as the conjugate-gradient products of a
        matrix-free kernel in a marginal-likelihood step) compile from the first large one when the
        owner is in training mode (a fit: compiled up front, never with a pause in the middle),
        and never otherwise. Spatial and graph
        architectures always run eagerly: their recursion (window sums,
        layouts, aggregations) takes minutes to trace and compile, and its cost is dominated by
        the spatial maps rather than by chains of elementwise passes.
        """
        spatial = input_shape is not None and (not isinstance(input_shape, Sequence) or len(input_shape) >= 2)
        if self.failed or spatial:
            return False
        # part of an autograd graph, even where this evaluation itself runs without gradients (the
        # conjugate-gradient products of a matrix-free kernel inside a marginal-likelihood step)
        needs_grad = x1.requires_grad or x2.requires_grad or any(h.requires_grad for h in hyper.values())
        previous = 0
        if elements >= settings.FUSION_MIN_ELEMENTS:
            key = (x1.dtype, x1.device, track_ntk)
            previous = self._large_calls.get(key, 0)
            self._large_calls[key] = previous + 1
        return settings.fusion.enabled_for(elements, needs_grad, previous, training=self.training)

    def run(self, fn: Callable[..., T], args: tuple[Any, ...], fused: bool) -> T:
        """``fn(*args)``, compiled when ``fused``; a compiler failure warns once and falls back to eager.

        ``fn`` is a module-level function of one block (its kernels, or its kernel and tangents);
        its compiled form is kept for the next call.
        """
        if not fused or self.failed:
            return fn(*args)
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, dynamic=True, backend=self.backend)
        try:
            # one compiled variant per network, dtype, NNGP/NTK, with or without gradients, diagonal
            # blocks or not: far more than Dynamo's default of 8 per function, past which it would
            # silently run eagerly
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                out = self._compiled[fn](*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back to eager, once
            self.failed = True
            warnings.warn(
                f"torch.compile failed ({type(error).__name__}: {error}); this gpntk kernel evaluates eagerly "
                "from now on (see gpntk.settings.fusion)",
                NumericalWarning,
                stacklevel=3,
            )
            return fn(*args)
        self.compiled = True
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> "FusionPolicy":
        # a copied kernel (batch indexing, deepcopy) starts its own counts; the compiled code is shared anyway
        return FusionPolicy(self.backend)

    def __getstate__(self) -> dict[str, Any]:
        # pickled kernels carry the backend only: compiled functions cannot be pickled
        return {"backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._start(state["backend"])
