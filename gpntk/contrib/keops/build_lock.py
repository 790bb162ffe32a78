"""One compilation at a time per pykeops build folder, across processes.

pykeops compiles a formula on the first call of its ``Genred`` in a process: if the shared library
of the formula's tag is not yet in the build folder it writes the C++ source and runs the compiler
with the library's final name as output (``pykeops/common/keops_io/LoadKeOps_cpp.py``, pykeops
2.3), with no lock. A second process that calls the same formula meanwhile (two pytest-xdist
workers, two ranks of :mod:`gpntk.distributed` on one machine, two notebooks) finds the file
already there, half written, and fails to import it (``ImportError: ... file too short``), or both
rewrite the source at once.

:class:`LockedRoutine` wraps a ``Genred`` so that its first call per argument signature (device
and the number of dimensions of each argument: what pykeops specialises on besides the formula
and dtype) holds an exclusive ``fcntl.flock`` on ``.gpntk-compile.lock`` in the build folder: the
other processes wait while one compiles, then load the finished library. Later calls take no
lock, so reductions of several processes still run in parallel. Where the lock file cannot be
created (a read-only folder of formulas compiled beforehand) no lock is taken. Where ``fcntl`` does not exist
(Windows, which pykeops does not support) no lock is taken.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

LOCK_NAME = ".gpntk-compile.lock"


def build_folder() -> str:
    """pykeops' current build folder (where compiled formulas and the lock file live)."""
    import pykeops

    return str(pykeops.get_build_folder())


@contextmanager
def build_folder_lock(folder: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (default: pykeops' build folder) for the ``with`` block."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = build_folder() if folder is None else folder
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, LOCK_NAME), "a")
    except OSError:  # a read-only folder of formulas compiled beforehand: nothing will be written there
        yield
        return
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class LockedRoutine:
    """A pykeops ``Genred`` whose first call per argument signature holds :func:`build_folder_lock`."""

    def __init__(self, routine: Any) -> None:
        self.routine = routine
        self._ready: set[tuple[str, tuple[int, ...]]] = set()
        self._guard = threading.Lock()

    def __call__(self, *args: Tensor, backend: str = "auto") -> Tensor:
        signature = (args[0].device.type, tuple(a.dim() for a in args))
        if signature in self._ready:
            return self.routine(*args, backend=backend)
        with self._guard, build_folder_lock():
            out = self.routine(*args, backend=backend)
        self._ready.add(signature)
        return out
