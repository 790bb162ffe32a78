r"""Layer normalisation over the channels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import real_argument
from ..core.finite import ChannelNorm
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.state import KernelState
from ..errors import ArchitectureError

__all__ = ["LayerNorm"]


def _inverse_sqrt(q: Tensor, eps: float) -> Tensor:
    """:math:`(q + \\epsilon)^{-1/2}`, the finite module's factor at infinite width (``eps > 0``, so
    a zero vector normalises to zero with finite derivatives)."""
    return torch.rsqrt(q + eps)


class LayerNorm(Layer):
    r"""Normalises the channels at every position to zero mean and unit variance (no learned affine).

    At infinite width the channel mean of Gaussian pre-activations vanishes and their mean square
    is the variance :math:`\Sigma(x, x)_{p,p}`, so the kernels are rescaled by the point variances
    (Novak et al. 2020; Xiao et al. 2020, "Disentangling trainability and generalization"), with the
    finite module's :math:`\epsilon` added to each variance as it is to the channel variance:

    .. math::
        \Sigma'(x, x')_{p,p'} = \frac{\Sigma(x, x')_{p,p'}}
            {\sqrt{(\Sigma(x,x)_{p,p} + \epsilon)(\Sigma(x',x')_{p',p'} + \epsilon)}},
        \qquad \Theta' = \frac{\Theta}{\sqrt{(\Sigma(x,x)_{p,p} + \epsilon)(\Sigma(x',x')_{p',p'} + \epsilon)}}.

    The derivative of the normaliser adds nothing to :math:`\Theta'` at infinite width (its
    contribution is an average over the channels of terms of order :math:`1/\sqrt n`). Neural
    Tangents' kernel leaves :math:`\epsilon` out: the two differ by the relative amount
    :math:`\epsilon / \Sigma(x, x)_{p,p}`, about :math:`10^{-12}` with the default
    :math:`\epsilon = 10^{-12}` and variances of order one, but large for inputs of tiny norm
    (variances near :math:`\epsilon`), where gpntk follows the finite network.

    It needs Gaussian pre-activations (after ``Dense`` or ``Conv``): after a nonlinearity the
    channel mean does not vanish and the normalised features are no longer described by these
    kernels. The finite module subtracts the mean and divides by :math:`\sqrt{\mathrm{var} + \epsilon}`.
    """

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        # added to the channel variance before dividing by its root, in the finite module and the kernel
        self.eps = real_argument("LayerNorm eps", eps, minimum=0, strict=True, error=ArchitectureError)

    def check(self, signature: Signature) -> Signature:
        if signature.gaussian is False:
            raise ArchitectureError(
                f"LayerNorm needs Gaussian pre-activations, so it must follow an affine layer (Dense or "
                f"Conv), not {signature.last}"
            )
        return signature.after(self)

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        layout = state.layout
        inv1 = _inverse_sqrt(layout.point_variances(state.var1), self.eps)
        inv2 = inv1 if state.diag else _inverse_sqrt(layout.point_variances(state.var2), self.eps)

        def scale(t: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
            return t * layout.rows_broadcast(rows) * layout.cols_broadcast(cols)

        cov12 = scale(state.cov12, inv1, inv2)
        var1 = var2 = cov12
        if not state.diag:
            var1, var2 = scale(state.var1, inv1, inv1), scale(state.var2, inv2, inv2)
        ntk12 = None if state.ntk12 is None else scale(state.ntk12, inv1, inv2)
        return state.replace(cov12=cov12, var1=var1, var2=var2, ntk12=ntk12)

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        return ChannelNorm(self.eps), in_shape

    def __repr__(self) -> str:
        return "LayerNorm()" if self.eps == 1e-12 else f"LayerNorm(eps={self.eps:g})"
