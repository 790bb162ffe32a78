r"""``Dropout``: the train-mode kernel of inverted dropout (Srivastava et al. 2014).

A finite network drops every unit (channel at one position) of its input to the layer with
probability :math:`p` and scales the kept ones by :math:`1/(1 - p)`, with an independent mask
:math:`m` for every evaluation of every input, as ``torch.nn.Dropout(p)`` does in train mode. For
features :math:`\phi` of two inputs

.. math::
    \mathbb E\Bigl[\tfrac{m\,\phi(x)}{1-p} \cdot \tfrac{m'\,\phi(x')}{1-p}\Bigr] =
    \begin{cases} \mathbb E[\phi(x)^2] / (1 - p) & \text{one evaluation of one input, one position } (m = m'),\\
    \mathbb E[\phi(x)\,\phi(x')] & \text{otherwise (independent masks)},\end{cases}

so the infinite-width kernels :math:`\Sigma` and :math:`\Theta` of *one input with itself at one
position* are divided by :math:`1 - p` and every other entry is unchanged (Neural Tangents'
``Dropout`` in ``mode="train"``, Novak et al. 2020, whose ``rate`` is the keep probability
:math:`1 - p`).

What "one input with itself" means in gpntk:

* ``K(X, X)`` (``x1 is x2``, or two tensors of equal values, as GPyTorch and the posterior's
  training kernel call it), ``K(x, diag=True)`` and the diagonal blocks of the blockwise backend:
  the diagonal :math:`i = j` gets the factor. Duplicated rows :math:`i \ne j` of ``X`` do not:
  they are two evaluations, with two masks.
* ``K(x1, x2)`` for two different sets: no entry gets the factor, not even a pair of identical
  rows (a test point equal to a training point is another draw of the mask). The kernel is then
  continuous there, and gpntk's exact per-point treatment of identical rows
  (:mod:`gpntk.core.coincident`) is switched off for those pairs after the first ``Dropout``.

This is Neural Tangents' convention (its factor applies when ``x2`` is ``None`` or equal to
``x1``). The outputs of a ``Dropout`` are not Gaussian pre-activations of one variance per pair
(the self-entries are inflated), so a nonlinearity may not follow directly: put a ``Dense`` or
``Conv`` in between. ``Dropout`` is never a first layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._validation import probability_argument
from ..core.coincident import same_point_pairs
from ..core.hyperparameters import Hyperparameters
from ..core.layer import Layer, Shape, Signature
from ..core.spatial import Layout
from ..core.state import KernelState
from ..errors import ArchitectureError

__all__ = ["Dropout"]


class Dropout(Layer):
    r"""Train-mode dropout with drop probability ``p`` (``torch.nn.Dropout(p)``), no parameters.

    Kernel: :math:`\Sigma` and :math:`\Theta` of one input with itself at one position divided by
    :math:`1 - p`, everything else unchanged (see :mod:`gpntk.layers.dropout`). The finite module
    is ``torch.nn.Dropout(p)``: it drops units only in train mode (the default of a new module);
    in eval mode it is the identity and the kernel of the network without ``Dropout`` applies.

    :param p: probability of dropping a unit, in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = probability_argument("Dropout p", p, error=ArchitectureError)

    def check(self, signature: Signature) -> Signature:
        if signature.channels == "input":
            where = "the network's inputs" if signature.last == "the input" else (
                f"the outputs of {signature.last}, which are still the network's input features"
            )
            raise ArchitectureError(
                f"{self!r} cannot be a first layer: it would act on {where}. Neural Tangents' train-mode "
                "kernel (and gpntk's) needs hidden features; put a Dense or Conv layer before Dropout"
            )
        # the self-entries are inflated by 1/(1 - p): not one Gaussian per pair for a nonlinearity
        return signature.after(self, gaussian=False)

    def kernel_map(self, state: KernelState, hyper: Hyperparameters) -> KernelState:
        if self.p == 0.0:
            return state
        keep = 1.0 - self.p
        layout = state.layout
        positions = _same_position(layout, state.cov12)

        def points(t: Tensor) -> Tensor:  # one input with itself: every same-position entry
            return t / keep if positions is None else torch.where(positions, t / keep, t)

        if state.diag:
            var = points(state.cov12)
            ntk12 = None if state.ntk12 is None else points(state.ntk12)
            return state.replace(cov12=var, var1=var, var2=var, ntk12=ntk12)
        n1, n2 = state.cov12.shape[-2 - layout.ndim], state.cov12.shape[-1 - layout.ndim]

        def pairs(t: Tensor) -> Tensor:  # only a point with itself, i.e. i == j of the same inputs
            if not state.same_inputs:
                return t
            mask = torch.eye(n1, n2, dtype=torch.bool, device=t.device).reshape(n1, n2, *(1,) * layout.ndim)
            if positions is not None:
                mask = mask & positions
            return torch.where(mask, t / keep, t)

        return state.replace(
            cov12=pairs(state.cov12),
            var1=points(state.var1),
            var2=points(state.var2),
            ntk12=None if state.ntk12 is None else pairs(state.ntk12),
            coincident=same_point_pairs(state.coincident, state.same_inputs, n1, n2),
        )

    def build_finite(
        self,
        in_shape: Shape,
        width: int,
        out_features: int,
        is_output: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, Shape]:
        return nn.Dropout(self.p), in_shape

    def __repr__(self) -> str:
        return f"Dropout(p={self.p:g})"


def _same_position(layout: Layout, like: Tensor) -> Tensor | None:
    """``(*S)`` true where every spatial axis pairs a position with itself (full layout); ``None``: all are."""
    if not layout.full:
        return None
    mask = torch.ones((), dtype=torch.bool, device=like.device)
    for size in layout.spatial:
        eye = torch.eye(size, dtype=torch.bool, device=like.device)
        mask = mask.unsqueeze(-1).unsqueeze(-1) & eye  # interleaved (P_1, P_1', P_2, P_2', ...)
    return mask
