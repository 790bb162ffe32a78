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
``fusion(True)`` compiles every evaluation, gradients included (long hyperparameter fits of large
kernels). Fusion applies to fully-connected architectures
(vector inputs); spatial ones always run eagerly.

>>> import gpntk
>>> with gpntk.settings.fusion(False):   # never compile (e.g. in short scripts)
...     pass
"""

from __future__ import annotations

import os
from typing import Literal

__all__ = ["fusion", "FUSION_MIN_ELEMENTS", "FUSION_AFTER_CALLS"]

#: under ``fusion("auto")``, evaluations of at least this many numbers (pairs x per-pair entries) compile
FUSION_MIN_ELEMENTS = 2**23
#: ... once this many such evaluations of the same network (dtype, device, NNGP/NTK) have run eagerly
FUSION_AFTER_CALLS = 2

Mode = Literal["auto"] | bool


class fusion:
    """``fusion(mode)``: ``"auto"`` (default: compile large evaluations without gradients), ``True`` or ``False``.

    Use as a context manager, or call :meth:`set` for the rest of the process. The environment
    variable ``GPNTK_FUSION=0`` sets the initial mode to ``False`` (``1`` to ``True``). If
    compilation fails (no C++ compiler, an unsupported platform), the kernel warns once and runs
    eagerly from then on; results never depend on the mode beyond floating-point rounding.
    """

    _mode: Mode = {"0": False, "1": True}.get(os.environ.get("GPNTK_FUSION", ""), "auto")

    def __init__(self, mode: Mode):
        self._check(mode)
        self.mode = mode
        self._previous: Mode | None = None

    @staticmethod
    def _check(mode) -> None:
        if not (isinstance(mode, bool) or (isinstance(mode, str) and mode == "auto")):
            raise ValueError(f"fusion mode must be 'auto', True or False, got {mode!r}")

    @classmethod
    def current(cls) -> Mode:
        return cls._mode

    @classmethod
    def set(cls, mode: Mode) -> None:
        cls._check(mode)
        cls._mode = mode

    @classmethod
    def enabled_for(cls, elements: int, needs_grad: bool, previous_calls: int = FUSION_AFTER_CALLS) -> bool:
        """Whether an evaluation of ``elements`` numbers runs compiled.

        ``previous_calls``: how many large evaluations of the same configuration ran before it.
        """
        mode = cls._mode
        if mode is True:
            return True
        return (
            mode == "auto" and elements >= FUSION_MIN_ELEMENTS and not needs_grad
            and previous_calls >= FUSION_AFTER_CALLS
        )

    def __enter__(self) -> "fusion":
        self._previous = fusion._mode
        fusion._mode = self.mode
        return self

    def __exit__(self, *exc) -> None:
        fusion._mode = self._previous
