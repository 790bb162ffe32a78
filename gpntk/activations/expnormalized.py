r"""``ExpNormalized``: an activation defined on the kernel, not as an elementwise function.

Neural Tangents' ``ExpNormalized`` (Novak et al. 2020) maps the covariance of two points with
variances :math:`q = \Sigma(x, x)`, :math:`q' = \Sigma(x', x')` and correlation
:math:`\rho = \Sigma(x, x')/\sqrt{q q'}` to

.. math::
    \Sigma \leftarrow \sqrt{q q'}\, e^{\gamma(\rho + s)}, \qquad
    \Theta \leftarrow \gamma\, e^{\gamma(\rho + s)}\, \Theta

(:math:`s` = ``shift``; :math:`\rho` clipped to [-1, 1] with ``do_clip``). With :math:`s = -1` the
covariance is :math:`\sqrt{q q'}\exp(-\tfrac\gamma2 \lVert \hat u - \hat u' \rVert^2)`: the RBF kernel
of the normalised pre-activations, scaled by their norms. The NTK factor is
:math:`\partial\Sigma_{\mathrm{new}}/\partial\Sigma`, the variances held fixed.

No elementwise :math:`\phi` has this dual in general (the map is not an expectation
:math:`\mathbb E[\phi(u)\phi(v)]` of any fixed function), and gpntk knows no finite network whose
NTK is the one above, so ``net.finite(width)`` refuses a network containing it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._validation import bool_argument, real_argument
from ..core.layer import Shape
from ..errors import ArchitectureError
from .base import Activation, correlation

__all__ = ["ExpNormalized"]


class ExpNormalized(Activation):
    r"""The kernel map :math:`\Sigma \leftarrow \sqrt{q q'}\, e^{\gamma(\rho + s)}`,
    :math:`\Theta \leftarrow \gamma e^{\gamma(\rho + s)}\,\Theta` (module notes; Neural Tangents'
    ``ExpNormalized``). Defined on the kernel itself, not as the expectation of an elementwise
    function, so it has no finite-width module.

    :param gamma: :math:`\gamma \ge 0`.
    :param shift: :math:`s`, any real number (:math:`-1`: unit diagonal factor, the variances are kept).
    :param do_clip: clip the correlation to [-1, 1] (it can leave the interval by rounding only).

    On the diagonal (:math:`\rho = 1`): :math:`q \leftarrow q\, e^{\gamma(1 + s)}`, factor
    :math:`\gamma e^{\gamma(1 + s)}`. A point of zero variance keeps covariance 0 with every point.
    """

    def __init__(self, gamma: float = 1.0, shift: float = -1.0, do_clip: bool = False):
        super().__init__()
        self.gamma = real_argument("ExpNormalized gamma", gamma, minimum=0.0, error=ArchitectureError)
        self.shift = real_argument("ExpNormalized shift", shift, error=ArchitectureError)
        self.do_clip = bool_argument("ExpNormalized do_clip", do_clip, error=ArchitectureError)

    def fn(self, x: Tensor) -> Tensor:
        raise ArchitectureError(self._no_finite_module())

    def _no_finite_module(self) -> str:
        return (
            f"{self!r} is defined on the kernel (Σ ← √(q q')·exp(γ(ρ + shift))), not as an elementwise "
            "function, and no finite network with this kernel is known: it has no finite-width module "
            "(net.finite); use an elementwise activation such as Rbf or Exp in finite networks"
        )

    def dual(self, q11: Tensor, q12: Tensor, q22: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        rho, sqrt_prod = correlation(q11, q12, q22, clamp=self.do_clip)
        factor = torch.exp(self.gamma * (rho + self.shift))
        return sqrt_prod * factor, (self.gamma * factor if need_dot else None)

    def dual_diag(self, q: Tensor, need_dot: bool) -> tuple[Tensor, Tensor | None]:
        factor = math.exp(self.gamma * (1 + self.shift))
        return q * factor, (torch.full_like(q, self.gamma * factor) if need_dot else None)

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        raise ArchitectureError(self._no_finite_module())

    def __repr__(self) -> str:
        return f"ExpNormalized(gamma={self.gamma}, shift={self.shift}, do_clip={self.do_clip})"
