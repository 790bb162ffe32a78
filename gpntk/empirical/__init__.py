"""Empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``, and Monte Carlo estimates.

Modules: :mod:`~gpntk.empirical.ntk` (:func:`empirical_ntk`, choosing between the layer-by-layer
sum of :mod:`~gpntk.empirical.structured` and the full Jacobian of
:mod:`~gpntk.empirical.jacobian`), :mod:`~gpntk.empirical.nngp` (:func:`empirical_nngp`),
:mod:`~gpntk.empirical.monte_carlo` (:func:`monte_carlo_kernel`), and
:mod:`~gpntk.empirical.evaluation`, the batched matrices and diagonals that
:class:`~gpntk.EmpiricalNTKKernel` returns; :mod:`~gpntk.empirical.network`,
:mod:`~gpntk.empirical.channels` and :mod:`~gpntk.empirical.checks` hold what they share.
"""

from .monte_carlo import monte_carlo_kernel
from .nngp import empirical_nngp
from .ntk import empirical_ntk

__all__ = ["empirical_ntk", "empirical_nngp", "monte_carlo_kernel"]
