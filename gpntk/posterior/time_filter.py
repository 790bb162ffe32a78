r"""The time filter :math:`g_t(\lambda) = (1 - e^{-\tau\lambda})/\lambda` and the directions it drops.

Both solvers evaluate the posterior through this one function of the training kernel's
eigenvalues (Ritz values with Lanczos). Eigenvalues below ``n·eps·λ_max`` are indistinguishable
from round-off and treated as exactly zero at *every* time, as by the pseudo-inverse at
:math:`t = \infty` (:func:`time_filter`); :func:`warn_dropped` says when that could matter.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..errors import NumericalWarning

__all__ = ["time_filter", "warn_dropped", "RitzFilter", "DROPPED_FIT_WARNING"]

#: at a finite time, directions with eigenvalues below the cutoff are dropped silently while they could have
#: been fitted by at most this fraction, 1 - exp(-τ·cutoff) (relative to the dtype's sqrt(eps)); beyond, a warning
DROPPED_FIT_WARNING = 1.0


def time_filter(lam: Tensor, tau: float, cutoff: float | Tensor) -> Tensor:
    r""":math:`g = (1 - e^{-\tau\lambda})/\lambda = \tau\,\varphi_1(\tau\lambda)` elementwise (``expm1``: exact near 0).

    At :math:`\tau = \infty`, :math:`1/\lambda`. Eigenvalues :math:`\lambda \le` ``cutoff`` count
    as exactly zero *at every time*, and their directions are never fitted (:math:`g = 0`), as
    at :math:`t = \infty` (a pseudo-inverse): such an eigenvalue is indistinguishable from
    round-off, and for a PSD kernel a zero eigenvector :math:`v` has :math:`G(x, X)\, v = 0`, so
    the exact contribution :math:`G(x, X)\, v\, \tau\, v^\top Y` is zero while the computed one is
    round-off times :math:`\tau` (unbounded as :math:`t` grows). With this convention
    :math:`0 \le \lambda g \le 1` and :math:`g` increases with :math:`t` to its value at
    :math:`t = \infty`, so every spectral component of the mean approaches its limit
    monotonically.
    """
    small = lam <= cutoff
    if math.isinf(tau):
        return torch.where(small, torch.zeros_like(lam), 1 / torch.where(small, torch.ones_like(lam), lam))
    z = tau * lam
    # τ·φ1(z) with φ1(z) = (1 - e^{-z}) / z (z > 0 wherever λ is above the cutoff, unless τ = 0: φ1(0) = 1)
    positive = z > 0
    phi1 = torch.where(positive, -torch.expm1(-z) / torch.where(positive, z, torch.ones_like(z)), torch.ones_like(z))
    return torch.where(small, torch.zeros_like(lam), tau * phi1)


def warn_dropped(count: int, total: int, cutoff: float, tau: float, dtype: torch.dtype) -> None:
    r"""Warn that ``count`` eigen- (or Ritz) values at most ``cutoff`` were treated as zero, where that could matter.

    At :math:`t = \infty` always (a pseudo-inverse). At a finite time only when such a direction
    could have been fitted by more than :math:`\sqrt{\varepsilon}` (:data:`DROPPED_FIT_WARNING`
    times it): :math:`1 - e^{-\tau \cdot \text{cutoff}}`; below, the exact contribution of the
    dropped directions is smaller than that fraction of the targets' component in them.
    """
    if count == 0:
        return
    if math.isinf(tau):
        warnings.warn(
            f"the training kernel is numerically singular ({count} of {total} eigenvalues below "
            f"{cutoff:.3g}); at t = inf those directions are never fitted (pseudo-inverse); consider diag_reg > 0",
            NumericalWarning,
            stacklevel=5,
        )
    elif -math.expm1(-tau * cutoff) > DROPPED_FIT_WARNING * math.sqrt(torch.finfo(dtype).eps):
        warnings.warn(
            f"the training kernel is numerically singular ({count} of {total} eigenvalues below {cutoff:.3g}, "
            f"indistinguishable from round-off); those directions are treated as exactly zero and never fitted, "
            f"although at this time (tau * cutoff = {tau * cutoff:.3g}) a true eigenvalue that small could have "
            "been partly fitted; consider diag_reg > 0 or float64",
            NumericalWarning,
            stacklevel=5,
        )


class RitzFilter:
    r"""A :data:`~gpntk.posterior.lanczos.MatrixFunction` of the training times; remembers the Ritz values it dropped.

    Ritz values :math:`\theta` ``(a, k)`` go to ``(T, a, k)``: :math:`g_t(\theta)` per time
    (``taus``: :math:`\tau` per time), or ``combine(θ, g)``; those below ``n·eps·θ_max`` (per
    tridiagonal) count as zero at every time (see :func:`time_filter`). Once a Ritz value falls
    below the cutoff it stays below (the smallest Ritz value decreases with the steps and the
    cutoff grows with the largest), so what the last evaluations dropped is what the results
    dropped; :meth:`warn` reports it like the eigendecomposition does.
    """

    def __init__(
        self, taus: list[float], combine: Callable[[Tensor, Tensor], Tensor] | None, n: int, eps: float
    ) -> None:
        self.taus, self.combine, self.n, self.eps = taus, combine, n, eps
        self.dropped, self.size, self.cutoff = 0, 0, 0.0

    def __call__(self, theta: Tensor) -> Tensor:
        cutoff: Tensor | float
        if theta.shape[-1]:
            cutoff = self.n * self.eps * theta.amax(-1, keepdim=True)
            small = theta <= cutoff
            dropped = int(small.sum(-1).max())
            if dropped:
                self.dropped = max(self.dropped, dropped)
                self.size = max(self.size, theta.shape[-1])
                self.cutoff = max(self.cutoff, float(cutoff[small.any(-1)].max()))
        else:
            cutoff = 0.0
        rows = []
        for tau in self.taus:
            g = time_filter(theta, tau, cutoff)
            rows.append(g if self.combine is None else self.combine(theta, g))
        return torch.stack(rows)

    def warn(self, dtype: torch.dtype) -> None:
        """Warn (:func:`warn_dropped`, longest time) if Ritz values were treated as zero where it could matter."""
        warn_dropped(self.dropped, self.size, self.cutoff, max(self.taus), dtype)
