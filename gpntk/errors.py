"""Exceptions raised by gpntk."""

from __future__ import annotations

__all__ = ["ArchitectureError"]


class ArchitectureError(ValueError):
    """An architecture that has no infinite-width kernel as written.

    Raised when a network is built, never later: two nonlinearities in a row, an activation that
    does not follow an affine layer, an unknown layer or activation name, invalid variances.
    """
