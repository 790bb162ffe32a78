"""Exceptions and warning categories of gpntk.

Whenever gpntk cannot compute something exactly (an approximation, a refused case, lost
precision, a cached value that may be stale) it raises, or warns with a category from here, so
that users can filter gpntk's warnings as a group or by kind::

    import warnings, gpntk
    warnings.simplefilter("error", gpntk.NumericalWarning)   # make lost precision an error
    warnings.simplefilter("ignore", gpntk.GPNTKWarning)      # silence every gpntk warning

A kernel that overflows its dtype (finite inputs, NaN or infinite values) raises the built-in
``FloatingPointError`` instead of returning them.
"""

from __future__ import annotations

__all__ = [
    "ArchitectureError", "GPNTKWarning", "NumericalWarning", "ApproximationWarning", "CompositionWarning",
    "AmbiguousHyperparameterError",
]


class ArchitectureError(ValueError):
    """An architecture that has no infinite-width kernel as written.

    Raised when a network is built, never later: two nonlinearities in a row, an activation that
    does not follow an affine layer, an unknown layer or activation name, invalid variances.
    """


class AmbiguousHyperparameterError(AttributeError):
    """``kernel.weight_variance`` (or ``bias_variance``) of a network with several independent ones.

    A kernel exposes ``weight_variance`` / ``bias_variance`` only when its network has one such
    hyperparameter (``mlp(shared=True)``); otherwise the message names the per-layer paths (read
    them with ``kernel.layer_variances``). An ``AttributeError``, so ``hasattr`` and
    ``getattr(kernel, name, default)`` behave as for a missing attribute.
    """


class GPNTKWarning(UserWarning):
    """Base class of every warning gpntk emits."""


class NumericalWarning(GPNTKWarning, RuntimeWarning):
    """A result that lost precision or needed a numerical repair.

    Examples: a numerically singular training kernel treated by a pseudo-inverse, negative
    round-off eigenvalues clipped, an iterative solver that stopped before its tolerance, a
    compiled evaluation that failed and fell back to eager evaluation.
    """


class ApproximationWarning(GPNTKWarning):
    """A quantity computed approximately where the user may expect it exact.

    Example: GPyTorch replacing a matrix-free gpntk kernel by a low-rank root decomposition
    inside a product of kernels.
    """


class CompositionWarning(GPNTKWarning):
    """A composition of kernels or models whose meaning differs from what it looks like.

    Example: a prior on hyperparameters shared by two kernels of one model, which GPyTorch's
    marginal likelihood would count twice.
    """
