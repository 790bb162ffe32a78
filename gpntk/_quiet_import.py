"""Keep third-party import banners off stdout.

pykeops prints a banner (e.g. ``[KeOps] Warning : CUDA libraries not found ...``) on standard
output when it is first imported, which happens as soon as GPyTorch imports its KeOps kernels,
i.e. on ``import gpytorch``. A library must not write to a program's stdout (``gpntk fit -o -``
writes CSV there), so gpntk performs the imports that can trigger it inside
:func:`stdout_to_stderr`: whatever they print goes to stderr instead, where diagnostics belong.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator, Sequence

__all__ = ["stdout_to_stderr", "quiet_first_import"]


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Redirect Python-level writes to ``sys.stdout`` to ``sys.stderr`` for the duration of the block."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    """Runs the first import of one top-level package inside :func:`stdout_to_stderr`.

    ``import gpntk`` imports nothing heavy; GPyTorch is first imported by whichever gpntk module
    needs it (``gpntk.kernels``, ``gpntk.layers``, the CLI's fit), so the redirection cannot sit
    around one import statement. This finder, placed first on ``sys.meta_path`` by
    :func:`quiet_first_import`, finds the package's spec through the other finders and wraps its
    loader's ``exec_module``; it removes itself on first use.
    """

    def __init__(self, name: str):
        self.name = name

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = None if spec is None else spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            with stdout_to_stderr():
                execute(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]  # this module's loader instance only
        return spec


def quiet_first_import(name: str) -> None:
    """Send whatever the first ``import name`` prints on stdout to stderr (nothing if already imported)."""
    if name not in sys.modules and not any(
        isinstance(finder, _QuietFirstImport) and finder.name == name for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietFirstImport(name))
