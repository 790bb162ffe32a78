r"""Variance repair: posterior variances (differences of non-negative terms) clipped at zero, with a warning if needed.

A variance :math:`P(x, x) - q` is computed as a difference; in floating point it can come out
slightly negative where the data explain almost all of the prior (at the training inputs as
:math:`t \to \infty`). Within the round-off bound (:data:`VARIANCE_ROUNDING`) it is set to zero
silently, beyond it with a :class:`~gpntk.NumericalWarning`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import NumericalWarning

__all__ = ["VARIANCE_ROUNDING", "repair_variances", "repair_diagonal"]

#: a negative variance of size at most VARIANCE_ROUNDING * n * eps * (the sum of the magnitudes of the terms it
#: is computed from) is round-off and set to zero silently; a larger one is set to zero with a NumericalWarning
VARIANCE_ROUNDING = 10.0


def repair_variances(variances: Tensor, scale: Tensor, n: int, allowance: float = 0.0) -> Tensor:
    r"""Negative ``variances`` set to zero; a :class:`NumericalWarning` when one is beyond round-off.

    A variance :math:`P(x, x) - q` is a difference of non-negative terms whose magnitudes sum to
    ``scale``; its round-off is bounded by :data:`VARIANCE_ROUNDING` :math:`\cdot n \varepsilon`
    ``scale`` (plus ``allowance`` ``scale``: the Lanczos solver's tolerance). Negative values
    within that bound are set to zero silently, larger ones too but with a warning (the result
    lost precision: an ill-conditioned training kernel, float32, or an unconverged solver).
    """
    eps = torch.finfo(variances.dtype).eps
    bound = (VARIANCE_ROUNDING * n * eps + allowance) * scale.detach().abs()
    worst = (-variances.detach() - bound).max() if variances.numel() else None
    if worst is not None and worst > 0:
        ratio = (-variances.detach() / scale.detach().abs().clamp_min(torch.finfo(variances.dtype).tiny)).max()
        warnings.warn(
            f"{int((variances.detach() < -bound).sum())} posterior variances were negative beyond round-off "
            f"(down to {variances.detach().min().item():.3g}, {ratio.item():.2g} of the terms they are computed "
            f"from; the bound is {VARIANCE_ROUNDING * n * eps + allowance:.2g}) and were set to zero: the training "
            "kernel is ill-conditioned for this dtype; consider diag_reg > 0 or float64",
            NumericalWarning,
            stacklevel=5,
        )
    return variances.clamp_min(0)


def repair_diagonal(cov: Tensor, scale: Tensor, n: int, allowance: float = 0.0) -> Tensor:
    """``cov`` ``(m, m)`` with its diagonal repaired by :func:`repair_variances`."""
    diagonal = cov.diagonal(dim1=-2, dim2=-1)
    repaired = repair_variances(diagonal, scale, n, allowance)
    return cov + torch.diag_embed(repaired - diagonal)
