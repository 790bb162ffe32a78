"""Keep third-party import banners off stdout.

pykeops prints a banner (e.g. ``[KeOps] Warning : CUDA libraries not found ...``) on standard
output when it is first imported, which happens as soon as GPyTorch imports its KeOps kernels,
i.e. on ``import gpytorch``. A library must not write to a program's stdout (``gpntk fit -o -``
writes CSV there), so gpntk performs the imports that can trigger it inside
:func:`stdout_to_stderr`: whatever they print goes to stderr instead, where diagnostics belong.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

__all__ = ["stdout_to_stderr"]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Redirect Python-level writes to ``sys.stdout`` to ``sys.stderr`` for the duration of the block."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
