"""The ``gpntk`` command line: ``gpntk demo`` and ``gpntk fit`` (``python -m gpntk`` too).

``main`` (argument parsing) imports nothing heavy, so ``gpntk --help`` runs without torch; the
commands import the library when they run.
"""

from .main import main

__all__ = ["main"]
