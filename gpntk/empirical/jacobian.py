r"""The empirical NTK of any ``nn.Module`` from its full Jacobian (:func:`torch.func.jacrev`).

With :math:`J(x) \in \mathbb R^{k \times P}` the derivative of the :math:`k` outputs at :math:`x`
w.r.t. the :math:`P` trainable parameters,

.. math::
    \hat\Theta_{ab}(x, x') = \sum_p J_{ap}(x)\, J_{bp}(x'),

which needs nothing of the network's structure but materialises :math:`n k P` numbers per input
set. Frozen parameters (``requires_grad=False``) are held fixed and contribute nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import jacrev

from .channels import Channels, contract_channels
from .network import functional_outputs, outputs_of_inputs

__all__ = ["JACOBIAN_BUDGET", "jacobian", "jacobian_ntk", "paired_jacobian_ntk", "trainable_parameters"]

#: at most this many Jacobian entries (rows x channels x parameters) are held at once by
#: :func:`paired_jacobian_ntk`
JACOBIAN_BUDGET = 2**23


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters with ``requires_grad=True``, detached, by name: those the NTK differentiates in."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def jacobian(model: nn.Module, x: Tensor, params: dict[str, Tensor]) -> Tensor:
    """``(n, k, P)``: the derivative of every output at every input w.r.t. the parameters ``params``.

    ``params`` (from :func:`trainable_parameters`) are concatenated in their order along ``P``;
    the model's other parameters are held fixed.
    """
    frozen = {k: v for k, v in model.named_parameters() if k not in params}
    # buffers are passed in (as copies) so that modules updating them in place (batch norm's
    # running statistics) work under the transform and leave the model's own buffers untouched
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def outputs(p: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
        return functional_outputs(model, {**frozen, **p, **b}, x)

    jac = jacrev(outputs, argnums=0)(params, buffers)
    names = list(params)
    n, k = x.shape[0], jac[names[0]].shape[1]
    return torch.cat([jac[name].reshape(n, k, -1) for name in names], dim=-1)


def jacobian_ntk(model: nn.Module, x1: Tensor, x2: Tensor, channels: Channels) -> Tensor:
    """The ``(n1, n2, k, k)`` NTK (``(n1, n2, k)`` with ``channels="diag"``) from the Jacobians at ``x1`` and ``x2``."""
    params = trainable_parameters(model)
    j1 = jacobian(model, x1, params)
    j2 = j1 if x2 is x1 else jacobian(model, x2, params)
    return contract_channels("iap,jbp->ijab", j1, j2, channels)


def paired_jacobian_ntk(net: nn.Module, xa: Tensor, xb: Tensor, *, same: bool) -> Tensor:
    r"""``(m,)``: :math:`\frac1k\sum_a J_a(x_{a,i}) \cdot J_a(x_{b,i})` for paired rows, from Jacobians.

    The rows are taken in chunks of at most :data:`JACOBIAN_BUDGET` Jacobian entries; with
    ``same`` (``xb`` equal to ``xa``) each chunk's Jacobian is computed once.
    """
    params = trainable_parameters(net)
    size = sum(p.numel() for p in params.values())
    k = outputs_of_inputs(net, xa[:1]).shape[-1]
    rows = max(1, JACOBIAN_BUDGET // max(1, k * size))
    parts = []
    for start in range(0, xa.shape[0], rows):
        ja = jacobian(net, xa[start : start + rows], params)  # (rows, k, P)
        if same:
            parts.append(ja.square().sum(-1).mean(-1))
        else:
            jb = jacobian(net, xb[start : start + rows], params)
            parts.append((ja * jb).sum(-1).mean(-1))
    return torch.cat(parts)
