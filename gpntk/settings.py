r"""Library-wide settings, as context managers (in the manner of ``gpytorch.settings``).

``fusion``: whether the layer recursion of a kernel evaluation runs through :func:`torch.compile`,
which fuses its dozens of elementwise passes per layer into a few loops (measured 10x faster per
block on a CPU). Compilation costs seconds the first time a network is evaluated at a given dtype
and device (cached on disk by PyTorch, so later processes pay less; with gradients it costs
tens of seconds; measured 5-68 s on a 2-core CPU against 0.2-3 s for one eager evaluation), so
by default (``"auto"``) it is used only where it pays for itself: for evaluations of at least
:data:`FUSION_MIN_ELEMENTS` numbers that need no gradient, once the same network has already been
evaluated :data:`FUSION_AFTER_CALLS` times at that size, dtype and device (repeated posteriors,
predictions over many test sets, benchmarks); a one-off evaluation never compiles.
In a fit (a kernel in ``train()`` mode), evaluations of at least
:data:`FUSION_MIN_ELEMENTS_FIT` numbers compile from the first one, with gradients or without, so
the fit pays the compile up front and never pauses in its middle; outside a fit evaluations with
gradients never compile. ``fusion(True)`` compiles every
evaluation, gradients included. Fusion applies to fully-connected architectures (vector inputs);
spatial ones always run eagerly.

``kernel_backend``: whether kernel matrices are stored (dense) or matrix-free (blockwise, KeOps),
for conjugate-gradient GPs and large-n posteriors.

``progress``: whether long computations (blockwise kernel evaluations, graph Gram matrices,
posterior solvers, ``gpntk fit``) draw progress bars on stderr when it is a terminal (needs the
``progress`` extra, tqdm).

>>> import gpntk
>>> with gpntk.settings.fusion(False):   # never compile (e.g. in short scripts)
...     pass
>>> with gpntk.settings.kernel_backend("blockwise"):   # never store an n x n kernel
...     pass
>>> with gpntk.settings.progress(False):   # no progress bars, even on a terminal
...     pass
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Generic, Literal, TypeVar, cast

__all__ = [
    "fusion", "kernel_backend", "recompute_backward", "progress", "FUSION_MIN_ELEMENTS", "FUSION_MIN_ELEMENTS_FIT",
    "FUSION_AFTER_CALLS",
    "DENSE_MAX_ELEMENTS", "TANGENT_MAX_ELEMENTS", "PROGRESS_DELAY", "gpytorch_defaults", "huge_pages",
    "HUGE_PAGE_MIN_BYTES",
]

FUSION_MIN_ELEMENTS = 2**23
"""Under ``fusion("auto")``, evaluations of at least this many numbers (pairs x per-pair entries) compile."""
FUSION_MIN_ELEMENTS_FIT = 2**21
"""Under ``fusion("auto")``, evaluations in a fit (a kernel in ``train()`` mode), with gradients or without, of
at least this many numbers compile, from the first (an n x n kernel from n = 1449 on). Measured on a 2-core CPU,
one thread, depth-3 ReLU NTK ExactGP step (``benchmarks/mll_step.py``, Cholesky path): eager 1.00 s / compiled 0.64 s at
n = 1500, 1.74-1.85 s / 1.29-1.35 s at n = 2000 (RBF 0.46 s and 1.01 s), for a compile of about 27-31 s paid
in the first step: the saving repays it within about 60-80 steps of a fit."""
FUSION_AFTER_CALLS = 2
"""Under ``fusion("auto")``, such large evaluations compile once this many of the same network
(dtype, device, NNGP/NTK) have run eagerly."""
DENSE_MAX_ELEMENTS = 2**27
"""Under ``kernel_backend("auto")``, kernel matrices of more numbers than this are not stored (1 GiB in float64, an
n x n matrix up to n = 11585). Measured at n = 10000 (depth-3 ReLU NTK ExactGP step on GPyTorch's CG path, one
thread, 2-core CPU): stored 17.7-19.2 s, +3.8 GB peak, matrix-free 48 s, +40 MiB, against RBF's 11.7-14.1 s,
+4.6 GB (``benchmarks/mll_step.py``); a stored matrix makes each CG iteration a matmul."""

TANGENT_MAX_ELEMENTS = 2**27
r"""The most numbers the hyperparameter tangents of one kernel matrix may hold (:mod:`gpntk.kernels.tangents`).

A compiled kernel matrix whose hyperparameters (not inputs) need gradients is filled together with
its derivative :math:`\partial K/\partial\theta_k` in each of them while these take at most this many
numbers: :math:`p` times the entries of the blocks computed, for :math:`p` hyperparameters (blocks mirrored
below the diagonal of a symmetric kernel are stored once, so :math:`p\, n (n + B) / 2` for blocks of
:math:`B` rows: two hyperparameters up to n ≈ 11000 in float64, one n x n matrix of memory at n = 10000);
the backward is then one pass over them. Larger ones recompute each block in the backward instead
(:class:`recompute_backward`)."""

PROGRESS_DELAY = 1.0
"""Seconds a computation runs before its progress bar appears (short ones never show one)."""

HUGE_PAGE_MIN_BYTES = 2**24
"""Kernel matrices of at least this many bytes (16 MiB: a float64 n x n matrix from n = 1449) are
allocated on transparent huge pages where the OS allows (:class:`huge_pages`)."""

Mode = Literal["auto"] | bool
Backend = Literal["auto", "dense", "blockwise", "keops"]


_M = TypeVar("_M")


class _Setting(Generic[_M]):
    """A process-wide mode, settable for a ``with`` block or with :meth:`set` (like ``gpytorch.settings``)."""

    _mode: _M
    _name: str
    _choices: str

    def __init__(self, mode: _M) -> None:
        self._check(mode)
        self.mode = mode
        self._previous: _M | None = None

    @classmethod
    def _valid(cls, mode: object) -> bool:
        raise NotImplementedError

    @classmethod
    def _check(cls, mode: object) -> None:
        if not cls._valid(mode):
            raise ValueError(f"{cls._name} mode must be {cls._choices}, got {mode!r}")

    @classmethod
    def current(cls) -> _M:
        return cls._mode

    @classmethod
    def set(cls, mode: _M) -> None:
        cls._check(mode)
        cls._mode = mode

    def __enter__(self) -> "_Setting[_M]":
        self._previous = type(self)._mode
        type(self)._mode = self.mode
        return self

    def __exit__(self, *exc: object) -> None:
        type(self)._mode = cast(_M, self._previous)  # set by __enter__


class fusion(_Setting[Mode]):
    """``fusion(mode)``: ``"auto"`` (default: compile large evaluations without gradients), ``True`` or ``False``.

    Use as a context manager, or call :meth:`set` for the rest of the process. The environment
    variable ``GPNTK_FUSION=0`` sets the initial mode to ``False`` (``1`` to ``True``). If
    compilation fails (no C++ compiler, an unsupported platform), the kernel warns once and runs
    eagerly from then on; results never depend on the mode beyond floating-point rounding.
    """

    _name, _choices = "fusion", "'auto', True or False"
    _mode: Mode = {"0": False, "1": True}.get(os.environ.get("GPNTK_FUSION", ""), "auto")

    @classmethod
    def _valid(cls, mode: object) -> bool:
        return isinstance(mode, bool) or (isinstance(mode, str) and mode == "auto")

    @classmethod
    def enabled_for(
        cls, elements: int, needs_grad: bool, previous_calls: int = FUSION_AFTER_CALLS, training: bool = False
    ) -> bool:
        """Whether an evaluation of ``elements`` numbers runs compiled.

        ``needs_grad``: the evaluation belongs to an autograd graph; ``previous_calls``: how many
        large evaluations of the same configuration ran before it; ``training``: its owner is
        being fitted (a kernel in ``train()`` mode). Under ``"auto"``, evaluations of at least
        :data:`FUSION_MIN_ELEMENTS` numbers compile when they need no gradient and repeat
        (``previous_calls >= FUSION_AFTER_CALLS``); in a fit, evaluations of at least
        :data:`FUSION_MIN_ELEMENTS_FIT` compile from the first, with gradients or without (up
        front: a fit never pauses to compile in its middle; a fit's evaluations without gradients
        are, for example, the stored row blocks of a sharded kernel, :mod:`gpntk.distributed`).
        Outside a fit evaluations with gradients run eagerly.
        """
        mode = cls._mode
        if mode is True:
            return True
        if mode is False:
            return False
        if training and elements >= FUSION_MIN_ELEMENTS_FIT:
            return True
        if needs_grad:
            return False
        return elements >= FUSION_MIN_ELEMENTS and previous_calls >= FUSION_AFTER_CALLS


class kernel_backend(_Setting[Backend]):
    r"""How kernel matrices are represented: ``"auto"`` (default), ``"dense"``, ``"blockwise"`` or ``"keops"``.

    * ``"dense"``: the matrix is computed once (in blocks) and stored; products are plain matmuls.
    * ``"blockwise"``: matrix-free (:class:`gpntk.kernels.blockwise.BlockwiseKernelOperator`):
      every product recomputes the kernel block by block, memory :math:`O(n)`; for every
      architecture, on CPU and GPU.
    * ``"keops"``: matrix-free through a pykeops formula (:mod:`gpntk.contrib.keops`); fully
      connected architectures with closed-form activations; needs the ``keops`` extra.
    * ``"auto"``: dense while the matrix holds at most :data:`DENSE_MAX_ELEMENTS` numbers or
      GPyTorch would factorize it anyway (at most ``gpytorch.settings.max_cholesky_size`` rows
      and columns) — a stored matrix makes each conjugate-gradient iteration a cheap matmul
      instead of a whole kernel evaluation; beyond that matrix-free, with the backend measured to
      win on the inputs' device class (``gpntk.kernels.measured_backends.MEASURED_BACKENDS``, each
      entry citing its benchmark): blockwise on CPU (KeOps measured 6x slower there) and on CUDA
      (KeOps not measured there yet; ``benchmarks/gpu.py`` measures it), and on any device class
      without a measurement. ``"auto"`` never picks KeOps without a measurement showing it faster.

    Matrices with a single row or column are always dense. ``NTKKernel(net, backend=...)`` sets
    the backend of one kernel; the environment variable ``GPNTK_KERNEL_BACKEND`` the initial mode.
    """

    _name, _choices = "kernel_backend", "'auto', 'dense', 'blockwise' or 'keops'"
    _mode: Backend = os.environ.get("GPNTK_KERNEL_BACKEND", "auto")  # type: ignore[assignment]

    @classmethod
    def _valid(cls, mode: object) -> bool:
        return isinstance(mode, str) and mode in ("auto", "dense", "blockwise", "keops")


class _Switch(_Setting[bool]):
    """A setting that is on or off; :meth:`on` reads it."""

    @classmethod
    def _valid(cls, mode: object) -> bool:
        return isinstance(mode, bool)

    @classmethod
    def on(cls) -> bool:
        return cls._mode


class recompute_backward(_Switch):
    r"""``recompute_backward(on)``: how gradients of kernel matrices are computed (default ``True``).

    ``True``: the kernel matrix is filled without recording the recursion, and the backward pass
    recomputes it block by block (:mod:`gpntk.kernels.blocked`, blockwise gradient checkpointing):
    memory is the kernel matrix and its gradient, not every intermediate of the recursion, and the
    backward of an :math:`n \times n` kernel does :math:`O(n^2)` work. ``False``: plain autograd
    through every block (kept for comparisons; it stores every intermediate). Values and
    gradients agree to rounding either way. ``torch.func`` transforms and forward-mode AD always
    use plain autograd. The environment variable ``GPNTK_RECOMPUTE_BACKWARD=0`` sets the initial
    mode to ``False``.
    """

    _name, _choices = "recompute_backward", "True or False"
    _mode: bool = os.environ.get("GPNTK_RECOMPUTE_BACKWARD", "1") != "0"


class progress(_Switch):
    r"""``progress(on)``: whether long computations draw progress bars (default ``True``).

    A bar is drawn only when this is on, stderr is a terminal and tqdm is installed (the
    ``progress`` extra: ``pip install gpntk[progress]``), and only for work that runs longer than
    :data:`PROGRESS_DELAY` seconds: blockwise kernel evaluations and their products and gradients
    (over blocks), graph Gram matrices (over pairs of graphs), the trained ensemble's solvers
    (Lanczos products, the eigendecomposition's steps), ``gpntk fit`` and the benchmarks. Bars
    go to stderr and disappear when done; results never depend on this setting. The environment
    variable ``GPNTK_PROGRESS=0`` sets the initial mode to ``False``.
    """

    _name, _choices = "progress", "True or False"
    _mode: bool = os.environ.get("GPNTK_PROGRESS", "1") != "0"


class huge_pages(_Switch):
    r"""``huge_pages(on)``: whether large kernel matrices on CPUs ask for transparent huge pages (default ``True``).

    On Linux, gpntk's CPU kernel matrices of at least :data:`HUGE_PAGE_MIN_BYTES` bytes are
    advised onto 2 MiB pages (:mod:`gpntk.kernels.memory`): their first write then costs a few
    hundred page faults instead of tens of thousands (measured: a 4000 x 4000 float64 matrix
    allocated and filled in 12 ms instead of 55 ms). Values never depend on this setting. The
    environment variable ``GPNTK_HUGE_PAGES=0`` sets the initial mode to ``False``.
    """

    _name, _choices = "huge_pages", "True or False"
    _mode: bool = os.environ.get("GPNTK_HUGE_PAGES", "1") != "0"


@contextlib.contextmanager
def gpytorch_defaults() -> Iterator[None]:
    """GPyTorch's own defaults for the ``with`` block, for every setting that importing BoTorch changes.

    ``import botorch`` (also through ``gpntk.botorch``) changes GPyTorch's global defaults for the
    rest of the process: ``max_cholesky_size`` 800 -> 4096, ``max_eager_kernel_size`` 512 -> 4096,
    ``cholesky_max_tries`` 3 -> 6, and ``fast_computations`` off (so an ``ExactGP`` factorizes
    its covariance by Cholesky at any size: no conjugate gradients, no Lanczos log-determinant).
    Inside ``with gpntk.settings.gpytorch_defaults():`` the four are GPyTorch's own values again,
    whatever was imported; settings entered inside the block (``max_cholesky_size(100)``) still
    apply. Use it where a computation must follow GPyTorch's documented path (a benchmark of the CG
    path, a reference that must not depend on import order).
    """
    import gpytorch

    with (
        gpytorch.settings.max_cholesky_size(800),
        gpytorch.settings.max_eager_kernel_size(512),
        gpytorch.settings.cholesky_max_tries(3),
        gpytorch.settings.fast_computations(covar_root_decomposition=True, log_prob=True, solves=True),
    ):
        yield


kernel_backend._check(kernel_backend._mode)  # a bad GPNTK_KERNEL_BACKEND fails at import, naming the choices
